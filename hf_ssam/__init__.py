"""hf_ssam: Stable Sharpness-Aware Minimization (SSAM) and the SAM family for the Hugging Face Trainer.

Replace `Trainer` with `SSAMTrainer` (and `TrainingArguments` with `SSAMTrainingArguments`), or wrap any
optimizer in `SSAMOptimizer` for a plain PyTorch loop. The Trainer classes are imported on first use, so
`from hf_ssam import SSAMOptimizer` does not load `transformers`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from . import functional
from .functional import VARIANTS
from .optimizer import SSAMOptimizer
from .passes import RNGState, freeze_batchnorm_stats

if TYPE_CHECKING:
    from .arguments import SSAMTrainingArguments
    from .trainer import METRIC_NAMES, SSAMTrainer

__version__ = "0.1.0"

__all__ = [
    "METRIC_NAMES",
    "RNGState",
    "SSAMOptimizer",
    "SSAMTrainer",
    "SSAMTrainingArguments",
    "VARIANTS",
    "__version__",
    "freeze_batchnorm_stats",
    "functional",
    "sharpness",
]

_LAZY = {"SSAMTrainer": ".trainer", "METRIC_NAMES": ".trainer", "SSAMTrainingArguments": ".arguments"}


def __getattr__(name: str) -> Any:
    if name == "sharpness":  # a submodule that needs transformers: imported on first use
        return importlib.import_module(".sharpness", __name__)
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
