"""The two-pass step under DeepSpeed ZeRO stages 1, 2 and 3 (the Trainer with ``deepspeed=`` or an Accelerate config).

DeepSpeed keeps no gradient in ``.grad``: its engine reduces each backward's gradient into its own partitioned
storage and steps inside ``accelerator.backward`` at the accumulation boundary. `ZeroEngine` is the few things the
two-pass step needs from it, through DeepSpeed's public tensor API where there is one:

* each pass runs ``engine.backward`` as an accumulation boundary (the gradient of that pass is reduced over the
  processes: the synchronized ascent) and never steps; the optimizer steps once per accumulation window, after the
  last micro-batch (`ZeroEngine.step`);
* a pass's gradient is read with ``safe_get_full_grad`` (stages 1–2: the full gradient, assembled from the
  partitions) or ``safe_get_local_grad`` (stage 3: this process's partition) and the storage is emptied after it, so
  each pass's reading holds that pass alone;
* the micro-batches' SAM gradients are summed here and written once, at the boundary (``safe_set_full_grad`` /
  ``safe_set_local_grad``), for DeepSpeed's clipping and optimizer step;
* the weights perturbed are the ones the forward uses: the module's parameters (stages 1–2, replicated) or their
  partitions ``param.ds_tensor`` (stage 3, each process its own, with the backup partitioned like them). Under
  stage 3 the gathered parameters are released before the partitions change and the persistent ones gathered
  again after, as DeepSpeed's optimizer step does. The fp32 master weights are never touched.

`ZeroTwoPassStep` is `hf_ssam.step.TwoPassStep` for that storage: the same maths (`hf_ssam.functional`), the same
exception safety (``w`` back bitwise, the earlier micro-batches' SAM gradients kept, the storage emptied).

These parts of DeepSpeed are not all public (``ds_tensor``, the parameter coordinator's release, the persistent
parameters): `check_deepspeed_version` refuses a DeepSpeed outside the tested range, so a change upstream fails
loudly, never silently wrong.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from . import functional
from .passes import RNGState, freeze_batchnorm_stats
from .step import MicroBatchResult, TwoPassStep

__all__ = [
    "DEEPSPEED_TESTED",
    "ZeroEngine",
    "ZeroTwoPassStep",
    "check_deepspeed_version",
    "deepspeed_refusal",
]

#: The DeepSpeed releases the ZeRO step is tested with: ``>= first, < bound`` (patch releases of the tested line).
DEEPSPEED_TESTED: tuple[str, str] = ("0.19.8", "0.20")
#: Set to 1 to run with a DeepSpeed outside `DEEPSPEED_TESTED` (a warning instead of the error).
ALLOW_UNTESTED = "HF_SSAM_ALLOW_UNTESTED_DEEPSPEED"
#: The ZeRO stages the SAM step runs on.
STAGES = (1, 2, 3)


def check_deepspeed_version(version: str | None = None) -> None:
    """Raise a `ValueError` when DeepSpeed is missing or outside `DEEPSPEED_TESTED` (a warning with
    ``HF_SSAM_ALLOW_UNTESTED_DEEPSPEED=1``)."""
    if version is None:
        try:
            import deepspeed
        except ImportError:
            raise ValueError(
                "DeepSpeed is not installed: pip install 'hf_ssam[deepspeed]' (DeepSpeed "
                f">={DEEPSPEED_TESTED[0]},<{DEEPSPEED_TESTED[1]})."
            ) from None
        version = deepspeed.__version__
    from packaging.version import Version

    low, high = DEEPSPEED_TESTED
    if Version(low) <= Version(version) < Version(high):
        return
    message = (
        f"DeepSpeed {version} is outside the range the SAM step is tested with (>={low},<{high}): it reaches into "
        "DeepSpeed's partitioned gradients and parameters, which change between releases. Install "
        f"'deepspeed>={low},<{high}' (pip install 'hf_ssam[deepspeed]')"
    )
    if os.environ.get(ALLOW_UNTESTED) == "1":
        import warnings

        warnings.warn(message + f"; running anyway ({ALLOW_UNTESTED}=1).", UserWarning, stacklevel=3)
        return
    raise ValueError(message + f", or set {ALLOW_UNTESTED}=1 to run untested at your own risk.")


def _enabled(section: Any, fallback: bool) -> bool:
    value = section.get("enabled", False) if isinstance(section, Mapping) else False
    return fallback if value == "auto" else bool(value)


def _offload_device(section: Any) -> str:
    device = section.get("device", "none") if isinstance(section, Mapping) else "none"
    return str(device).lower() if device is not None else "none"


def deepspeed_refusal(source: str, config: Mapping[str, Any], args: Any, *, fp16: bool = False) -> str | None:
    """Why DeepSpeed cannot run the SAM step with ``config`` and these arguments (None when it can).

    ``args``: anything with ``sam_variant``, ``sam_sync_ascent`` and ``sam_reuse``; ``fp16``: what an ``"auto"``
    fp16 setting resolves to.
    """
    variant = f"sam_variant={args.sam_variant!r}"
    zero = config.get("zero_optimization", {}) or {}
    stage = zero.get("stage", 0)
    if stage not in STAGES:
        return (
            f"{source} with ZeRO stage {stage!r} is not supported with {variant}: the SAM step runs on ZeRO stages "
            "1, 2 and 3 (zero_optimization.stage)."
        )
    if not args.sam_sync_ascent:
        return (
            f"{source} with sam_sync_ascent=False is not supported with {variant}: ZeRO reduces every gradient "
            "inside backward(), so no process holds its own replica's gradient to perturb with. Set "
            "sam_sync_ascent=True (the perturbation from the global-batch gradient, the same step as one process on "
            "the whole batch)."
        )
    if _enabled(config.get("fp16"), fp16):
        return (
            f"{source} with fp16 is not supported with {variant}: DeepSpeed's loss scaler checks for overflow and "
            "skips steps inside its own step, which the two passes would have to share. Use bf16 "
            "(bf16.enabled: true, or bf16=True with 'auto')."
        )
    for key in ("offload_optimizer", "offload_param"):
        device = _offload_device(zero.get(key))
        if device not in ("none", "auto"):
            return (
                f"{source} with zero_optimization.{key}.device={device!r} is not supported with {variant}: the "
                "SAM step reads and writes the gradient partitions and perturbs the parameters on the device. "
                f"Remove {key} (or set its device to 'none')."
            )
    if args.sam_reuse:
        return f"{source} with sam_reuse=True is not supported with {variant}; set sam_reuse=False."
    return None


class ZeroEngine:
    """Where a pass's gradient lives under one DeepSpeed engine, and which tensors a perturbation changes."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.stage = int(engine.zero_optimization_stage())
        if self.stage not in STAGES:
            raise ValueError(f"ZeRO stage {self.stage} is not supported with the SAM step (stages 1, 2 and 3).")

    @property
    def partitioned(self) -> bool:
        """Stage 3: gradients and weights are this process's partitions (norms are all-reduced)."""
        return self.stage == 3

    def params(self) -> list[nn.Parameter]:
        """The SAM set: the module's parameters that require a gradient (each once; DeepSpeed's optimizer holds
        flat copies of them, not the parameters)."""
        return [p for p in dict.fromkeys(self.engine.module.parameters()) if p.requires_grad]

    def group(self, params: Sequence[nn.Parameter]) -> Any:
        """The process group a stage-3 partition is taken over (None below stage 3)."""
        if not self.partitioned or not params:
            return None
        return getattr(params[0], "ds_process_group", None) or torch.distributed.group.WORLD

    # ------------------------------------------------------------------------------------------ gradients

    def read(self, params: Sequence[nn.Parameter]) -> list[Tensor]:
        """The gradient the last backward reduced, one tensor per parameter (a copy: the storage is emptied)."""
        from deepspeed.utils import safe_get_full_grad, safe_get_local_grad

        get = safe_get_local_grad if self.partitioned else safe_get_full_grad
        grads = []
        for p in params:
            g = get(p)
            grads.append(torch.zeros_like(self.weight(p), dtype=torch.float32) if g is None else g.clone())
        return grads

    def clear(self, params: Sequence[nn.Parameter]) -> None:
        """Empty the gradient storage, so that the next pass's reading holds that pass alone."""
        from deepspeed.utils import safe_set_full_grad, safe_set_local_grad

        set_ = safe_set_local_grad if self.partitioned else safe_set_full_grad
        for p in params:
            set_(p, torch.zeros(self.weight(p).shape, dtype=torch.float32, device=self.weight(p).device))

    def write(self, params: Sequence[nn.Parameter], grads: Sequence[Tensor]) -> None:
        """Hand the accumulated SAM gradient to DeepSpeed's storage (what its clipping and step read)."""
        from deepspeed.utils import safe_set_full_grad, safe_set_local_grad

        set_ = safe_set_local_grad if self.partitioned else safe_set_full_grad
        for p, g in zip(params, grads):
            set_(p, g)

    # -------------------------------------------------------------------------------------------- weights

    def weight(self, p: nn.Parameter) -> Tensor:
        """The tensor of ``p`` the next forward reads: the parameter, or its stage-3 partition (flat)."""
        return p.ds_tensor.data if self.partitioned else p.data

    def weights(self, params: Sequence[nn.Parameter]) -> list[Tensor]:
        return [self.weight(p) for p in params]

    @contextlib.contextmanager
    def editing(self) -> Iterator[None]:
        """Around a change of the weights: stage 3 releases every gathered parameter first (their full copies
        would go stale) and gathers the persistent ones again after, as DeepSpeed's own optimizer step does."""
        if not self.partitioned:
            yield
            return
        optimizer = self.engine.optimizer
        optimizer.parameter_offload.partition_all_parameters()
        try:
            yield
        finally:
            persistent = list(getattr(optimizer, "persistent_parameters", []) or [])
            if persistent:
                persistent[0].all_gather(persistent)

    # ------------------------------------------------------------------------------------------- the engine

    @contextlib.contextmanager
    def backward_only(self, accelerator: Any) -> Iterator[None]:
        """``accelerator.backward`` runs ``engine.backward`` as an accumulation boundary (the gradient of this pass
        is reduced) and does not step."""
        wrapped = accelerator.deepspeed_engine_wrapped
        accelerator.deepspeed_engine_wrapped = _BackwardOnly(self.engine)
        try:
            yield
        finally:
            accelerator.deepspeed_engine_wrapped = wrapped

    def step(self) -> None:
        """The optimizer step of the accumulation window (clipping, step, zeroing; DeepSpeed's scheduler)."""
        self.engine.set_gradient_accumulation_boundary(True)
        self.engine.step()


