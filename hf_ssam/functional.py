"""The SAM-family maths as pure, stateless functions on lists of tensors.

Symbols follow the SSAM paper (Tan et al., arXiv 2401.07250):

* ``w``     — the trainable parameters, ``g = ∇F(w)`` their gradient on a mini-batch;
* ``e``     — the perturbation, ``e = ρ·d(g, w)`` with ``d`` set by the variant;
* ``g_asc`` — the gradient at the perturbed point ``w + e`` on the same mini-batch;
* ``γ``     — the renormalization factor ``‖g‖ / ‖g_asc‖`` (SSAM's step 6).

Every norm is the global L2 norm over all the tensors of the list. Nothing here knows about
optimizers, models or the Trainer; `SSAMOptimizer` and `SSAMTrainer`
are thin glue over these functions. Multi-tensor ``torch._foreach_*`` kernels keep the per-step
cost to a handful of launches whatever the number of parameter tensors.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "PERTURBATIONS",
    "VARIANTS",
    "ascend",
    "check_gamma_bounds",
    "clip_renormalization_factor",
    "global_norm",
    "perturbation_scale",
    "renormalization_factor",
    "rescale_",
    "restore_",
    "rho_scaled_by_gamma",
    "uses_renormalization",
]

#: The variants and how they perturb: ``sam`` (SAM*, normalized), ``usam`` (SAM, unnormalized),
#: ``asam`` (adaptive), ``ssam`` (unnormalized perturbation + renormalization).
VARIANTS: tuple[str, ...] = ("ssam", "sam", "usam", "asam")

#: The perturbation ``d(g, w)`` each variant uses (``ssam`` perturbs like ``usam``).
PERTURBATIONS: dict[str, str] = {"ssam": "usam", "sam": "sam", "usam": "usam", "asam": "asam"}


def uses_renormalization(variant: str, renormalize: bool | None) -> bool:
    """Whether step 6 (``g_asc ← γ·g_asc``) runs: ``renormalize`` if given, else only for ``ssam``."""
    return variant == "ssam" if renormalize is None else renormalize


def global_norm(tensors: Sequence[Tensor]) -> Tensor:
    """``‖x‖₂`` over all the tensors, as a float32 (or float64) scalar tensor; 0 for an empty list."""
    if len(tensors) == 0:
        return torch.zeros(())
    dtype = torch.float64 if tensors[0].dtype == torch.float64 else torch.float32
    norms = torch._foreach_norm(tensors, 2, dtype=dtype)  # ‖x_i‖ per tensor
    return torch.linalg.vector_norm(torch.stack(norms), 2)  # ‖x‖ = ‖(‖x_1‖, …, ‖x_n‖)‖


def perturbation_scale(
    variant: str,
    rho: float,
    grad_norm: Tensor,
    *,
    params: Sequence[Tensor] = (),
    grads: Sequence[Tensor] = (),
    asam_eta: float = 0.01,
    grad_unscale: float = 1.0,
) -> Tensor:
    """The scalar ``s`` such that the perturbation is ``e = s·g`` (``e = s·T²·g`` for ``asam``).

    ``grads`` may carry a constant factor (a loss scale, a ``1/k`` accumulation normalization):
    ``grad_unscale`` converts them back to ``g``. ``grad_norm`` is the norm of the *stored*
    gradients. ``sam`` and ``asam`` are invariant to that factor; ``usam``/``ssam`` are not.
    """
    kind = PERTURBATIONS[variant]
    if kind == "usam":
        return torch.full_like(grad_norm, rho * grad_unscale)  # e = ρ·g
    if kind == "sam":
        return rho / grad_norm  # e = ρ·g/‖g‖
    t_g = torch._foreach_abs(params)  # T = |w| + η
    torch._foreach_add_(t_g, asam_eta)
    torch._foreach_mul_(t_g, grads)  # T·g
    return rho / global_norm(t_g)  # e = ρ·T²g/‖Tg‖


def ascend(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    scale: Tensor,
    *,
    variant: str,
    asam_eta: float = 0.01,
    overwrite_grads: bool = False,
) -> None:
    """Climb in place: ``w ← w + e`` with ``e = scale·g`` (``scale·T²·g`` for ``asam``).

    With ``overwrite_grads=True`` the gradient tensors hold ``e`` afterwards (no temporary the size of
    the model is allocated); use it when the gradients are discarded next, as before a second pass.
    """
    if PERTURBATIONS[variant] == "asam":
        t = torch._foreach_abs(params)  # T = |w| + η
        torch._foreach_add_(t, asam_eta)
        torch._foreach_mul_(t, t)  # T²
        torch._foreach_mul_(t, grads)  # T²·g
        e = t
    elif overwrite_grads:
        e = list(grads)
    else:
        e = [g.clone() for g in grads] if len(grads) else []
    torch._foreach_mul_(e, scale)  # e = s·g  (ρ·T²g/‖Tg‖ for asam)
    torch._foreach_add_(params, e)  # w_asc = w + e


def restore_(params: Sequence[Tensor], backup: Sequence[Tensor]) -> None:
    """Copy the saved weights back: ``w ← w`` exactly (never ``w_asc − e``, which rounds)."""
    torch._foreach_copy_(params, backup)


def renormalization_factor(grad_norm: Tensor, ascent_grad_norm: Tensor) -> tuple[Tensor, Tensor]:
    """``γ = ‖g‖ / ‖g_asc‖``, and whether it is valid.

    A zero or non-finite norm gives ``γ = 1`` (the rescale is skipped) instead of a NaN/Inf;
    the second value is ``True`` where the rescale was skipped. No host synchronisation.
    """
    valid = torch.isfinite(grad_norm) & torch.isfinite(ascent_grad_norm) & (ascent_grad_norm > 0) & (grad_norm > 0)
    gamma = torch.where(valid, grad_norm / torch.where(valid, ascent_grad_norm, 1.0), 1.0)  # γ = ‖g‖/‖g_asc‖
    return gamma, ~valid


def rescale_(grads: Sequence[Tensor], gamma: Tensor) -> None:
    """``g_asc ← γ·g_asc`` in place."""
    torch._foreach_mul_(grads, gamma.to(grads[0].dtype) if len(grads) else gamma)


# Controlling γ (the paper's closing question; experimental). Two ways to keep the descent step in check:
# bound γ itself, or shrink ρ when the ascent gradient outgrows g.


def check_gamma_bounds(gamma_min: float, gamma_max: float, *, prefix: str = "") -> None:
    """Raise a ``ValueError`` unless ``0 < γ_min ≤ 1 ≤ γ_max`` (``γ_max`` may be ``inf``).

    The bounds must contain 1, so that a step where ``g_asc = g`` is left alone.
    """
    for name, value in (("gamma_min", gamma_min), ("gamma_max", gamma_max)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
            raise ValueError(f"{prefix}{name}={value!r} is invalid; it must be a number.")
    if not 0 < gamma_min <= 1:
        raise ValueError(f"{prefix}gamma_min={gamma_min!r} is invalid; it must satisfy 0 < gamma_min <= 1.")
    if not gamma_max >= 1:
        raise ValueError(f"{prefix}gamma_max={gamma_max!r} is invalid; it must satisfy gamma_max >= 1 (inf allowed).")


def clip_renormalization_factor(gamma: Tensor, gamma_min: float | Tensor, gamma_max: float | Tensor) -> Tensor:
    """``γ ← min(max(γ, γ_min), γ_max)``: the rescale ``g_asc ← γ·g_asc`` with a bounded factor.

    ``[γ_min, γ_max] = [1, 1]`` is SAM without renormalization, ``[0⁺, ∞]`` is SSAM; in between, the
    renormalization acts only where ``g_asc`` grew (shrank) by more than ``1/γ_min`` (``1/γ_max``). The bounds
    may be tensors broadcasting against ``γ`` (one pair per independent run).
    """
    return gamma.clamp(min=gamma_min, max=gamma_max)  # γ ∈ [γ_min, γ_max]


def rho_scaled_by_gamma(rho: float, previous_gamma: Tensor | None) -> Tensor:
    """``ρ_t = ρ·γ_{t−1}`` with ``γ_{t−1} = ‖g‖/‖g_asc‖`` measured at the previous step (``ρ`` at the first).

    The radius shrinks where the ascent gradient outgrew ``g`` at the last step (sharp region) and grows
    where it shrank; the descent gradient itself is not rescaled. ``g_asc`` of the current step is not
    known before the climb, hence the previous step's ratio (no extra pass).
    """
    if previous_gamma is None:
        return torch.tensor(float(rho))
    return rho * previous_gamma  # ρ_t = ρ·‖g_{t−1}‖/‖g_asc,t−1‖
