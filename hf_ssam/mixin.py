"""`SSAMMixin`: the SAM-family two-pass step for `transformers.Trainer` and any of its subclasses.

Only `training_step` changes. Each call runs the Trainer's own forward/backward twice through
``self.accelerator`` and leaves the SAM gradient in ``.grad``: clipping, the base optimizer's step, the
scheduler, logging and checkpoints stay the Trainer's (or the subclass's).
"""

from __future__ import annotations

import contextlib
import inspect
import os
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainingArguments

from . import functional, normalization
from .arguments import SSAMTrainingArguments, _fsdp_refusal, _SAMArgumentsMixin, sam_arguments
from .engines import (
    all_reduce_mean_,
    all_reduce_tensors_mean_,
    is_ddp,
    is_fsdp2,
    loss_scale_of,
    pass_sync_context,
    scaler_enabled,
)
from .normalization import LossKind
from .optimizer import SSAMOptimizer
from .passes import PreparedInputs, batchnorm_modules, leave_no_trace, shallow_copy
from .reporting import CARD_HEADING, MetricsAccumulator, model_card_section
from .step import TwoPassStep
from .zero import ZeroEngine, ZeroTwoPassStep, check_deepspeed_version, deepspeed_refusal

__all__ = ["SSAMMixin"]

#: Trainers that generate or sample inside the step (online RL): their second pass is not the same function.
_ONLINE_RL_TRAINERS = ("GRPOTrainer", "RLOOTrainer", "OnlineDPOTrainer", "PPOTrainer", "XPOTrainer",
                       "NashMDTrainer", "GKDTrainer", "DistillationTrainer")  # fmt: skip


