"""hf_ssam: Stable Sharpness-Aware Minimization (SSAM) and the SAM family for the Hugging Face Trainer.

Replace `Trainer` with `SSAMTrainer` (and `TrainingArguments` with `SSAMTrainingArguments`),
or wrap any optimizer in `SSAMOptimizer` for a plain PyTorch loop.
"""

from . import functional
from .arguments import SSAMTrainingArguments
from .functional import VARIANTS
from .optimizer import SSAMOptimizer
from .passes import RNGState, freeze_batchnorm_stats
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
]