class _BackwardOnly:
    """Stands in for Accelerate's ``DeepSpeedEngineWrapper`` during a pass: backward as a boundary, no step."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine

    def backward(self, loss: Tensor, sync_gradients: bool = True, **kwargs: Any) -> None:
        self.engine.set_gradient_accumulation_boundary(True)
        self.engine.backward(loss, **kwargs)


class ZeroTwoPassStep(TwoPassStep):
    """The two-pass step of one micro-batch under ZeRO; sums the micro-batches' SAM gradients until the boundary."""

    def __init__(self) -> None:
        super().__init__()
        self.accumulated: list[Tensor] | None = None  # Σ of this window's SAM gradients (full, or partitions)

    def run(  # type: ignore[override]
        self,
        zero: ZeroEngine,
        params: Sequence[nn.Parameter],
        first_pass: Callable[[], Tensor],
        second_pass: Callable[[], Tensor],
        *,
        variant: str,
        rho: float,
        renormalize: bool | None,
        asam_eta: float,
        unscale: Callable[[Tensor], Tensor | float],
        boundary: bool,
        replay_rng: bool = True,
        batchnorm_layers: Sequence[nn.Module] = (),
    ) -> MicroBatchResult:
        """One micro-batch; at the ``boundary`` the window's SAM gradient goes to DeepSpeed (the caller steps)."""
        params = list(params)
        group = zero.group(params)  # ZeRO-3: norms over the partitions
        weights = zero.weights(params)
        self._climbed = None
        try:
            rng = RNGState.capture() if replay_rng else None
            loss = first_pass()  # g = ∇F(w), reduced over the processes
            grads = zero.read(params)
            zero.clear(params)
            with torch.no_grad():
                grad_norm = functional.global_norm(grads, partitioned=group)  # ‖g‖ (stored units)
                grad_unscale = unscale(grad_norm)  # g = stored · u
                valid, _ = self._climb(weights, grads, grad_norm, grad_unscale, variant=variant, rho=rho,
                                       asam_eta=asam_eta, partitioned=group, editing=zero.editing)  # fmt: skip
                del grads  # w + e; g freed before the second pass
            torch.clear_autocast_cache()
            if rng is not None:
                rng.restore()  # same dropout masks in both passes
            with freeze_batchnorm_stats(list(batchnorm_layers)):
                ascent_loss = second_pass()  # g_asc = ∇F(w + e)
            ascent_grads = zero.read(params)
            zero.clear(params)
        except BaseException:
            with torch.no_grad():
                self._restore(zero.editing)  # w, exactly
                with contextlib.suppress(Exception):  # no gradient of this micro-batch is left behind
                    zero.clear(params)
            raise  # the earlier micro-batches' sum (`accumulated`) is kept

        with torch.no_grad():
            self._restore(zero.editing)  # w, exactly
            ascent_grad_norm = functional.global_norm(ascent_grads, partitioned=group)  # ‖g_asc‖ (stored units)
            gamma, renormalizes, rescale_skipped = self._renormalization(grad_norm, ascent_grad_norm, variant,
                                                                         renormalize)  # fmt: skip
            if renormalizes:
                functional.rescale_(ascent_grads, gamma)  # g_asc ← γ·g_asc
            if self.accumulated is None:
                self.accumulated = ascent_grads
            else:
                torch._foreach_add_(self.accumulated, ascent_grads)  # Σ over the micro-batches
            if boundary:
                zero.write(params, self.accumulated)
                self.accumulated = None
        skipped = ~valid | rescale_skipped if renormalizes else ~valid
        return MicroBatchResult(
            loss, ascent_loss, grad_norm * grad_unscale, ascent_grad_norm * grad_unscale, gamma, skipped
        )

    def reset(self) -> None:
        """Forget a window's partial sum (a new `train()`)."""
        self.accumulated = None
