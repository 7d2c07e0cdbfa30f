"""The `sam_*` arguments: `SSAMTrainingArguments`, and `sam_arguments` for any `TrainingArguments` subclass."""

from __future__ import annotations

import dataclasses
import math
import os
import typing
from dataclasses import dataclass, field, fields
from typing import Any, TypeVar

from transformers import TrainingArguments

from .variants import NO_SAM, VARIANT_CHOICES, _is_finite_non_negative, check_sam_config
from .zero import check_deepspeed_version, deepspeed_refusal

__all__ = ["SSAMTrainingArguments", "sam_arguments"]

_ArgsT = TypeVar("_ArgsT", bound=TrainingArguments)


class _SAMArgumentsMixin:
    """The validation shared by every class `sam_arguments` makes (placed before the `TrainingArguments` class)."""

    sam_variant: str
    sam_rho: float
    sam_renormalize: bool | None
    sam_asam_eta: float
    sam_sync_ascent: bool
    sam_interval: int
    sam_replay_rng: bool
    sam_start: float
    sam_reuse: bool
    sam_reuse_alpha: float

    def __post_init__(self) -> None:
        # DeepSpeed first: TrainingArguments would otherwise fail on a missing or untested `deepspeed` less clearly.
        if self.deepspeed and self.sam_variant != NO_SAM:
            check_deepspeed_version()
        fsdp = self.fsdp
        super().__post_init__()
        # `TrainingArguments.__post_init__` converts `fsdp` (`"full_shard"` becomes True); the refusals quote what
        # the user wrote, as long as the field still holds what that became.
        self._fsdp_as_given = (self.fsdp, fsdp)
        self.check_sam_settings()

    def check_sam_settings(self) -> None:
        """Validate the `sam_*` fields; raises a `ValueError` naming the field, the value and what is allowed.

        Runs at construction and again when training starts, so values set afterwards (by a hyperparameter
        search or by hand) get the same checks. A `sam_rho` or `sam_asam_eta` given as a string that spells a
        number (the command line gives strings, and YAML reads `5e-2` as one) is converted to a float first; then
        `sam_variant`, `sam_rho`, `sam_renormalize` and `sam_asam_eta` go through the check `SSAMOptimizer` runs
        (`hf_ssam.variants.check_sam_config`), which refuses the same values. `sam_sync_ascent` and `sam_replay_rng`
        must be bools (`HfArgumentParser` turns `--sam_sync_ascent false` and YAML's `false` into one); a string
        such as `"false"` is refused, not read as true.
        """
        for name in ("sam_rho", "sam_asam_eta", "sam_reuse_alpha", "sam_start"):
            value = getattr(self, name)
            if isinstance(value, str):
                try:
                    setattr(self, name, float(value))
                except ValueError:
                    raise ValueError(f"{name}={value!r} is invalid; it must be a finite number >= 0.") from None
        check_sam_config(self.sam_variant, self.sam_rho, self.sam_renormalize, self.sam_asam_eta)
        if isinstance(self.sam_interval, bool) or not isinstance(self.sam_interval, int) or self.sam_interval < 1:
            raise ValueError(f"sam_interval={self.sam_interval!r} is invalid; it must be an integer >= 1.")
        _check_start(self.sam_start)
        if not _is_finite_non_negative(self.sam_reuse_alpha):
            raise ValueError(f"sam_reuse_alpha={self.sam_reuse_alpha!r} is invalid; it must be a finite number >= 0.")
        for name in ("sam_sync_ascent", "sam_replay_rng", "sam_reuse"):
            value = getattr(self, name)
            if not isinstance(value, bool):  # "false" and None would otherwise act as True and False
                raise ValueError(
                    f"{name}={value!r} is invalid; choose one of [True, False] (a bool, not {type(value).__name__})."
                )
        if self.sam_reuse and self.sam_interval == 1:
            raise ValueError(
                "sam_reuse=True with sam_interval=1 is invalid: every step is a SAM step, so there is no step to "
                "reuse the SAM direction on. Set sam_interval > 1 (e.g. 5) or sam_reuse=False."
            )
        config = getattr(getattr(self, "hf_deepspeed_config", None), "config", None)
        if self.deepspeed and self.sam_variant != NO_SAM and config is not None:
            refusal = deepspeed_refusal(f"deepspeed={_shown(self.deepspeed)}", config, self, fp16=self.fp16)
            if refusal:
                raise ValueError(refusal)
        if self.fsdp and self.sam_variant != NO_SAM:
            version = _fsdp_version(self)
            converted, given = getattr(self, "_fsdp_as_given", (None, None))
            shown = given if converted is not None and converted == self.fsdp else self.fsdp
            refusal = _fsdp_refusal(f"fsdp={shown!r}", version, self, fp16=self.fp16)
            if refusal and version is not None and version != 2 and not hasattr(self, "fsdp_plugin_args"):
                refusal += (
                    " transformers 4.x ignores fsdp_config['fsdp_version'] and builds the FSDP version that "
                    "Accelerate reads from the environment: FSDP_VERSION=2 (as `accelerate launch` with "
                    "fsdp_version: 2 in its config sets it)."
                )
            if refusal:
                raise ValueError(refusal)

    def sam_start_step(self, max_steps: int) -> int:
        """The first optimizer step that may be a SAM step: `sam_start` as a step, or as a fraction of ``max_steps``
        rounded up (as `warmup_steps` converts a ratio: ``ceil(fraction · max_steps)``)."""
        start = self.sam_start
        if isinstance(start, float) and start < 1:
            return math.ceil(start * max_steps)
        return int(start)

    @property
    def sam_enabled(self) -> bool:
        """Whether the two-pass step runs at all (`sam_variant != "none"`)."""
        return self.sam_variant != NO_SAM

    @classmethod
    def from_training_arguments(cls, args: TrainingArguments, **sam_kwargs: Any) -> Any:
        """Promote `args` (an instance of this class's base) to this class; SAM fields at their defaults."""
        values = {f.name: getattr(args, f.name) for f in fields(args) if f.init}
        return cls(**values, **sam_kwargs)

    def __reduce__(self) -> tuple[Any, ...]:
        # Classes made by `sam_arguments` are not module attributes: pickle (checkpoints' training_args.bin)
        # rebuilds them from their base class instead.
        return (_rebuild, (_base_of(type(self)), self.__dict__.copy()))


