"""`SSAMTrainingArguments`: `TrainingArguments` plus the SAM-family knobs."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from transformers import TrainingArguments

from .variants import NO_SAM, VARIANT_CHOICES, check_sam_config

__all__ = ["SSAMTrainingArguments"]


@dataclass
class SSAMTrainingArguments(TrainingArguments):
    r"""
    `transformers.TrainingArguments` plus the arguments of a SAM-family step. Every field can be set from the
    command line and from YAML through `transformers.HfArgumentParser`.

    Parameters:
        sam_variant (`str`, *optional*, defaults to `"ssam"`):
            The perturbation and rescale applied each step. `"ssam"`: SSAM (unnormalized perturbation
            `e = ρ·g`, then the descent gradient is rescaled to `‖g‖`); `"sam"`: SAM* of Foret et al.
            (`e = ρ·g/‖g‖`); `"usam"`: unnormalized SAM (`e = ρ·g`); `"asam"`: adaptive SAM
            (`e = ρ·T²g/‖Tg‖`, `T = |w| + η`); `"none"`: plain single-pass training.
        sam_rho (`float`, *optional*, defaults to `0.05`):
            Radius ρ of the perturbation, `>= 0`. `0` reproduces the base optimizer exactly.
        sam_renormalize (`bool` or `None`, *optional*, defaults to `None`):
            Rescale the descent gradient by `γ = ‖g‖/‖g_asc‖`. `None`: on for `"ssam"`, off otherwise. `True` adds
            it to `"sam"`, `"usam"` or `"asam"`; `False` with `"ssam"` is an error.
        sam_asam_eta (`float`, *optional*, defaults to `0.01`):
            ASAM's η in `T = |w| + η`, `>= 0`. Only used by `"asam"`.
        sam_sync_ascent (`bool`, *optional*, defaults to `False`):
            With several processes: `False` perturbs each replica with its own local gradient (m-sharpness, no
            communication in the ascent pass); `True` all-reduces the ascent gradient so that every replica
            perturbs with the global-batch gradient (same result as one process with the global batch).
        sam_interval (`int`, *optional*, defaults to `1`):
            Run the two-pass step every `sam_interval` optimizer steps and plain single-pass steps in between
            (`1` = every step). Values above 1 trade some of the sharpness regularization for speed.
        sam_replay_rng (`bool`, *optional*, defaults to `True`):
            Replay the random number generators in the second pass so that both passes see the same dropout masks
            (both gradients then come from the same function).
    """

    sam_variant: str = field(
        default="ssam",
        metadata={
            "help": "SAM-family variant: ssam (SSAM), sam (SAM*, normalized), usam (unnormalized SAM), "
            "asam (adaptive SAM), none (plain training).",
            "choices": list(VARIANT_CHOICES),
        },
    )
    sam_rho: float = field(default=0.05, metadata={"help": "Perturbation radius rho (>= 0)."})
    sam_renormalize: bool | None = field(
        default=None,
        metadata={
            "help": "Rescale the descent gradient to the norm of the ascent gradient. Default: on for ssam only.",
            "choices": [None, True, False],
        },
    )
    sam_asam_eta: float = field(default=0.01, metadata={"help": "ASAM's eta in T = |w| + eta (>= 0)."})
    sam_sync_ascent: bool = field(
        default=False,
        metadata={
            "help": "Multi-process: all-reduce the ascent gradient (global-batch perturbation) instead of "
            "perturbing each replica with its local gradient."
        },
    )
    sam_interval: int = field(
        default=1,
        metadata={"help": "Run the two-pass SAM step every N optimizer steps, plain steps in between (>= 1)."},
    )
    sam_replay_rng: bool = field(
        default=True,
        metadata={"help": "Replay the RNG in the second pass so both passes see the same dropout masks."},
    )

    def __post_init__(self) -> None:
        # DeepSpeed first: TrainingArguments would otherwise fail on a missing `deepspeed` package before this check.
        if self.deepspeed and self.sam_variant != NO_SAM:
            raise ValueError(
                f"deepspeed={self.deepspeed!r} is not supported with sam_variant={self.sam_variant!r}: DeepSpeed "
                "steps its engine inside backward(), which breaks the two-pass step. Supported: single process, DDP "
                "(accelerate launch / torchrun). Use sam_variant='none' to train with DeepSpeed without SAM."
            )
        super().__post_init__()
        check_sam_config(self.sam_variant, self.sam_rho, self.sam_renormalize, self.sam_asam_eta)
        if isinstance(self.sam_interval, bool) or not isinstance(self.sam_interval, int) or self.sam_interval < 1:
            raise ValueError(f"sam_interval={self.sam_interval!r} is invalid; it must be an integer >= 1.")
        if self.fsdp and self.sam_variant != NO_SAM:
            raise ValueError(
                f"fsdp={self.fsdp!r} is not supported with sam_variant={self.sam_variant!r}: the two-pass step is "
                "implemented for unsharded parameters. Supported: single process, DDP (accelerate launch / torchrun)."
            )

    @property
    def sam_enabled(self) -> bool:
        """Whether the two-pass step runs at all (`sam_variant != "none"`)."""
        return self.sam_variant != NO_SAM

    @classmethod
    def from_training_arguments(cls, args: TrainingArguments, **sam_kwargs) -> SSAMTrainingArguments:
        """Promote a plain `TrainingArguments` to `SSAMTrainingArguments` (SAM fields at their defaults)."""
        values = {f.name: getattr(args, f.name) for f in fields(TrainingArguments) if f.init}
        return cls(**values, **sam_kwargs)
