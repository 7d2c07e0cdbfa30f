"""The SSAM bookkeeping alone (norms, save, perturb, restore, rescale) on a model's real gradients."""

from __future__ import annotations

import statistics

import torch
from torch import nn

from .timing import PRIMARY, clock, elapsed, sync
from .workloads import RHO

__all__ = ["bookkeeping_seconds"]


def bookkeeping_seconds(model: nn.Module, batch: dict[str, torch.Tensor], repeats: int) -> dict[str, float]:
    """Median time of the SSAM bookkeeping on the model's real parameters and gradients.

    ``functional``: the ``hf_ssam.functional`` calls in SSAMTrainer's order (device-side skip mask, no host
    sync, and the gradient zeroing between the passes). ``inplace``: the same maths as ``loop:ssam`` writes it
    (perturbation in the gradient buffers, gradients dropped rather than zeroed) — the floor for this memory
    traffic.
    """
    from hf_ssam import functional as sam_maths

    model.train()
    model.zero_grad(set_to_none=True)
    model(**batch)["loss"].backward()
    params = [p for p in model.parameters() if p.grad is not None]
    grads = [p.grad for p in params]
    backup = [torch.empty_like(p) for p in params]

    @torch.no_grad()
    def functional() -> None:
        grad_norm = sam_maths.global_norm(grads)
        scale = sam_maths.perturbation_scale("ssam", RHO, grad_norm, params=params, grads=grads)
        valid = torch.isfinite(scale) & torch.isfinite(grad_norm) & (grad_norm > 0)  # as SSAMTrainer: on device
        scale = torch.where(valid, scale, torch.zeros_like(scale))
        sam_maths.zero_unless_(grads, valid)
        sam_maths.save_(backup, params)
        sam_maths.ascend_(params, grads, scale, variant="ssam", overwrite_grads=True)  # as SSAMTrainer calls it
        torch._foreach_zero_(grads)
        sam_maths.restore_(params, backup)
        ascent_norm = sam_maths.global_norm(grads)
        gamma, _ = sam_maths.renormalization_factor(grad_norm, ascent_norm)
        sam_maths.rescale_(grads, gamma)

    saved = [g.clone() for g in grads]

    @torch.no_grad()
    def inplace() -> None:
        gnorm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
        torch._foreach_copy_(backup, params)
        torch._foreach_mul_(grads, RHO)
        torch._foreach_add_(params, grads)
        torch._foreach_copy_(params, backup)
        anorm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
        ok = torch.isfinite(anorm) & (anorm > 0)
        torch._foreach_mul_(grads, torch.where(ok, gnorm / torch.where(ok, anorm, 1.0), 1.0))

    out = {}
    for name, fn in (("functional", functional), ("inplace", inplace)):
        times = []
        for _ in range(repeats + 2):
            torch._foreach_copy_(grads, saved)  # real gradients every time (the zeroing wiped them)
            sync()
            start = clock()
            fn()
            sync()
            times.append(elapsed(start)[PRIMARY])
        out[name] = statistics.median(times[2:])
    out["n_tensors"] = float(len(params))
    out["n_params"] = float(sum(p.numel() for p in params))
    return out
