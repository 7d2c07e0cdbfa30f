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

Sharded tensors (``DTensor``, as FSDP2's ``fully_shard`` makes parameters and gradients) are welcome
in every list: the elementwise work runs on each rank's local shard with the same multi-tensor kernels,
and a global norm sums the local squares and all-reduces that one scalar over the mesh dimensions the
tensor is sharded on (a replicated dimension holds the same values on every rank and is counted once).
No full parameter or gradient is ever gathered.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
from torch import Tensor

from .variants import VARIANTS

__all__ = [
    "PERTURBATIONS",
    "add_reused_direction_",
    "ascend_",
    "check_gamma_bounds",
    "clip_renormalization_factor",
    "global_dot",
    "global_norm",
    "orthogonal_part_",
    "perturbation_scale",
    "renormalization_factor",
    "rescale_",
    "restore_",
    "save_",
    "rho_scaled_by_gamma",
    "uses_renormalization",
    "zero_unless_",
]

#: The perturbation ``d(g, w)`` each variant of `hf_ssam.VARIANTS` uses (``ssam`` perturbs like ``usam``).
PERTURBATIONS: dict[str, str] = {"ssam": "usam", "sam": "sam", "usam": "usam", "asam": "asam"}
if set(PERTURBATIONS) != set(VARIANTS):
    raise ImportError("hf_ssam.functional.PERTURBATIONS must cover exactly hf_ssam.variants.VARIANTS")


def uses_renormalization(variant: str, renormalize: bool | None) -> bool:
    """Whether step 6 (``g_asc ← γ·g_asc``) runs: ``renormalize`` if given, else only for ``ssam``."""
    return variant == "ssam" if renormalize is None else renormalize


@functools.cache
def _dtensor_type() -> type | None:
    """``DTensor`` when this build of torch has ``torch.distributed`` (imported on first use), else None."""
    if not torch.distributed.is_available():
        return None
    from torch.distributed.tensor import DTensor

    return DTensor


def _is_dtensor(t: Tensor) -> bool:
    if type(t) is Tensor or type(t) is torch.nn.Parameter:  # the common case, without an isinstance walk
        return False
    cls = _dtensor_type()
    return cls is not None and isinstance(t, cls)


def _locals(tensors: Sequence[Tensor]) -> list[Tensor]:
    """Each tensor's local shard (the tensor itself when it is not a DTensor), sharing its storage."""
    if not any(_is_dtensor(t) for t in tensors):
        return list(tensors)
    with torch.no_grad():  # to_local() is then the shard itself, not a differentiable view
        return [t.to_local() if _is_dtensor(t) else t for t in tensors]


def _on_device(tensors: Sequence[Tensor], device: torch.device) -> list[Tensor]:
    """The tensors, each moved to ``device`` if it is elsewhere (``device_map`` models span several devices)."""
    return [t if t.device == device else t.to(device) for t in tensors]


def _mul_(tensors: Sequence[Tensor], scalar: Tensor) -> None:
    """``t ← s·t`` for every tensor, the scalar ``s`` taken to each tensor's device."""
    if not len(tensors):
        return
    first = tensors[0].device
    if all(t.device == first for t in tensors):  # the usual case: one multi-tensor kernel
        torch._foreach_mul_(tensors, scalar.to(first))
        return
    by_device: dict[torch.device, list[Tensor]] = {}
    for t in tensors:
        by_device.setdefault(t.device, []).append(t)
    for device, group in by_device.items():
        torch._foreach_mul_(group, scalar.to(device))


def _shard_groups(t: Tensor) -> tuple:
    """The process groups over which ``t``'s local shards add up to the whole tensor (none for a plain tensor)."""
    if not _is_dtensor(t):
        return ()
    groups = []
    for dim, placement in enumerate(t.placements):
        if placement.is_partial():
            raise ValueError(
                f"Cannot take a norm of a DTensor with placements {tuple(t.placements)}: a Partial placement "
                "holds unreduced values. Reduce it first (redistribute to Shard or Replicate); FSDP2 gradients "
                "are Shard(0)."
            )
        if not placement.is_replicate():  # Shard, _StridedShard: the mesh dimension splits the elements
            groups.append(t.device_mesh.get_group(dim))
    return tuple(groups)


def _norm(
    local_tensors: Sequence[Tensor], like: Sequence[Tensor], dtype: torch.dtype, partitioned: object = None
) -> Tensor:
    """``‖x‖₂`` of the tensors whose local shards are ``local_tensors``, laid out like ``like`` (or, with
    ``partitioned``, plain tensors that are this process's partitions over that process group)."""
    if len(local_tensors) == 0:
        zero = torch.zeros((), dtype=dtype)
        if partitioned is not None:  # the other processes' partitions still take part in the all-reduce
            torch.distributed.all_reduce(zero, group=partitioned)
        return zero
    norms = torch._foreach_norm(local_tensors, 2, dtype=dtype)  # ‖x_i‖ per tensor (per local shard)
    norms = _on_device(norms, norms[0].device)  # a model split over devices: reduce on the first one
    if partitioned is not None:
        squares = torch.stack(norms).square().sum()  # Σ‖x_i,local‖²
        torch.distributed.all_reduce(squares, group=partitioned)  # Σ over the partitions: each element once
        return squares.sqrt()
    if not any(_is_dtensor(t) for t in like):
        return torch.linalg.vector_norm(torch.stack(norms), 2)  # ‖x‖ = ‖(‖x_1‖, …, ‖x_n‖)‖
    buckets: dict[tuple, list[Tensor]] = {}  # tensors sharded over the same groups share one all-reduce
    for n, t in zip(norms, like):
        buckets.setdefault(_shard_groups(t), []).append(n)
    total = torch.zeros((), dtype=dtype, device=norms[0].device)
    for groups, ns in buckets.items():
        squares = torch.stack(ns).square().sum()  # Σ‖x_i,local‖²
        for group in groups:
            torch.distributed.all_reduce(squares, group=group)  # Σ over the shards: each element once
        total = total + squares.to(total.device)
    return total.sqrt()  # ‖x‖ = √(Σ_i ‖x_i‖²)


def global_norm(tensors: Sequence[Tensor], *, partitioned: object = None) -> Tensor:
    """``‖x‖₂`` over all the tensors, as a float32 (or float64) scalar tensor; 0 for an empty list.

    DTensors count once each, whatever their sharding: the result is the norm of the full tensors, the same
    plain scalar tensor on every rank (one scalar all-reduce per set of shard groups, nothing gathered).
    ``partitioned``: a process group over which the plain ``tensors`` are partitions (DeepSpeed ZeRO-3's flat
    parameter partitions): the squares are summed over it (one scalar all-reduce).
    """
    dtype = torch.float64 if len(tensors) and tensors[0].dtype == torch.float64 else torch.float32
    return _norm(_locals(tensors), tensors, dtype, partitioned)


def global_dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:
    """``⟨a, b⟩`` over all the tensors (DTensors: of the full tensors; one scalar all-reduce per set of shard
    groups)."""
    la, lb = _locals(a), _locals(b)
    dtype = torch.float64 if len(a) and a[0].dtype == torch.float64 else torch.float32
    if not la:
        return torch.zeros((), dtype=dtype)
    products = [torch.dot(x.reshape(-1).to(dtype), y.reshape(-1).to(dtype)) for x, y in zip(la, lb)]  # ⟨a_i, b_i⟩
    products = _on_device(products, products[0].device)
    buckets: dict[tuple, list[Tensor]] = {}
    for d, t in zip(products, a):
        buckets.setdefault(_shard_groups(t), []).append(d)
    total = torch.zeros((), dtype=dtype, device=products[0].device)
    for groups, ds in buckets.items():
        partial = torch.stack(ds).sum()
        for group in groups:
            torch.distributed.all_reduce(partial, group=group)  # Σ over the shards: each element once
        total = total + partial.to(total.device)
    return total


def orthogonal_part_(g: Sequence[Tensor], g_asc: Sequence[Tensor], g_norm: Tensor) -> None:
    """``g ← g_asc − (⟨g_asc, g⟩/‖g‖²)·g`` in place: the part of ``g_asc`` orthogonal to ``g``, written over ``g``
    (no new buffer; zero when ‖g‖ is zero or not finite)."""
    coef = global_dot(g_asc, g) / g_norm.square()  # ⟨g_asc, g⟩/‖g‖²
    valid = torch.isfinite(coef)
    coef = torch.where(valid, coef, torch.zeros_like(coef))
    for t, a in zip(_locals(g), _locals(g_asc)):
        t.mul_(-coef.to(t.device, t.dtype)).add_(a)  # v = g_asc − coef·g
    zero_unless_(g, valid)


def add_reused_direction_(grads: Sequence[Tensor], v: Sequence[Tensor], alpha: float, renormalize: bool) -> Tensor:
    """``g ← g + α·(‖g‖/‖v‖)·v`` in place (LookSAM-style reuse), rescaled to ``‖g‖`` when ``renormalize``.

    Only the direction of ``v`` matters, so ``v`` may be in other units than ``g``. Returns whether it was applied
    (a boolean scalar on the device): with a zero or non-finite ‖g‖ or ‖v‖, ``g`` is left as it is.
    """
    g_norm, v_norm = global_norm(grads), global_norm(v)  # ‖g‖, ‖v‖
    scale = alpha * g_norm / v_norm  # α·‖g‖/‖v‖
    used = torch.isfinite(scale) & (v_norm > 0) & (g_norm > 0) & torch.isfinite(g_norm)
    scale = torch.where(used, scale, torch.zeros_like(scale))
    local_g, local_v = _locals(grads), _locals(v)
    for t, vi in zip(local_g, local_v):
        t.addcmul_(vi.to(t.device, t.dtype), scale.to(t.device, t.dtype))  # g + α·(‖g‖/‖v‖)·v, no temporary
    if renormalize:
        new_norm = global_norm(grads)
        factor = torch.where(used & (new_norm > 0), g_norm / new_norm, torch.ones_like(g_norm))  # ‖g‖/‖g'‖
        rescale_(grads, factor)
    return used


def perturbation_scale(
    variant: str,
    rho: float,
    grad_norm: Tensor,
    *,
    params: Sequence[Tensor] = (),
    grads: Sequence[Tensor] = (),
    asam_eta: float = 0.01,
    grad_unscale: float | Tensor = 1.0,
    partitioned: object = None,
) -> Tensor:
    """The scalar ``s`` such that the perturbation is ``e = s·g`` (``e = s·T²·g`` for ``asam``).

    ``grads`` may carry a constant factor (a loss scale, a ``1/k`` accumulation normalization):
    ``grad_unscale`` converts them back to ``g``. ``grad_norm`` is the norm of the *stored*
    gradients. ``sam`` and ``asam`` are invariant to that factor; ``usam``/``ssam`` are not.
    ``partitioned``: as in `global_norm`.
    """
    kind = PERTURBATIONS[variant]
    if kind == "usam":
        return torch.full_like(grad_norm, rho) * grad_unscale  # e = ρ·g
    if kind == "sam":
        return rho / grad_norm  # e = ρ·g/‖g‖
    t_g = torch._foreach_abs(_locals(params))  # T = |w| + η, on the local shards
    torch._foreach_add_(t_g, asam_eta)
    torch._foreach_mul_(t_g, _locals(grads))  # T·g
    dtype = torch.float64 if len(t_g) and t_g[0].dtype == torch.float64 else torch.float32
    return rho / _norm(t_g, params, dtype, partitioned)  # e = ρ·T²g/‖Tg‖


def ascend_(
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
    params, grads = _locals(params), _locals(grads)
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
    _mul_(e, scale)  # e = s·g  (ρ·T²g/‖Tg‖ for asam)
    torch._foreach_add_(params, e)  # w_asc = w + e


def save_(backup: Sequence[Tensor], params: Sequence[Tensor]) -> None:
    """Save the weights before the climb: ``backup ← w``, shard by shard for DTensors.

    ``backup`` holds tensors shaped like ``params`` (``torch.empty_like`` of each, which shards a
    DTensor's buffer like the DTensor) or like their local shards.
    """
    if len(params):
        torch._foreach_copy_(_locals(backup), _locals(params))


def restore_(params: Sequence[Tensor], backup: Sequence[Tensor]) -> None:
    """Copy the saved weights back: ``w ← w`` exactly (never ``w_asc − e``, which rounds)."""
    if len(params):
        torch._foreach_copy_(_locals(params), _locals(backup))


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
    if len(grads):
        _mul_(_locals(grads), gamma.to(grads[0].dtype))


#: Integer dtype of each float element size: `zero_unless_` multiplies bit patterns, which never makes a NaN.
_BITS: dict[int, torch.dtype] = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def zero_unless_(tensors: Sequence[Tensor], keep: Tensor) -> None:
    """``t ← t`` where the boolean scalar ``keep`` is true, else ``t ← 0``, in place and with no host sync.

    Exact for every entry, inf and NaN included (``0·t`` would leave NaN where ``t`` is inf or NaN): the bit
    patterns are multiplied by 1 or 0 as integers. Lets a step skip its perturbation on the device, without
    reading ``keep`` on the host.
    """
    by_kind: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    for t in _locals(tensors):
        bits = _BITS.get(t.element_size())
        if bits is None:  # no integer of that width (complex128): one kernel for this tensor
            t.copy_(torch.where(keep.to(t.device), t, torch.zeros((), dtype=t.dtype, device=t.device)))
            continue
        by_kind.setdefault((t.device, bits), []).append(t.view(bits))
    for (device, bits), views in by_kind.items():
        torch._foreach_mul_(views, keep.to(device=device, dtype=bits))  # bits·1 = bits, bits·0 = +0.0


# Controlling γ (the paper's closing question; experimental). Two ways to keep the update in check:
# bound γ itself, or shrink ρ when g_asc outgrows g.


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

    The radius shrinks where ``g_asc`` outgrew ``g`` at the last step (sharp region) and grows
    where it shrank; ``g_asc`` itself is not rescaled. ``g_asc`` of the current step is not
    known before the climb, hence the previous step's ratio (no extra pass).
    """
    if previous_gamma is None:
        return torch.tensor(float(rho))
    return rho * previous_gamma  # ρ_t = ρ·‖g_{t−1}‖/‖g_asc,t−1‖
