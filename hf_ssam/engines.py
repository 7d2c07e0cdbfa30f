"""Where a pass's gradient lives and how it is synchronized: one process, DDP, FSDP2; the fp16 loss scale.

The two-pass step (`hf_ssam.step`) talks to these few functions and never to a data-parallel wrapper directly:
which gradient sync a pass runs with (`pass_sync_context`), the one all-reduce of a local ascent
(`all_reduce_mean_`), and the loss scale the stored gradients carry (`loss_scale_of`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "all_reduce_mean_",
    "all_reduce_tensors_mean_",
    "fsdp2_gradient_sync",
    "is_ddp",
    "is_fsdp2",
    "loss_scale_of",
    "pass_sync_context",
    "scaler_enabled",
    "torch_reduce_mean",
]


def is_ddp(model: nn.Module) -> bool:
    return isinstance(model, nn.parallel.DistributedDataParallel)


def is_fsdp2(model: nn.Module) -> bool:
    if not torch.distributed.is_available():
        return False
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def fsdp2_gradient_sync(model: nn.Module) -> bool:
    """The flag `FSDPModule.set_requires_gradient_sync` last set on ``model`` (torch has no getter for it)."""
    state = model._get_fsdp_state()
    groups = getattr(state, "_fsdp_param_groups", None)  # newer torch: a list (2.6: one group or None)
    if groups is None:
        group = state._fsdp_param_group
        groups = [] if group is None else [group]
    return all(group.reduce_grads for group in groups)


@contextlib.contextmanager
def pass_sync_context(
    model: nn.Module, sync_ascent: bool, no_sync: Callable[[nn.Module], Any] | None = None
) -> Iterator[None]:
    """Gradient sync for one pass: off for a local ascent, forced on for a synchronized one (always, FSDP2).

    ``no_sync``: the launcher's way to switch DDP's sync off (``accelerator.no_sync``; default ``model.no_sync()``).
    """
    if is_fsdp2(model):  # each pass needs its sharded gradient, between accumulation boundaries too
        previous = fsdp2_gradient_sync(model)
        model.set_requires_gradient_sync(True)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(previous)
    elif not is_ddp(model):
        yield
    elif not sync_ascent:
        with no_sync(model) if no_sync is not None else model.no_sync():  # DDP decides at forward time
            yield
    else:
        previous = model.require_backward_grad_sync
        model.require_backward_grad_sync = True  # all-reduce this pass even between accumulation boundaries
        try:
            yield
        finally:
            model.require_backward_grad_sync = previous


def all_reduce_mean_(params: Sequence[nn.Parameter], reduce_mean: Callable[[Tensor], Tensor]) -> None:
    """Local-ascent mode: average the accumulated SAM gradient over replicas, one flat all-reduce per dtype."""
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    all_reduce_tensors_mean_([p.grad for p in params], reduce_mean)


def all_reduce_tensors_mean_(tensors: Sequence[Tensor], reduce_mean: Callable[[Tensor], Tensor]) -> None:
    """Average ``tensors`` over replicas in place, one flat all-reduce per dtype."""
    by_dtype: dict[torch.dtype, list[Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for group in by_dtype.values():
        flat = reduce_mean(torch._utils._flatten_dense_tensors(group))
        torch._foreach_copy_(group, torch._utils._unflatten_dense_tensors(flat, group))


def torch_reduce_mean(flat: Tensor) -> Tensor:
    torch.distributed.all_reduce(flat)
    return flat.div_(torch.distributed.get_world_size())


def scaler_enabled(scaler: Any) -> bool:
    """Whether ``scaler`` (a `torch.amp.GradScaler` or None) scales the loss."""
    return scaler is not None and scaler.is_enabled()


def loss_scale_of(scaler: Any) -> float | Tensor:
    """The fp16 loss scale multiplying the gradients (1 without an enabled scaler), as a device tensor: no sync."""
    if not scaler_enabled(scaler):
        return 1.0
    scale = scaler._get_scale_async() if hasattr(scaler, "_get_scale_async") else None
    return scaler.get_scale() if scale is None else scale
