"""A timm model (with BatchNorm) trained with SSAMOptimizer, under bf16 autocast."""

import timm
import torch
from timm.optim import param_groups_weight_decay
from torch import nn

from hf_ssam import RNGState, SSAMOptimizer, freeze_batchnorm_stats

torch.manual_seed(0)
model = timm.create_model("resnet10t", pretrained=False, num_classes=10)  # any timm model
images, labels = torch.randn(64, 3, 32, 32), torch.randint(0, 10, (64,))
loss_fn = nn.CrossEntropyLoss(label_smoothing=0.1)
# timm's parameter groups (no weight decay on biases and norm layers) work as with any optimizer.
groups = param_groups_weight_decay(model, weight_decay=1e-4)
optimizer = SSAMOptimizer(groups, torch.optim.SGD, variant="ssam", rho=0.05, lr=0.05, momentum=0.9)
device_type = "cuda" if torch.cuda.is_available() else "cpu"
model.to(device_type).train()


def forward_backward(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    with torch.autocast(device_type, dtype=torch.bfloat16):  # bf16 needs no loss scaler
        loss = loss_fn(model(x), y)
    loss.backward()
    return loss


for step in range(4):
    x, y = images[step * 16 : (step + 1) * 16].to(device_type), labels[step * 16 : (step + 1) * 16].to(device_type)
    rng = RNGState.capture()
    loss = forward_backward(x, y)  # updates BatchNorm running statistics once
    optimizer.first_step(zero_grad=True)
    rng.restore()
    with freeze_batchnorm_stats(model):  # the second pass must not update them again
        forward_backward(x, y)
    optimizer.second_step(zero_grad=True)
    print(f"step {step} loss {loss.item():.3f} γ {optimizer.last_metrics['gamma']:.3f}")
