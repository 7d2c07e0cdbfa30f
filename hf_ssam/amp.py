"""The `torch.amp.GradScaler` side of a SAM step: the loss scale, its inf/NaN flag and the skipped step.

`GradScaler` checks the gradients it sees in `unscale_`/`step` (the second pass's); a SAM step has a first
pass too, whose overflow must skip the step and back the scale off just the same. Everything here stays on
the device, except where a base optimizer cannot skip a step by itself (see `step_unless`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["add_found_inf", "inverse_scale", "step_unless"]


def inverse_scale(grad_scaler: Any) -> Tensor | None:
    """``1/scale`` as a device tensor (computed as `GradScaler.unscale_` does), or None without loss scaling.

    Raises:
        TypeError: `grad_scaler` is neither None nor a `torch.amp.GradScaler`.
        RuntimeError: the scaler has not scaled a loss yet.
    """
    if grad_scaler is None:
        return None
    if not isinstance(grad_scaler, torch.amp.GradScaler):
        inner = getattr(grad_scaler, "_scaler", None)
        hint = " (the one it wraps is its ._scaler)" if isinstance(inner, torch.amp.GradScaler) else ""
        raise TypeError(
            f"first_step(grad_scaler=...) takes the torch.amp.GradScaler that scaled the loss (or None); got "
            f"{type(grad_scaler).__name__}: {repr(grad_scaler)[:120]}{hint}."
        )
    if not grad_scaler.is_enabled():
        return None
    scale = grad_scaler._get_scale_async()
    if scale is None:
        raise RuntimeError("grad_scaler has no scale yet: run grad_scaler.scale(loss).backward() before first_step().")
    return scale.double().reciprocal().float()


def add_found_inf(grad_scaler: torch.amp.GradScaler, optimizer: torch.optim.Optimizer, found_inf: Tensor) -> None:
    """Add an inf/NaN flag to what `grad_scaler.update()` will read for ``optimizer`` (during its `step`)."""
    per_device = grad_scaler._per_optimizer_states[id(optimizer)]["found_inf_per_device"]
    first = next(iter(per_device.values()))
    first.add_(found_inf.to(first))


def step_unless(optimizer: torch.optim.Optimizer, skip: Tensor) -> None:
    """``optimizer.step()`` unless the boolean scalar ``skip`` is true (weights and state then stay as they are).

    An optimizer that supports it (torch's ``fused=True`` ones) skips on the device; any other needs one
    host read of ``skip``, as `GradScaler.step` itself does for an optimizer that is not fused.
    """
    if getattr(optimizer, "_step_supports_amp_scaling", False):
        optimizer.grad_scale, optimizer.found_inf = None, skip.to(torch.float32)
        try:
            optimizer.step()
        finally:
            del optimizer.grad_scale, optimizer.found_inf
    elif not skip.item():
        optimizer.step()
