"""SSAMOptimizer.step(closure): the whole two-pass step in one call."""

import torch
from torch import nn

from hf_ssam import SSAMOptimizer

torch.manual_seed(0)
x, y = torch.randn(256, 20), torch.randint(0, 3, (256,))
model = nn.Sequential(nn.Linear(20, 64), nn.GELU(), nn.Dropout(0.1), nn.Linear(64, 3))
loss_fn = nn.CrossEntropyLoss()
optimizer = SSAMOptimizer(model.parameters(), torch.optim.AdamW, variant="ssam", rho=0.05, lr=1e-3, weight_decay=0.05)


def make_closure(inputs: torch.Tensor, targets: torch.Tensor):
    def closure() -> torch.Tensor:
        loss = loss_fn(model(inputs), targets)
        loss.backward()
        return loss

    return closure


for _ in range(20):
    batch = torch.randint(0, 256, (32,))
    # Zeroes the gradients, calls the closure at w and at w + e (replaying the RNG, so the
    # dropout masks match), renormalizes and steps the base optimizer. Returns the loss at w.
    loss = optimizer.step(make_closure(x[batch], y[batch]))

print(f"final loss {loss.item():.3f}, γ {optimizer.last_metrics['gamma']:.3f}")