class SSAMMixin:
    """The SAM-family two-pass step for any `transformers.Trainer` subclass: place it **before** the Trainer class.

    ```python
    class SSAMSFTTrainer(SSAMMixin, SFTTrainer):
        pass
    ```

    Only `training_step` changes (plus the `sam/*` logs, the construction checks and a SAM section in the model
    card). Each call runs the Trainer's own `training_step` twice through ``self.accelerator``, so loss scaling,
    accumulation normalization, autocast, `compute_loss` overrides and the subclass's own `training_step` wrappers
    are exactly the Trainer's; the SAM gradient is left in ``.grad`` for the Trainer's clipping and optimizer step.

    `args` without the `sam_*` fields are promoted to `sam_arguments(type(args))`, keeping every field of their own
    class. The optimizer is the base optimizer (AdamW unless `optim` or `optimizers=` say otherwise).

    Each SAM step (from `sam_start` on, every `sam_interval` steps; with `sam_reuse` the steps in between run one
    pass and add the direction kept at the last SAM step), for every micro-batch (`hf_ssam.step.TwoPassStep`):

    1. the gradient accumulated by earlier micro-batches is set aside;
    2. first pass, at `w`: `g = ∇F(w)` (the Trainer's own `training_step`);
    3. `w ← w + e` with `e = ρ·d(g, w)`; the weights are saved first;
    4. second pass, at `w + e`, on the same prepared batch (inputs are prepared once: a trainer that generates
       while preparing inputs does not generate again), same dropout masks, BatchNorm statistics untouched, and
       no trace left on the trainer (metrics or counters recorded by `compute_loss` are put back): `g_asc`;
    5. `w` is copied back exactly; with renormalization `g_asc ← (‖g‖/‖g_asc‖)·g_asc`;
    6. the set-aside gradient is added back, so the accumulated gradient is the sum of per-micro-batch
       SAM gradients, normalized like the Trainer's.

    Logs gain `sam/grad_norm`, `sam/ascent_grad_norm`, `sam/gamma`, `sam/ascent_loss` (loss at `w + e`)
    and `sam/skipped` (micro-batches whose perturbation or rescale was skipped for a zero or non-finite norm), and
    `sam/reused` with `sam_reuse`. An exception in either pass leaves the weights at `w` bitwise and the gradient
    of earlier micro-batches intact.

    Under DeepSpeed ZeRO 1–3 (`sam_sync_ascent=True`) the same step runs on DeepSpeed's gradient storage
    (`hf_ssam.zero.ZeroTwoPassStep`): each pass is a reduced backward that does not step, the micro-batches' SAM
    gradients are summed and handed to the engine at the accumulation boundary, and the engine steps once.

    Raises:
        TypeError: at class creation, when `SSAMMixin` comes after a Trainer class in the bases.
        ValueError: at construction for DeepSpeed other than ZeRO 1–3 with `sam_sync_ascent=True` (bf16 or fp32, no
            offload, no `sam_reuse`; a DeepSpeed version outside the tested range), FSDP other than FSDP2 with
            `sam_sync_ascent=True` (and bf16 or fp32), online-RL trainers that generate inside the step, an
            `SSAMOptimizer` passed as the optimizer, an optimizer whose parameter groups carry SAM settings (`rho`,
            `variant`, ...: one `sam_*` setting applies to every parameter), and bad `sam_*` settings (also when
            `train()` starts).
    """

    args: SSAMTrainingArguments

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        mro = cls.__mro__
        mixin_at = mro.index(SSAMMixin)
        misplaced = [c for c in mro[1:mixin_at] if issubclass(c, Trainer) and not issubclass(c, SSAMMixin)]
        if misplaced or Trainer not in mro or mro.index(Trainer) < mixin_at:
            raise TypeError(
                f"{cls.__name__}: SSAMMixin must come before the Trainer class in the bases, e.g. "
                f"class {cls.__name__}(SSAMMixin, {(misplaced or [Trainer])[0].__name__}); otherwise the Trainer's "
                "own training_step runs and no SAM step happens."
            )

    def __init__(self, *posargs: Any, **kwargs: Any) -> None:
        _refuse_online_rl(type(self))
        bound = inspect.signature(super().__init__).bind_partial(*posargs, **kwargs)
        if bound.arguments.get("args") is not None:  # `args` is not always the second parameter (DPOTrainer)
            bound.arguments["args"] = _promote(bound.arguments["args"])
        posargs, kwargs = bound.args, bound.kwargs
        super().__init__(*posargs, **kwargs)
        if not isinstance(self.args, _SAMArgumentsMixin):  # the subclass built its own default arguments
            self.args = _promote(self.args)
        if isinstance(self.optimizer, SSAMOptimizer):
            raise ValueError(
                "optimizers=(SSAMOptimizer(...), ...) is not supported: SSAMTrainer runs the two passes itself and "
                "takes the *base* optimizer, e.g. optimizers=(torch.optim.SGD(model.parameters(), lr=0.1), None); "
                "set the SAM settings with the sam_* arguments (sam_variant, sam_rho, ...)."
            )
        self._check_deepspeed()
        self._check_fsdp()
        if self.optimizer is not None and not self.is_deepspeed_enabled:
            _refuse_group_sam_settings(self.optimizer)
        self._sam_param_cache: tuple[Any, list[nn.Parameter], list[nn.Parameter]] | None = None
        self._sam_loss_kind: tuple[nn.Module, LossKind] | None = None
        self._sam_bn_cache: tuple[nn.Module, list[nn.Module]] | None = None
        self._sam_step = TwoPassStep()
        self._sam_zero_step = ZeroTwoPassStep()  # DeepSpeed ZeRO
        self._sam_zero: ZeroEngine | None = None
        self._sam_direction: tuple[list[int], list[torch.Tensor]] | None = None  # v of the last SAM step (reuse)
        self._sam_direction_sum: list[torch.Tensor] | None = None
        self._sam_metrics = MetricsAccumulator()

    # ----------------------------------------------------------------------------------------- the step

    def training_step(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor | Any],
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor:
        """One micro-batch of a SAM-family step; returns the loss at `w`, exactly as `Trainer` reports it."""
        args = self.args
        kind = self._kind_of_step()
        k = self.current_gradient_accumulation_steps
        self._sam_metrics.tracks_reuse = args.sam_enabled and args.sam_reuse
        if kind == "plain":
            if self._sam_metrics.tracks_reuse:
                self._sam_metrics.count_step(k, self.args.device)
            return super().training_step(model, inputs, num_items_in_batch)

        zero = self._zero_engine() if self.is_deepspeed_enabled else None
        trainer_pass = super().training_step  # the Trainer's own forward/backward (or the subclass's wrapper)
        if kind == "reuse":
            params, others = self._sam_param_sets(model)
            return self._reuse_step(model, params, others, lambda: trainer_pass(model, inputs, num_items_in_batch), k)
        if args.sam_reuse:
            self._sam_direction = None  # the last direction is not used by a SAM step: its memory is freed first
        prepared = PreparedInputs(self)

        def pass_context() -> contextlib.AbstractContextManager[None]:
            return zero.backward_only(self.accelerator) if zero is not None else self._pass_sync_context(model)

        def first_pass() -> torch.Tensor:
            with pass_context(), prepared.capture():
                return trainer_pass(model, shallow_copy(inputs), num_items_in_batch)

        def second_pass() -> torch.Tensor:  # same prepared batch, no trace of it left on the trainer
            with pass_context(), prepared.replay(), leave_no_trace(self):
                return trainer_pass(model, shallow_copy(inputs), num_items_in_batch)

        def unscale(like: torch.Tensor) -> torch.Tensor:
            kind = self._loss_kind(model, inputs, prepared, num_items_in_batch)
            return normalization.grad_unscale(
                self, kind, inputs, num_items_in_batch, k, self._loss_scale(), like, self._synced_ascent(model)
            )

        settings = dict(
            variant=args.sam_variant, rho=args.sam_rho, renormalize=args.sam_renormalize, asam_eta=args.sam_asam_eta,
            unscale=unscale, replay_rng=args.sam_replay_rng, batchnorm_layers=self._batchnorm_layers(model),
        )  # fmt: skip
        if zero is not None:  # DeepSpeed ZeRO: its gradient storage; one optimizer step at the boundary
            boundary = self.accelerator.sync_gradients
            result = self._sam_zero_step.run(zero, zero.params(), first_pass, second_pass, boundary=boundary,
                                             **settings)  # fmt: skip
            if boundary:
                zero.step()
        else:
            params, others = self._sam_param_sets(model)
            result = self._sam_step.run(
                params, others, first_pass, second_pass, keep_orthogonal=args.sam_reuse,
                loss_scaled=scaler_enabled(getattr(self.accelerator, "scaler", None)), **settings,
            )  # fmt: skip
            self._all_reduce_local_ascent(model, params, others)
            if result.orthogonal is not None:
                self._keep_direction(model, params, result.orthogonal, k)
        self._sam_metrics.add(
            result.grad_norm, result.ascent_grad_norm, result.gamma, result.ascent_loss, result.skipped, k
        )
        return result.loss

    def _kind_of_step(self) -> str:
        """``"sam"`` (two passes), ``"reuse"`` (one pass plus the kept direction) or ``"plain"``, for this step."""
        args = self.args
        if not args.sam_enabled:
            return "plain"
        step, start = self.state.global_step, args.sam_start_step(self.state.max_steps)
        if step < start:
            return "plain"
        if (step - start) % args.sam_interval == 0:
            return "sam"
        return "reuse" if args.sam_reuse else "plain"

    def _reuse_step(self, model, params, others, trainer_pass, k: int) -> torch.Tensor:
        """One pass at ``w``; this micro-batch's ``g ← g + α·(‖g‖/‖v‖)·v`` with the direction kept at the last SAM
        step (plain before the first one, counted in `sam/skipped`)."""
        args = self.args

        def one_pass() -> torch.Tensor:
            with self._pass_sync_context(model):
                return trainer_pass()

        renormalize = functional.uses_renormalization(args.sam_variant, args.sam_renormalize)
        direction = self._sam_direction[1] if self._sam_direction is not None else None
        if direction is not None and self._sam_direction[0] != [id(p) for p in params]:
            direction = None  # the SAM set changed (unfreezing): plain until the next SAM step
        loss, used = self._sam_step.run_reuse(
            params, one_pass, direction, alpha=args.sam_reuse_alpha, renormalize=renormalize
        )
        self._all_reduce_local_ascent(model, params, others)
        self._sam_metrics.count_step(k, self.args.device, reused=used)
        return loss

    def _keep_direction(self, model: nn.Module, params: list[nn.Parameter], v: list[torch.Tensor], k: int) -> None:
        """Accumulate the micro-batches' ``v`` (their mean); at the boundary it becomes the step's direction."""
        with torch.no_grad():
            torch._foreach_div_(v, k)  # v_i / k: the mean over the micro-batches
            if self._sam_direction_sum is None:
                self._sam_direction_sum = v
            else:
                torch._foreach_add_(self._sam_direction_sum, v)
            if self.accelerator.sync_gradients:
                mean = self._sam_direction_sum
                if not self.args.sam_sync_ascent and is_ddp(model):  # the same direction on every replica
                    all_reduce_tensors_mean_(mean, self._reduce_mean)
                self._sam_direction = ([id(p) for p in params], mean)
                self._sam_direction_sum = None

    def _all_reduce_local_ascent(self, model: nn.Module, params: list, others: list) -> None:
        """Local ascent under DDP: one all-reduce of the accumulated gradient at the accumulation boundary."""
        if not self.args.sam_sync_ascent and self.accelerator.sync_gradients and is_ddp(model):
            all_reduce_mean_(params + [p for p in others if p.grad is not None], self._reduce_mean)

    def _reduce_mean(self, flat: torch.Tensor) -> torch.Tensor:
        return self.accelerator.reduce(flat, reduction="mean")

    # -------------------------------------------------------------------------------------- helpers

    def _check_deepspeed(self) -> None:
        """DeepSpeed (``deepspeed=`` or an Accelerate config): a tested version, and a ZeRO config the step runs on."""
        if not (self.args.sam_enabled and self.is_deepspeed_enabled):
            return
        check_deepspeed_version()
        config = self.accelerator.state.deepspeed_plugin.deepspeed_config
        refusal = deepspeed_refusal("DeepSpeed", config, self.args, fp16=self.args.fp16)
        if refusal:
            raise ValueError(refusal)

    def _zero_engine(self) -> ZeroEngine:
        engine = self.accelerator.deepspeed_engine_wrapped.engine
        if self._sam_zero is None or self._sam_zero.engine is not engine:
            self._sam_zero = ZeroEngine(engine)
        return self._sam_zero

    def _check_fsdp(self) -> None:
        """FSDP enabled by an Accelerate config (not by `fsdp=`): the same checks as the arguments'."""
        if self.args.sam_enabled and self.is_fsdp_enabled:
            version = getattr(self.accelerator.state.fsdp_plugin, "fsdp_version", 1)
            fp16 = self.accelerator.mixed_precision == "fp16"
            refusal = _fsdp_refusal("The Accelerate FSDP config", version, self.args, fp16=fp16)
            if refusal:
                raise ValueError(refusal)

    def _sam_param_sets(self, model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """The SAM set and the rest: parameters that require a gradient, read at every step (gradual unfreezing).

        The SAM set is what the optimizer updates (each parameter once) and is perturbed; the rest of the model's
        parameters keep the plain gradient of the first pass, as in training without SAM.
        """
        optimizer = self.optimizer
        key = (optimizer, model, tuple(len(group["params"]) for group in optimizer.param_groups))
        cache = self._sam_param_cache
        if cache is None or cache[0][0] is not optimizer or cache[0][1] is not model or cache[0][2] != key[2]:
            _refuse_group_sam_settings(optimizer)
            seen: set[int] = set()
            updated = []
            for group in optimizer.param_groups:
                for p in group["params"]:
                    if id(p) not in seen:
                        seen.add(id(p))
                        updated.append(p)
            rest = [p for p in dict.fromkeys(model.parameters()) if id(p) not in seen]
            cache = self._sam_param_cache = (key, updated, rest)
        return [p for p in cache[1] if p.requires_grad], [p for p in cache[2] if p.requires_grad]

    def _loss_kind(self, model: nn.Module, inputs: Any, prepared: PreparedInputs, num_items_in_batch: Any) -> LossKind:
        """How the loss is normalized: from the trainer's flags, or measured once per model (`probe_loss`)."""
        trusted = normalization.trusted_loss_kind(self, num_items_in_batch)
        if trusted is not None:
            return trusted
        if self._sam_loss_kind is None or self._sam_loss_kind[0] is not self.model:
            batch = prepared.inputs if prepared.captured else self._prepare_inputs(shallow_copy(inputs))
            kind = normalization.probe_loss(self, model, batch, num_items_in_batch, self._batchnorm_layers(model))
            normalization.report(self, model, kind)
            self._sam_loss_kind = (self.model, kind)
        return self._sam_loss_kind[1]

    def _synced_ascent(self, model: nn.Module) -> bool:
        """Whether the first pass's gradient is averaged over processes (synchronized ascent, DDP or FSDP2)."""
        return self.args.sam_sync_ascent and (is_ddp(model) or is_fsdp2(model) or self.is_deepspeed_enabled)

    @property
    def _sam_backup(self) -> list[torch.Tensor] | None:
        """The buffers holding ``w`` during the second pass (allocated at the first SAM step)."""
        return self._sam_step.backup

    def _batchnorm_layers(self, model: nn.Module) -> list[nn.Module]:
        if self._sam_bn_cache is None or self._sam_bn_cache[0] is not model:
            self._sam_bn_cache = (model, batchnorm_modules(model))
        return self._sam_bn_cache[1]

    def _loss_scale(self) -> float | torch.Tensor:
        """The fp16 loss scale multiplying the gradients (1 without a scaler), as a device tensor: no host sync."""
        return loss_scale_of(getattr(self.accelerator, "scaler", None))

    def _pass_sync_context(self, model: nn.Module) -> contextlib.AbstractContextManager[None]:
        """DDP gradient sync for one pass: off for a local ascent, forced on for a synchronized one (always, FSDP2)."""
        return pass_sync_context(model, self.args.sam_sync_ascent, self.accelerator.no_sync)

    def sam_metrics(self) -> dict[str, float]:
        """The SAM metrics accumulated since the last training log, averaged over processes (and reset)."""
        return self._sam_metrics.pop(self.accelerator, self.args.device)

    def train(self, *args: Any, **kwargs: Any) -> Any:
        """`Trainer.train`, after checking the SAM settings again and clearing metrics of an earlier run."""
        self.args.check_sam_settings()  # fields set after construction get the construction-time checks
        self._check_deepspeed()
        self._check_fsdp()
        self._sam_zero_step.reset()
        self._sam_metrics.clear()  # no metrics of an earlier train() in the first log of this one
        self._sam_direction = self._sam_direction_sum = None  # a resumed run loads its own (`_load_rng_state`)
        return super().train(*args, **kwargs)

    def _save_rng_state(self, output_dir: str) -> None:
        """The checkpoint's RNG state, and the reused SAM direction ``v`` of this process (its shards under FSDP2)."""
        super()._save_rng_state(output_dir)
        if self._sam_direction is not None:
            local = [t.to_local() if hasattr(t, "to_local") else t for t in self._sam_direction[1]]
            torch.save(local, os.path.join(output_dir, _DIRECTION_FILE.format(self.args.process_index)))

    def _load_rng_state(self, checkpoint: str | None) -> None:
        """`Trainer._load_rng_state` on resume, and the reused SAM direction saved with the checkpoint."""
        super()._load_rng_state(checkpoint)
        path = (
            None if checkpoint is None else os.path.join(checkpoint, _DIRECTION_FILE.format(self.args.process_index))
        )
        if path is None or not os.path.isfile(path):
            return
        params, _ = self._sam_param_sets(self.model_wrapped)
        local = torch.load(path, map_location="cpu", weights_only=True)
        direction = []
        for p, t in zip(params, local):
            if hasattr(p, "to_local"):  # an FSDP2 shard: rebuilt on the parameter's mesh and placements
                from torch.distributed.tensor import DTensor

                direction.append(DTensor.from_local(t.to(p.device), p.device_mesh, p.placements))
            else:
                direction.append(t.to(p.device))
        self._sam_direction = ([id(p) for p in params], direction)

    def _hp_search_setup(self, trial: Any) -> None:
        super()._hp_search_setup(trial)
        self.args.check_sam_settings()  # sam_* fields as search dimensions: same checks as at construction

    def create_model_card(self, *args: Any, **kwargs: Any) -> None:
        """`Trainer.create_model_card`, with the SAM settings and the SSAM citation added to the card.

        A model without a `transformers` config (a timm model, a plain `nn.Module`), for which the Trainer writes no
        card, gets a card holding the SAM section alone.
        """
        path = os.path.join(self.args.output_dir, "README.md")
        if getattr(self.accelerator.unwrap_model(self.model), "config", None) is not None:
            super().create_model_card(*args, **kwargs)
        elif self.is_world_process_zero():
            os.makedirs(self.args.output_dir, exist_ok=True)
            with open(path, "w", encoding="utf-8") as f:
                f.write(f"# {os.path.basename(os.path.normpath(self.args.output_dir))}\n")
        if not self.is_world_process_zero() or not os.path.isfile(path):
            return
        with open(path, encoding="utf-8") as f:
            card = f.read()
        if CARD_HEADING not in card:
            with open(path, "a", encoding="utf-8") as f:
                f.write(model_card_section(self.args))

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        """Add the SAM metrics to every training log (the ones carrying `loss`)."""
        if "loss" in logs and self.args.sam_enabled:
            logs.update(self.sam_metrics())
        super().log(logs, *args, **kwargs)


def _promote(args: TrainingArguments) -> TrainingArguments:
    """`args` with the `sam_*` fields (at their defaults), keeping its own class's fields: `sam_arguments(type)`."""
    if isinstance(args, _SAMArgumentsMixin):
        return args
    return sam_arguments(type(args)).from_training_arguments(args)


def _refuse_online_rl(cls: type) -> None:
    online = [c.__name__ for c in cls.__mro__ if c.__name__ in _ONLINE_RL_TRAINERS]
    if online:
        raise ValueError(
            f"{cls.__name__} builds on {online[0]}, which generates completions or samples from the policy while "
            "preparing each step's inputs; SSAMMixin supports trainers whose step is a fixed function of a fixed "
            "batch (Trainer, SFTTrainer, DPOTrainer, Seq2SeqTrainer, SentenceTransformerTrainer, ...)."
        )


#: Where a checkpoint keeps the reused SAM direction of each process.
_DIRECTION_FILE = "sam_direction_{}.pt"

#: Parameter-group keys of `SSAMOptimizer`; a base optimizer's group holding one it does not define asks for a
#: per-group SAM setting, which the Trainer does not take (one `sam_*` setting for every parameter).
_SAM_GROUP_KEYS = ("variant", "rho", "renormalize", "asam_eta")


def _refuse_group_sam_settings(optimizer: torch.optim.Optimizer) -> None:
    defaults = getattr(optimizer, "defaults", {})
    for index, group in enumerate(optimizer.param_groups):
        keys = [key for key in _SAM_GROUP_KEYS if key in group and key not in defaults]
        if keys:
            raise ValueError(
                f"The optimizer's parameter group {index} sets {', '.join(f'{k}={group[k]!r}' for k in keys)}: "
                "SSAMTrainer and SSAMMixin take one SAM setting for every parameter, from the sam_* arguments "
                "(sam_rho, sam_variant, ...), and do not read per-group SAM settings. Remove the key (set sam_rho "
                "instead), or use SSAMOptimizer in a plain loop for per-group settings. Keys of the base optimizer "
                "itself (Adadelta's rho) are not affected."
            )
