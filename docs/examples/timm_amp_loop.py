"""A timm ViT trained with SSAM in a timm-style loop, resumed from a checkpoint mid-run.

timm's optimizer factory (layer decay, no weight decay on norms and biases) and scheduler, mixed precision
(fp16 autocast + GradScaler on CUDA, bf16 autocast on CPU), clipping of the final gradient, and a resume
that continues exactly as the uninterrupted run.
"""

import os
import tempfile

import timm
import torch
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from torch import nn

from hf_ssam import RNGState, SSAMOptimizer

device = "cuda" if torch.cuda.is_available() else "cpu"
amp_dtype = torch.float16 if device == "cuda" else torch.bfloat16  # fp16 needs a loss scaler, bf16 does not
STEPS, BATCH = 6, 8
data = torch.Generator().manual_seed(0)
images = torch.randn(STEPS * BATCH, 3, 32, 32, generator=data)
labels = torch.randint(0, 10, (STEPS * BATCH,), generator=data)
loss_fn = nn.CrossEntropyLoss(label_smoothing=0.1)


def build():
    torch.manual_seed(0)
    model = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=4, num_classes=10,
        drop_path_rate=0.1,
    ).to(device)  # fmt: skip
    base = create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.75)  # any built optimizer
    optimizer = SSAMOptimizer.wrap(base, variant="ssam", rho=0.05, max_grad_norm=1.0)  # clips the final gradient
    scheduler = CosineLRScheduler(optimizer, t_initial=STEPS, warmup_t=2, warmup_lr_init=1e-5, t_in_epochs=False)
    scaler = torch.amp.GradScaler(device, enabled=amp_dtype == torch.float16)  # a no-op when disabled (bf16)
    return model, optimizer, scheduler, scaler


def train(model, optimizer, scheduler, scaler, start: int, stop: int) -> None:
    model.train()
    for step in range(start, stop):
        batch = slice(step * BATCH, (step + 1) * BATCH)
        x, y = images[batch].to(device), labels[batch].to(device)
        rng = RNGState.capture()  # both passes draw the same stochastic-depth masks
        with torch.autocast(device, dtype=amp_dtype):
            loss = loss_fn(model(x), y)
        scaler.scale(loss).backward()  # g (times the loss scale)
        optimizer.first_step(zero_grad=True, grad_scaler=scaler)  # w ← w + e, with the unscaled g
        rng.restore()
        with torch.autocast(device, dtype=amp_dtype):
            ascent_loss = loss_fn(model(x), y)
        scaler.scale(ascent_loss).backward()  # g_asc at w + e
        scaler.step(optimizer)  # restore w, g_asc ← γ·g_asc, clip to 1.0, AdamW step (skipped on inf/NaN)
        scaler.update()
        optimizer.zero_grad()
        scheduler.step_update(step + 1)
        m = optimizer.last_metrics
        print(f"step {step} loss {loss.item():.3f} γ {m['gamma']:.3f} lr {optimizer.param_groups[-1]['lr']:.2e}")


# One uninterrupted run ...
model, optimizer, scheduler, scaler = build()
train(model, optimizer, scheduler, scaler, 0, STEPS)
uninterrupted = {k: v.clone() for k, v in model.state_dict().items()}

# ... and the same run stopped after 3 steps, saved, rebuilt from scratch and resumed.
with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "checkpoint.pt")
    model, optimizer, scheduler, scaler = build()
    train(model, optimizer, scheduler, scaler, 0, 3)
    torch.save(
        {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),  # the base AdamW's state; the groups carry the SAM settings
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(),
            "rng": RNGState.capture(),  # the generators drive the stochastic depth
        },
        path,
    )
    model, optimizer, scheduler, scaler = build()
    checkpoint = torch.load(path, weights_only=False)
    model.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    scheduler.load_state_dict(checkpoint["scheduler"])
    scaler.load_state_dict(checkpoint["scaler"])
    checkpoint["rng"].restore()
    train(model, optimizer, scheduler, scaler, 3, STEPS)

assert all(torch.equal(v, uninterrupted[k]) for k, v in model.state_dict().items()), "the resume diverged"
print("resumed run == uninterrupted run")
