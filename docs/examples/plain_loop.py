"""SSAMOptimizer in a plain PyTorch loop: first_step / second_step, a scheduler, metrics, checkpoints."""

import torch
from torch import nn

from hf_ssam import RNGState, SSAMOptimizer

torch.manual_seed(0)
x, y = torch.randn(256, 20), torch.randint(0, 3, (256,))
model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Dropout(0.1), nn.Linear(64, 3))
loss_fn = nn.CrossEntropyLoss()

# Any torch.optim optimizer is the base: its keyword arguments pass through.
optimizer = SSAMOptimizer(model.parameters(), torch.optim.SGD, variant="ssam", rho=0.05, lr=0.1, momentum=0.9)
scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=20)  # attach to the SSAMOptimizer

for step in range(20):
    batch = torch.randint(0, 256, (32,))
    inputs, targets = x[batch], y[batch]

    rng = RNGState.capture()  # so that the second pass draws the same dropout masks
    loss = loss_fn(model(inputs), targets)
    loss.backward()  # g = ∇F(w)
    optimizer.first_step(zero_grad=True)  # w ← w + e

    rng.restore()
    loss_fn(model(inputs), targets).backward()  # g_asc = ∇F(w + e), same batch
    optimizer.second_step(zero_grad=True)  # restore w, g_asc ← γ·g_asc, base optimizer step
    scheduler.step()

    if step % 5 == 0:
        m = optimizer.last_metrics
        print(f"step {step:2d} loss {loss.item():.3f} ‖g‖ {m['grad_norm']:.3f} γ {m['gamma']:.3f}")

# The state dict is the base optimizer's (momentum buffers, ...) and round-trips.
state = optimizer.state_dict()
restored = SSAMOptimizer(model.parameters(), torch.optim.SGD, variant="ssam", rho=0.05, lr=0.1, momentum=0.9)
restored.load_state_dict(state)
assert restored.state_dict()["param_groups"][0]["lr"] == optimizer.param_groups[0]["lr"]
