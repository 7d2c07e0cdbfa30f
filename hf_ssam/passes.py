"""Making the second forward pass see the same function as the first.

Both passes of a SAM step must differentiate the *same* mini-batch loss: same dropout masks
(`RNGState` replays the random number generators) and no second update of BatchNorm's
running statistics (`freeze_batchnorm_stats`). Both work for plain PyTorch loops too. The second
pass must also leave no trace on the trainer beyond its gradient (`leave_no_trace`): metrics and
counters that `compute_loss` records are those of the first pass only, and the batch is prepared once
(`PreparedInputs`): a trainer that samples while preparing its inputs does not sample again.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, MutableMapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = ["PreparedInputs", "RNGState", "freeze_batchnorm_stats", "leave_no_trace", "shallow_copy"]

#: How deep `leave_no_trace` follows nested dicts (TRL keeps ``_metrics[mode][name]`` lists: depth 2).
_MAX_DEPTH = 4
_MISSING = object()


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


class _Snapshot:
    """The structure of one attribute value, cheap to take: identities, shallow list copies, tensor scalars.

    Dicts are followed (their keys and values), lists are copied shallowly (pointers, not elements), one-element
    tensors are cloned (they may be updated in place, e.g. a token counter), anything else is kept by identity.
    """

    __slots__ = ("value", "items", "tensor")

    def __init__(self, value: Any, depth: int = 0):
        self.value, self.items, self.tensor = value, None, None
        if isinstance(value, dict) and depth < _MAX_DEPTH:
            self.items = {k: _Snapshot(v, depth + 1) for k, v in value.items()}
        elif isinstance(value, list):
            self.items = list(value)
        elif isinstance(value, torch.Tensor) and value.numel() == 1:
            self.tensor = value.detach().clone()

    def restore(self) -> None:
        """Put ``self.value`` back as it was, in place."""
        value = self.value
        if isinstance(self.items, dict):
            for key in [k for k in value if k not in self.items]:
                del value[key]  # added by the block
            for key, snap in self.items.items():
                if value.get(key, _MISSING) is not snap.value:
                    value[key] = snap.value  # removed or rebound by the block
                snap.restore()
        elif isinstance(self.items, list):
            if len(value) != len(self.items) or any(a is not b for a, b in zip(value, self.items)):
                value[:] = self.items
        elif self.tensor is not None:
            with torch.no_grad():
                value.copy_(self.tensor)


@contextlib.contextmanager
def leave_no_trace(obj: Any) -> Iterator[None]:
    """Undo what the block did to the attributes of ``obj``: bindings, dicts, lists and scalar tensors.

    Used around the second pass of a Trainer step, so that metric lists, token counters and the like that a
    `compute_loss` records (TRL's ``_metrics``, ``_total_train_tokens``, ...) keep the first pass's values,
    whatever the subclass. Attributes the block added are removed, rebound ones are bound again, dicts and
    lists are restored in place (references to them stay valid), one-element tensors are copied back. Taking
    the snapshot costs a walk over the attributes and the keys of their dicts and a pointer copy of their lists
    (no element is copied), so it stays cheap however long the metric lists grow between two logs.
    """
    snapshots = {name: _Snapshot(value) for name, value in vars(obj).items()}
    try:
        yield
    finally:
        state = vars(obj)
        for name in [n for n in state if n not in snapshots]:
            delattr(obj, name)
        for name, snap in snapshots.items():
            if state.get(name, _MISSING) is not snap.value:
                setattr(obj, name, snap.value)
            snap.restore()


class PreparedInputs:
    """Prepare a micro-batch once: the second pass gets what the first pass's `_prepare_inputs` returned.

    Trainers that generate, sample or advance a buffer in `_prepare_inputs` then do it once per micro-batch,
    and both passes differentiate the same batch.
    """

    def __init__(self, trainer: Any):
        self.trainer = trainer
        self.inputs: Any = None
        self.captured = False

    @contextlib.contextmanager
    def _patched(self, replacement: Any) -> Iterator[None]:
        shadowed = self.trainer.__dict__.get("_prepare_inputs")
        self.trainer._prepare_inputs = replacement
        try:
            yield
        finally:
            if shadowed is None:
                del self.trainer._prepare_inputs
            else:
                self.trainer._prepare_inputs = shadowed

    def capture(self) -> contextlib.AbstractContextManager[None]:
        original = self.trainer._prepare_inputs

        def prepare(inputs: Any) -> Any:
            self.inputs, self.captured = original(inputs), True
            return shallow_copy(self.inputs)

        return self._patched(prepare)

    def replay(self) -> contextlib.AbstractContextManager[None]:
        if not self.captured:  # a training_step that does not prepare its inputs through _prepare_inputs
            return contextlib.nullcontext()
        return self._patched(lambda inputs: shallow_copy(self.inputs))


def shallow_copy(inputs: Any) -> Any:
    """A fresh mapping per pass, of the same type, so a `compute_loss` that pops keys (e.g. `labels`) cannot starve
    the other pass: any mutable mapping (`dict`, a `transformers.BatchEncoding`, a `UserDict`) is copied with its
    attributes; its values (the tensors) are shared."""
    return copy.copy(inputs) if isinstance(inputs, MutableMapping) else inputs