@dataclass
class SSAMTrainingArguments(_SAMArgumentsMixin, TrainingArguments):
    r"""
    `transformers.TrainingArguments` plus the arguments of a SAM-family step. Every field can be set from the
    command line and from YAML through `transformers.HfArgumentParser`. `sam_arguments(cls)` adds the same
    fields to any other `TrainingArguments` subclass (`SFTConfig`, `Seq2SeqTrainingArguments`, ...).

    Parameters:
        sam_variant (`str`, *optional*, defaults to `"ssam"`):
            The perturbation and rescale applied each step. `"ssam"`: SSAM (unnormalized perturbation
            `e = ρ·g`, then `g_asc` is rescaled to `‖g‖`); `"sam"`: SAM* of Foret et al.
            (`e = ρ·g/‖g‖`); `"usam"`: unnormalized SAM (`e = ρ·g`); `"asam"`: adaptive SAM
            (`e = ρ·T²g/‖Tg‖`, `T = |w| + η`); `"none"`: plain single-pass training.
        sam_rho (`float`, *optional*, defaults to `0.05`):
            Radius ρ of the perturbation, `>= 0`. `0` reproduces the base optimizer exactly. `g` is the gradient of
            one micro-batch's own mean loss (per token when the Trainer normalizes by tokens), so ρ means the same
            whatever the accumulation steps, the token counts and the number of processes.
        sam_renormalize (`bool` or `None`, *optional*, defaults to `None`):
            Rescale `g_asc` to `‖g‖` (`sam/grad_norm`), i.e. multiply it by `γ = ‖g‖/‖g_asc‖`. `None` (leave it
            unset): on for `"ssam"`, off otherwise. `True` adds it to `"sam"`, `"usam"` or `"asam"`; `False` with
            `"ssam"` is an error.
        sam_asam_eta (`float`, *optional*, defaults to `0.01`):
            ASAM's η in `T = |w| + η`, `>= 0`. Only used by `"asam"`.
        sam_sync_ascent (`bool`, *optional*, defaults to `False`):
            With several processes: `False` perturbs each replica with its own local gradient (m-sharpness, no
            communication in the first pass); `True` all-reduces the first-pass gradient so that every replica
            perturbs with the global-batch gradient (same result as one process with the global batch). FSDP2
            requires `True`: its gradients are reduce-scattered, so no process holds a gradient of its own.
        sam_interval (`int`, *optional*, defaults to `1`):
            Run the two-pass step every `sam_interval` optimizer steps and plain single-pass steps in between
            (`1` = every step). Values above 1 trade some of the sharpness regularization for speed.
        sam_replay_rng (`bool`, *optional*, defaults to `True`):
            Replay the random number generators in the second pass so that both passes see the same dropout masks
            (both gradients then come from the same function).
        sam_start (`int` or `float`, *optional*, defaults to `0`):
            Optimizer steps before it are plain single-pass steps (late-phase SAM). An int `>= 0` is a step; a float
            in `[0, 1)` is a fraction of the run's optimizer steps, rounded up (`ceil(sam_start · max_steps)`, as a
            warmup ratio is converted); a whole float (`100.0`, as the command line gives it) is a step. From step
            `start` on, step `s` is a SAM step when `(s − start) % sam_interval == 0`.
        sam_reuse (`bool`, *optional*, defaults to `False`):
            Reuse the SAM direction between SAM steps (LookSAM-style): each SAM step keeps
            `v = g_asc − (⟨g_asc, g⟩/‖g‖²)·g` (the part of `g_asc` orthogonal to `g`; the mean over micro-batches),
            and the other steps from `start` on run one pass and use `g + α·(‖g‖/‖v‖)·v`, rescaled to `‖g‖` when
            the variant renormalizes. Requires `sam_interval > 1`. Costs one copy of the trainable parameters.
        sam_reuse_alpha (`float`, *optional*, defaults to `0.7`):
            α, the weight of the reused direction, `>= 0`.

    Raises:
        ValueError: when built (and again when training starts, for values set afterwards), naming the field, the
            value and what is allowed: a `sam_variant` outside the choices; `sam_rho` or `sam_asam_eta` not a finite
            number >= 0 (booleans refused; a string that spells a number, as YAML gives `5e-2`, is converted first);
            `sam_renormalize` other than None/True/False, or False with `"ssam"`; `sam_sync_ascent` or
            `sam_replay_rng` not a bool (`"false"` and `None` refused); `sam_interval` not an integer >= 1;
            `sam_start` negative, a bool or a float >= 1 that is not whole; `sam_reuse` not a bool, or True with
            `sam_interval=1`; `sam_reuse_alpha` not a finite number >= 0;
            DeepSpeed missing or outside the tested versions, or a DeepSpeed config the SAM step does not run on
            (ZeRO stage other than 1–3, `sam_sync_ascent=False`, fp16, offload, `sam_reuse`); FSDP other than FSDP2
            with `sam_sync_ascent=True`.
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
            "help": "Rescale g_asc to ||g|| (sam/grad_norm). Leave unset for the default: on for ssam only.",
            "choices": [True, False],
        },
    )
    sam_asam_eta: float = field(default=0.01, metadata={"help": "ASAM's eta in T = |w| + eta (>= 0)."})
    sam_sync_ascent: bool = field(
        default=False,
        metadata={
            "help": "Multi-process: all-reduce the first-pass gradient g (global-batch perturbation) instead of "
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
    sam_start: float = field(
        default=0,
        metadata={
            "help": "Plain steps before SAM starts (late-phase SAM): an optimizer step (int >= 0), or a fraction "
            "in [0, 1) of the run's optimizer steps, rounded up."
        },
    )
    sam_reuse: bool = field(
        default=False,
        metadata={
            "help": "Between SAM steps, reuse the part of the SAM gradient orthogonal to g (LookSAM-style): one "
            "pass, g + alpha*(||g||/||v||)*v. Needs sam_interval > 1."
        },
    )
    sam_reuse_alpha: float = field(
        default=0.7, metadata={"help": "alpha, the weight of the reused SAM direction (>= 0)."}
    )


_MADE: dict[type, type] = {TrainingArguments: SSAMTrainingArguments}


def _check_start(start: Any) -> None:
    whole = isinstance(start, float) and math.isfinite(start) and start.is_integer()
    if (
        isinstance(start, bool)
        or not isinstance(start, (int, float))
        or not math.isfinite(start)
        or start < 0
        or (isinstance(start, float) and start >= 1 and not whole)
    ):
        raise ValueError(
            f"sam_start={start!r} is invalid; it must be an optimizer step (an integer >= 0) or a fraction of the "
            "run's steps (a float in [0, 1))."
        )


def _fsdp_version(args: Any) -> int | None:
    """The FSDP version the Trainer builds for ``args.fsdp`` (None: FSDP on XLA).

    transformers 5 reads it from ``fsdp_config["fsdp_version"]`` into ``fsdp_plugin_args`` (None on XLA);
    transformers 4.x has no ``fsdp_plugin_args``: it hands FSDP to Accelerate through ``FSDP_*`` environment
    variables, ignores ``fsdp_config["fsdp_version"]``, and Accelerate builds ``FSDP_VERSION`` (default 1).
    """
    if hasattr(args, "fsdp_plugin_args"):
        plugin_args = args.fsdp_plugin_args
        return None if plugin_args is None else plugin_args.get("fsdp_version")
    if (args.fsdp_config or {}).get("xla"):
        return None
    return int(os.environ.get("FSDP_VERSION", "1"))


def _shown(deepspeed: Any) -> str:
    """A DeepSpeed config as the messages quote it: a path as given, a dict as its ZeRO stage."""
    if isinstance(deepspeed, dict):
        return f"{{... 'zero_optimization': {(deepspeed.get('zero_optimization') or {})!r} ...}}"
    return repr(deepspeed)


def _fsdp_refusal(source: str, version: int | None, args: Any, fp16: bool) -> str | None:
    """Why FSDP cannot run the SAM step with these settings (None when it can: FSDP2 with the synchronized ascent).

    Shared by the argument checks (`fsdp=`) and the trainer's (an Accelerate FSDP config).
    """
    variant = f"sam_variant={args.sam_variant!r}"
    if version is None:
        return f"{source} on XLA is not supported with {variant}; use FSDP2: fsdp_config={{'fsdp_version': 2}}."
    if version != 2:
        return (
            f"{source} with fsdp_version={version!r} is not supported with {variant}: the SAM step runs on FSDP2's "
            "DTensor shards only. Use FSDP2: fsdp_config={'fsdp_version': 2} (fsdp_version: 2 in an Accelerate "
            "config), or sam_variant='none' for plain training."
        )
    if not args.sam_sync_ascent:
        return (
            f"{source} (FSDP2) with sam_sync_ascent=False is not supported with {variant}: FSDP reduce-scatters "
            "every gradient, so each process only holds its shard of the gradient averaged over all processes and "
            "there is no per-replica gradient to perturb with. Set sam_sync_ascent=True (the perturbation from the "
            "global-batch gradient, the same step as one process on the whole batch)."
        )
    if fp16:
        return (
            f"{source} (FSDP2) with fp16=True is not supported with {variant}: the fp16 loss scaler is not handled "
            "on sharded gradients. Use bf16=True."
        )
    return None


def sam_arguments(args_cls: type[_ArgsT]) -> type[_ArgsT]:
    """`args_cls` plus every `sam_*` field of `SSAMTrainingArguments` (help, choices and validation included).

    ```python
    from trl import SFTConfig
    SSAMSFTConfig = sam_arguments(SFTConfig)
    args = SSAMSFTConfig(output_dir="out", sam_rho=0.05)
    ```

    The result is a dataclass subclass of `args_cls`, parseable by `HfArgumentParser`; the same input class always
    gives the same class, named `"SSAM" + args_cls.__name__`. A class that already has the fields is returned as is.

    Raises:
        TypeError: `args_cls` is not a `TrainingArguments` subclass.
    """
    if not (isinstance(args_cls, type) and issubclass(args_cls, TrainingArguments)):
        raise TypeError(f"sam_arguments() takes a TrainingArguments subclass, got {args_cls!r}.")
    if issubclass(args_cls, _SAMArgumentsMixin):
        return args_cls
    made = _MADE.get(args_cls)
    if made is None:
        hints = typing.get_type_hints(SSAMTrainingArguments)
        sam_fields = [
            (f.name, hints[f.name], field(default=f.default, metadata=dict(f.metadata)))
            for f in fields(SSAMTrainingArguments)
            if f.name.startswith("sam_")
        ]
        base_doc = (args_cls.__doc__ or "").rstrip()
        sam_doc = SSAMTrainingArguments.__doc__[SSAMTrainingArguments.__doc__.index("    Parameters:") :]
        made = dataclasses.make_dataclass(
            f"SSAM{args_cls.__name__}",
            sam_fields,
            bases=(_SAMArgumentsMixin, args_cls),
            namespace={
                "__doc__": f"{base_doc}\n\n    With the SAM-family arguments of `hf_ssam`:\n{sam_doc}",
                "__module__": __name__,
            },
        )
        _MADE[args_cls] = made
    return made


def _base_of(cls: type) -> type:
    """The `TrainingArguments` class that `sam_arguments` extended to make `cls`."""
    for base, made in _MADE.items():
        if made is cls:
            return base
    return cls  # a user's own subclass of a made class: pickled by reference


def _rebuild(base: type, state: dict[str, Any]) -> Any:
    cls = sam_arguments(base) if issubclass(base, TrainingArguments) else base
    obj = cls.__new__(cls)
    obj.__dict__.update(state)
    return obj
