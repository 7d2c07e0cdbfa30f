"""The plain-loop AMP configuration: the three hand-written loops under mixed precision.

bf16 autocast on CPU (no loss scaler: the `GradScaler` is disabled, as in a bf16 training script); fp16
autocast with a `GradScaler` on CUDA. ``amp:plain`` is one pass, ``amp:ssam`` the SSAM maths written out
(unscaling by hand, the zero/non-finite check on the host), ``amp:SSAMOptimizer`` the torch idiom with
``first_step(grad_scaler=...)`` and ``scaler.step(optimizer)``. All clip the final gradient to 1.0.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from .loop_runs import MAX_GRAD_NORM, LoopRunner
from .timing import DEVICE
from .workloads import RHO

__all__ = ["AMP_CONFIGS", "AMP_DTYPE", "AMP_LABEL", "AmpLoopRunner"]

AMP_CONFIGS: tuple[str, ...] = ("amp:plain", "amp:ssam", "amp:SSAMOptimizer")
AMP_DTYPE = torch.float16 if DEVICE.type == "cuda" else torch.bfloat16
AMP_LABEL = "fp16 autocast + GradScaler" if AMP_DTYPE == torch.float16 else "bf16 autocast"


class AmpLoopRunner(LoopRunner):
    """`LoopRunner`'s three loops with autocast and (for fp16) loss scaling."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.scaler = torch.amp.GradScaler(DEVICE.type, enabled=AMP_DTYPE == torch.float16)

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        with torch.autocast(DEVICE.type, dtype=AMP_DTYPE):
            yield

    def scaled_backward(self, batch: dict[str, torch.Tensor]) -> None:
        with self.autocast():
            loss = self.loss(batch)
        self.scaler.scale(loss).backward()

    def finish(self) -> None:
        self.scaler.step(self.opt)
        self.scaler.update()
        self.opt.zero_grad(set_to_none=True)

    def step_plain(self, batch: dict[str, torch.Tensor]) -> None:
        self.scaled_backward(batch)
        self.scaler.unscale_(self.opt)
        torch.nn.utils.clip_grad_norm_(self.params, MAX_GRAD_NORM)
        self.finish()

    def step_ssam(self, batch: dict[str, torch.Tensor]) -> None:
        """SSAM by hand under AMP: ‖g‖ and e = ρ·g from the scaled gradients divided by the loss scale."""
        params, scaler = self.params, self.scaler
        rng = torch.get_rng_state()
        self.scaled_backward(batch)  # g · S
        with torch.no_grad():
            grads = [p.grad for p in params]
            scale = scaler.get_scale() if scaler.is_enabled() else 1.0
            gnorm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))) / scale
            perturb = bool(torch.isfinite(gnorm) & (gnorm > 0))
            if perturb:
                torch._foreach_copy_(self.backup, params)
                torch._foreach_mul_(grads, RHO / scale)  # e = ρ·g, in the gradient buffers (dropped next)
                torch._foreach_add_(params, grads)  # w + e
            del grads
            for p in params:
                p.grad = None
        torch.set_rng_state(rng)
        self.scaled_backward(batch)  # g_asc · S
        with torch.no_grad():
            if perturb:
                torch._foreach_copy_(params, self.backup)
        scaler.unscale_(self.opt)
        with torch.no_grad():
            grads = [p.grad for p in params]
            anorm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
            ok = torch.isfinite(anorm) & (anorm > 0) & (gnorm > 0)
            torch._foreach_mul_(grads, torch.where(ok, gnorm / torch.where(ok, anorm, 1.0), 1.0))
        torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
        self.finish()

    def step_ssam_optimizer(self, batch: dict[str, torch.Tensor]) -> None:
        from hf_ssam import RNGState

        rng = RNGState.capture()
        self.scaled_backward(batch)
        self.opt.first_step(zero_grad=True, grad_scaler=self.scaler)  # type: ignore[attr-defined]
        rng.restore()
        self.scaled_backward(batch)
        self.finish()  # scaler.step(opt): restore, γ·g_asc, clip, base step
