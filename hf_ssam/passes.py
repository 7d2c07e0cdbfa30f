"""Making the second forward pass see the same function as the first.

Both passes of a SAM step must differentiate the *same* mini-batch loss: same dropout masks
(`RNGState` replays the random number generators) and no second update of BatchNorm's
running statistics (`freeze_batchnorm_stats`). Both work for plain PyTorch loops too. The second
pass must also leave no trace on the trainer beyond its gradient (`leave_no_trace`): metrics and
counters that `compute_loss` records are those of the first pass only.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = ["RNGState", "batchnorm_modules", "freeze_batchnorm_stats", "leave_no_trace"]

#: Largest number of leaves a container may hold to count as bookkeeping (metric lists, counters).
_MAX_RECORD_LEAVES = 4096


@dataclass
class RNGState:
    """A snapshot of the CPU generator and, once CUDA is in use, the current device's generator."""

    cpu: torch.Tensor
    cuda: torch.Tensor | None = None

    @classmethod
    def capture(cls) -> RNGState:
        """Snapshot the generators the forward pass draws dropout masks from."""
        cuda = torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
        return cls(cpu=torch.get_rng_state(), cuda=cuda)

    def restore(self) -> None:
        """Rewind the generators to the snapshot, so the next pass draws the same masks."""
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda)


def batchnorm_modules(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The BatchNorm layers of ``model`` that track running statistics."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


@contextlib.contextmanager
def freeze_batchnorm_stats(model: nn.Module | list[nn.modules.batchnorm._BatchNorm]) -> Iterator[None]:
    """Run a forward pass in training mode without changing BatchNorm's running statistics.

    The layers still normalize with the batch statistics (the same function as the first pass);
    ``running_mean``, ``running_var`` and ``num_batches_tracked`` are put back afterwards, so they
    are updated once per step, by the first pass. Accepts a model or a list from
    `batchnorm_modules` (cheaper to reuse on a hot path).
    """
    layers = batchnorm_modules(model) if isinstance(model, nn.Module) else model
    saved = [(m, m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone()) for m in layers]
    try:
        yield
    finally:
        with torch.no_grad():
            for m, mean, var, count in saved:
                m.running_mean.copy_(mean)
                m.running_var.copy_(var)
                m.num_batches_tracked.copy_(count)


def _record_leaves(value: Any, budget: int) -> int:
    """Leaves left in ``budget`` after ``value``, if it is bookkeeping data; -1 if it is not.

    Bookkeeping: numbers, strings, ``None``, one-element tensors, and dicts/lists/tuples/sets of them, with at
    most ``budget`` leaves. Models, optimizers, data sets, batches of tensors and the like are not.
    """
    if budget < 0:
        return -1
    if value is None or isinstance(value, (bool, int, float, complex, str, bytes)):
        return budget - 1
    if isinstance(value, torch.Tensor):
        return budget - 1 if value.numel() <= 1 else -1
    if type(value) in (dict, list, tuple, set) or isinstance(value, dict) and type(value).__module__ == "collections":
        items = value.items() if isinstance(value, dict) else ((None, v) for v in value)
        for key, item in items:
            budget = _record_leaves(item, _record_leaves(key, budget) + (key is None))
            if budget < 0:
                return -1
        return budget
    return -1


@contextlib.contextmanager
def leave_no_trace(obj: Any) -> Iterator[None]:
    """Put back every bookkeeping attribute of ``obj`` that the block changed, and remove the ones it added.

    Used around the second pass of a Trainer step: metrics lists, token counters and the like that a
    `compute_loss` records (TRL's ``_metrics``, ``_total_train_tokens``, ...) keep the first pass's values,
    whatever the subclass. Containers are restored in place, so references to them stay valid. Attributes
    that are not bookkeeping (see `_record_leaves`) are not copied.
    """
    before = vars(obj)
    saved = {name: copy.deepcopy(v) for name, v in before.items() if _record_leaves(v, _MAX_RECORD_LEAVES) >= 0}
    names = set(before)
    try:
        yield
    finally:
        state = vars(obj)
        for name in set(state) - names:
            delattr(obj, name)
        for name, old in saved.items():
            current = state.get(name)
            if current is old or (type(current) is type(old) and _same(current, old)):
                continue
            if isinstance(current, dict) and isinstance(old, dict):
                current.clear()
                current.update(old)
            elif isinstance(current, list) and isinstance(old, list):
                current[:] = old
            else:
                setattr(obj, name, old)


def _same(a: Any, b: Any) -> bool:
    try:
        return bool(a == b) if not isinstance(a, torch.Tensor) else a is b
    except (RuntimeError, TypeError, ValueError):
        return False
