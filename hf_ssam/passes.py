"""Making the second forward pass see the same function as the first.

Both passes of a SAM step must differentiate the *same* mini-batch loss: same dropout masks
(`RNGState` replays the random number generators) and no second update of BatchNorm's
running statistics (`freeze_batchnorm_stats`). Both work for plain PyTorch loops too.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["RNGState", "batchnorm_modules", "freeze_batchnorm_stats"]


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
