"""hf_ssam: Stable Sharpness-Aware Minimization (SSAM) and the SAM family for the Hugging Face Trainer.

Replace `Trainer` with `SSAMTrainer` (and `TrainingArguments` with `SSAMTrainingArguments`), compose
`SSAMMixin` with any Trainer subclass (`class T(SSAMMixin, SFTTrainer)`, args from `sam_arguments(SFTConfig)`),
wrap any optimizer in `SSAMOptimizer` for a plain PyTorch loop, or replace ``accelerator.backward(loss)`` with
`SSAMBackward` in a hand-written Accelerate loop. The Trainer classes are imported on first use, so
`from hf_ssam import SSAMOptimizer` does not load `transformers`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from . import functional
from .backward import SSAMBackward
from .optimizer import SSAMOptimizer
from .passes import RNGState, freeze_batchnorm_stats
from .variants import VARIANTS

if TYPE_CHECKING:
    from .arguments import SSAMTrainingArguments, sam_arguments
    from .mixin import SSAMMixin
    from .reporting import METRIC_NAMES
    from .trainer import SSAMTrainer

__version__ = "0.1.0"

__all__ = [
    "METRIC_NAMES",
    "RNGState",
    "SSAMBackward",
    "SSAMMixin",
    "SSAMOptimizer",
    "SSAMTrainer",
    "SSAMTrainingArguments",
    "VARIANTS",
    "__version__",
    "freeze_batchnorm_stats",
    "functional",
    "sam_arguments",
    "sharpness",
]

_LAZY = {
    "METRIC_NAMES": ".reporting",
    "SSAMMixin": ".mixin",
    "SSAMTrainer": ".trainer",
    "SSAMTrainingArguments": ".arguments",
    "sam_arguments": ".arguments",
}


def __getattr__(name: str) -> Any:
    if name == "sharpness":  # a submodule that needs transformers: imported on first use
        return importlib.import_module(".sharpness", __name__)
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
