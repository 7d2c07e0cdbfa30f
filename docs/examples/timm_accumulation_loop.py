"""A timm-style loop with gradient accumulation and fp16 AMP, with SSAMBackward in place of the backward.

The base optimizer comes from timm's factory and is stepped as usual (`scaler.step(optimizer)` at the
accumulation boundary); SSAMBackward runs both passes of each micro-batch and leaves its SAM gradient in `.grad`,
divided by the accumulation steps and multiplied by the loss scale, as `scaler.scale(loss / k).backward()` would.
"""

import timm
import torch
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from torch import nn

from hf_ssam import SSAMBackward

device = "cuda" if torch.cuda.is_available() else "cpu"
ACCUMULATION, MICRO_BATCH, STEPS = 2, 8, 4
data = torch.Generator().manual_seed(0)
images = torch.randn(STEPS * ACCUMULATION * MICRO_BATCH, 3, 32, 32, generator=data)
labels = torch.randint(0, 10, (STEPS * ACCUMULATION * MICRO_BATCH,), generator=data)
loss_fn = nn.CrossEntropyLoss(label_smoothing=0.1)

torch.manual_seed(0)
model = timm.create_model(
    "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2, embed_dim=64, num_heads=2,
    num_classes=10, drop_path_rate=0.1,
).to(device)  # fmt: skip
optimizer = create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.75)  # not wrapped
scheduler = CosineLRScheduler(optimizer, t_initial=STEPS, warmup_t=1, warmup_lr_init=1e-5, t_in_epochs=False)
scaler = torch.amp.GradScaler(device)  # fp16 loss scaling; torch.amp.GradScaler("cpu") on CPU
sam_backward = SSAMBackward(
    model, optimizer, variant="ssam", rho=0.05, accumulation_steps=ACCUMULATION, grad_scaler=scaler
)


def forward(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    with torch.autocast(device, dtype=torch.float16):  # fp16 autocast (CPU has it too)
        return loss_fn(model(x), y)


model.train()
for i in range(STEPS * ACCUMULATION):
    batch = slice(i * MICRO_BATCH, (i + 1) * MICRO_BATCH)
    x, y = images[batch].to(device), labels[batch].to(device)
    # was: loss = forward(x, y); scaler.scale(loss / ACCUMULATION).backward()
    loss = sam_backward(lambda: forward(x, y))  # noqa: B023 (the lambda runs inside this call)
    if (i + 1) % ACCUMULATION == 0:  # the accumulation boundary: one optimizer step
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # clips the accumulated SAM gradient
        scaler.step(optimizer)  # skipped after an overflow in either pass of any micro-batch
        scaler.update()
        optimizer.zero_grad()
        step = (i + 1) // ACCUMULATION
        scheduler.step_update(step)
        m = sam_backward.metrics()  # averaged over the micro-batches since the last call
        print(f"step {step} loss {loss.item():.3f} γ {m['sam/gamma']:.3f} skipped {m['sam/skipped']:.0f} "
              f"scale {scaler.get_scale():.0f}")  # fmt: skip

assert all(torch.isfinite(p).all() for p in model.parameters())
