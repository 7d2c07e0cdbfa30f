"""Tasks and schedules of the cost frontier, and how many passes a schedule makes."""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import _common
import torch
from torch import nn

if str(_common.REPO_ROOT) not in sys.path:  # pragma: no cover - _common puts it there
    sys.path.insert(0, str(_common.REPO_ROOT))

from recipes.demo import DigitsMLP, digits_with_label_noise  # noqa: E402  (the demo's data and model)

__all__ = ["SCHEDULES", "TASKS", "DigitsCNN", "Task", "expected_passes", "rho_factor", "schedule_settings"]


class DigitsCNN(nn.Module):
    """``_common.small_cnn`` (three 3x3 convolutions with BatchNorm, about 14k parameters) on the 8x8 digits."""

    def __init__(self) -> None:
        super().__init__()
        self.net = _common.small_cnn(10)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        logits = self.net(x.view(-1, 1, 8, 8))
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = nn.functional.cross_entropy(logits, labels)
        return out


@dataclass(frozen=True)
class Task:
    """One training problem: data, model, base optimizer (SGD, momentum 0.9, constant lr) and budget."""

    name: str
    description: str
    label_noise: float
    make_model: Callable[[], nn.Module]
    lr: float = 0.05
    rho: float = 0.05
    epochs: int = 20
    batch_size: int = 32
    max_steps: int | None = None  # overrides epochs (the quick mode)
    hessian_samples: int = 512
    hessian_max_iter: int = 100
    extra: dict[str, Any] = field(default_factory=dict)

    def data(self) -> dict[str, torch.Tensor]:
        return digits_with_label_noise(self.label_noise)

    def steps(self, train_size: int) -> int:
        return self.max_steps if self.max_steps is not None else self.epochs * math.ceil(train_size / self.batch_size)

    def quick(self, steps: int = 40) -> Task:
        return replace(self, max_steps=steps, hessian_samples=128, hessian_max_iter=10)


TASKS: dict[str, Task] = {
    "mlp": Task(
        "mlp",
        "recipes/demo.py: digits, 20 % of the training labels flipped, MLP 64-256-256-10",
        0.2,
        lambda: DigitsMLP(256),
    ),
    "cnn": Task(
        "cnn",
        "the same data, 20 % of the training labels flipped, BatchNorm CNN (_common.small_cnn, 14k parameters)",
        0.2,
        DigitsCNN,
    ),
    "mlp40": Task(
        "mlp40",
        "digits, 40 % of the training labels flipped, MLP 64-256-256-10",
        0.4,
        lambda: DigitsMLP(256),
    ),
}

#: The schedules, in table order: SSAMTrainingArguments fields (``rho_scaled``: ρ multiplied by `rho_factor`).
SCHEDULES: dict[str, dict[str, Any]] = {
    "none": {"sam_variant": "none"},
    "ssam": {},
    "ssam@2": {"sam_interval": 2},
    "ssam@5": {"sam_interval": 5},
    "ssam@2 ρ↑": {"sam_interval": 2, "rho_scaled": True},
    "ssam@5 ρ↑": {"sam_interval": 5, "rho_scaled": True},
    "ssam@5+reuse": {"sam_interval": 5, "sam_reuse": True},
    "start 0.5": {"sam_start": 0.5},
    "start 0.75": {"sam_start": 0.75},
    "start 0.5 @2+reuse": {"sam_start": 0.5, "sam_interval": 2, "sam_reuse": True},
}

#: How ρ grows with the interval k for the ``ρ↑`` schedules (the sweep, ``--sweep``, compares them).
RHO_SCALINGS: dict[str, Callable[[int], float]] = {"1": lambda k: 1.0, "sqrt": math.sqrt, "linear": float}


def rho_factor(scaling: str, interval: int) -> float:
    return RHO_SCALINGS[scaling](interval)


def schedule_settings(schedule: dict[str, Any], rho: float, scaling: str) -> dict[str, Any]:
    """The SSAMTrainingArguments of a schedule at base ρ ``rho`` (``ssam`` unless it says otherwise)."""
    settings = {"sam_variant": "ssam", "sam_rho": rho}
    settings.update({k: v for k, v in schedule.items() if k != "rho_scaled"})
    if schedule.get("rho_scaled"):
        settings["sam_rho"] = rho * rho_factor(scaling, settings.get("sam_interval", 1))
    return settings


def expected_passes(settings: dict[str, Any], steps: int) -> float:
    """Forward (and backward) passes per optimizer step the schedule makes over ``steps`` steps.

    From step ``start`` on (``sam_start``: a step, or ``ceil(fraction · steps)``), step s has two passes when
    ``(s - start) % sam_interval == 0``; every other step, reuse steps included, has one.
    """
    if settings.get("sam_variant", "ssam") == "none":
        return 1.0
    start = settings.get("sam_start", 0)
    start = math.ceil(start * steps) if isinstance(start, float) and start < 1 else int(start)
    interval = settings.get("sam_interval", 1)
    sam_steps = sum(1 for s in range(start, steps) if (s - start) % interval == 0)
    return (steps + sam_steps) / steps
