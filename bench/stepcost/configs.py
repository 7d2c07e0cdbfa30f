"""Every configuration of the step-cost benchmark, by group, and the runner that trains each."""

from __future__ import annotations

from typing import Any

from torch import nn

from .amp_loops import AMP_CONFIGS, AmpLoopRunner
from .loop_runs import LOOP_CONFIGS, LoopRunner
from .timing import Baton
from .trainer_runs import GA_CONFIGS, TRAINER_CONFIGS, TrainerRunner
from .workloads import Workload

__all__ = ["ALL_CONFIGS", "GA_CONFIGS", "GROUPS", "make_runner"]

#: The timed configurations by group (``--configs``), in table order.
GROUPS: dict[str, tuple[str, ...]] = {"trainer": tuple(TRAINER_CONFIGS), "loop": LOOP_CONFIGS, "amp": AMP_CONFIGS}
ALL_CONFIGS: tuple[str, ...] = tuple(c for configs in GROUPS.values() for c in configs)


def make_runner(
    config: str, workload: Workload, model: nn.Module, dataset: list, steps: int, tmp: str, baton: Baton | None = None
) -> Any:
    """The runner of one configuration (its ``run()`` trains ``steps`` steps)."""
    if config.startswith("amp:"):
        cls: type = AmpLoopRunner
    elif config.startswith("loop:"):
        cls = LoopRunner
    else:
        cls = TrainerRunner
    return cls(config, workload, model, dataset, steps, tmp, baton)
