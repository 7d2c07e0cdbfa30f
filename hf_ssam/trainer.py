"""`SSAMTrainer`: `transformers.Trainer` with a SAM-family two-pass step."""

from __future__ import annotations

from torch import nn
from transformers import Trainer, TrainingArguments

from .arguments import SSAMTrainingArguments
from .mixin import SSAMMixin

__all__ = ["SSAMTrainer"]


class SSAMTrainer(SSAMMixin, Trainer):
    """A drop-in `transformers.Trainer` that trains with SSAM, SAM, USAM or ASAM (`SSAMMixin` + `Trainer`).

    Takes the same arguments as `Trainer`. `args` should be an `SSAMTrainingArguments`; a plain
    `TrainingArguments` is promoted with the SAM fields at their defaults (`sam_variant="ssam"`,
    `sam_rho=0.05`). For a Trainer subclass (TRL's `SFTTrainer`, `Seq2SeqTrainer`, ...) compose
    `class MyTrainer(SSAMMixin, SFTTrainer)` instead. See `SSAMMixin` for the step.

    Raises:
        ValueError: as `SSAMMixin`: DeepSpeed other than ZeRO 1–3 with `sam_sync_ascent=True` (bf16 or fp32, no
            offload), FSDP other than FSDP2 with `sam_sync_ascent=True`, an
            `SSAMOptimizer` passed as the optimizer, bad `sam_*` settings (at construction and when `train()`
            starts).
    """

    def __init__(self, model: nn.Module | None = None, args: TrainingArguments | None = None, *posargs, **kwargs):
        if args is None:
            args = SSAMTrainingArguments(output_dir="trainer_output")
        super().__init__(model, args, *posargs, **kwargs)
