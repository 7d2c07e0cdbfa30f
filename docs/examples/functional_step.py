"""One SSAM step written out with hf_ssam.functional, checked against SSAMOptimizer."""

import copy

import torch
from torch import nn

from hf_ssam import SSAMOptimizer, functional

torch.manual_seed(0)
x, y = torch.randn(32, 8), torch.randn(32, 1)
model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
reference = copy.deepcopy(model)
rho, lr = 0.05, 0.1


def backward(net: nn.Module) -> torch.Tensor:
    net.zero_grad()
    loss = nn.functional.mse_loss(net(x), y)
    loss.backward()
    return loss


# By hand, the numbered steps of the algorithm:
params = list(model.parameters())
backward(model)
g = [p.grad.clone() for p in params]  # 1. g = ∇F(w)
grad_norm = functional.global_norm(g)  # ‖g‖
scale = functional.perturbation_scale("ssam", rho, grad_norm)  # 2. e = ρ·g
saved = [p.detach().clone() for p in params]
with torch.no_grad():
    functional.ascend_(params, g, scale, variant="ssam")  # 3. w_asc = w + e
backward(model)  # 4. g_asc = ∇F(w_asc)
g_asc = [p.grad for p in params]
with torch.no_grad():
    functional.restore_(params, saved)  # 5. restore w exactly
    gamma, skipped = functional.renormalization_factor(grad_norm, functional.global_norm(g_asc))  # γ = ‖g‖/‖g_asc‖
    functional.rescale_(g_asc, gamma)  # 6. g_asc ← γ·g_asc
    for p in params:  # 7. base optimizer: plain SGD
        p -= lr * p.grad

# The same step with SSAMOptimizer around torch.optim.SGD:
optimizer = SSAMOptimizer(reference.parameters(), torch.optim.SGD, variant="ssam", rho=rho, lr=lr)
optimizer.step(lambda: backward(reference))

for mine, theirs in zip(model.parameters(), reference.parameters()):
    torch.testing.assert_close(mine, theirs)
print(f"γ = {gamma.item():.4f}, skipped = {bool(skipped)}: both updates agree")
