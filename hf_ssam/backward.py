"""The two-pass step of one micro-batch around *a* backward, once; `SSAMBackward` is its face for hand-written loops.

`TwoPassStep.run` is the whole SAM-family step of one micro-batch, whatever runs the passes: the Trainer's own
`training_step` (`SSAMMixin`), `accelerator.backward` or ``loss.backward()`` (`SSAMBackward`):

1. the gradient accumulated by earlier micro-batches is set aside;
2. first pass, at ``w``: ``g = ∇F(w)``;
3. ``w ← w + e`` with ``e = ρ·d(g, w)`` (the weights are saved first);
4. second pass, at ``w + e``, same RNG (dropout masks), BatchNorm statistics untouched: ``g_asc``;
5. ``w`` is copied back exactly; with renormalization ``g_asc ← (‖g‖/‖g_asc‖)·g_asc``;
6. the set-aside gradient is added back: ``.grad`` accumulates the micro-batches' SAM gradients.

Whatever raises in between (an out-of-memory error, ``KeyboardInterrupt``), ``w`` comes back bitwise, the gradient of
earlier micro-batches is left as it was and the step can be run again: the exception propagates unchanged.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from . import functional
from .engines import (
    all_reduce_mean_,
    is_ddp,
    is_fsdp2,
    loss_scale_of,
    pass_sync_context,
    scaler_enabled,
    torch_reduce_mean,
)
from .functional import PERTURBATIONS
from .passes import RNGState, batchnorm_modules, freeze_batchnorm_stats
from .reporting import MetricsAccumulator
from .variants import NO_SAM, check_sam_config

__all__ = ["MicroBatchResult", "SSAMBackward", "TwoPassStep"]


@dataclass
class MicroBatchResult:
    """What one micro-batch's step measured, on the device: losses as the passes returned them, norms in units of g."""

    loss: Tensor
    ascent_loss: Tensor
    grad_norm: Tensor  # ‖g‖
    ascent_grad_norm: Tensor  # ‖g_asc‖
    gamma: Tensor  # γ = ‖g‖/‖g_asc‖
    skipped: Tensor  # the perturbation or the rescale was skipped (zero or non-finite norm)
    orthogonal: list[Tensor] | None = None  # v = g_asc − (⟨g_asc, g⟩/‖g‖²)·g in units of g, one per param (reuse)


class TwoPassStep:
    """The two-pass step of one micro-batch (see the module docstring); keeps the weight backup between steps."""

    def __init__(self) -> None:
        self.backup: list[Tensor] | None = None
        self._climbed: list[Tensor] | None = None  # the weights now at w + e (their saved w is `backup`)

    def _backup_buffers(self, params: list[Tensor]) -> list[Tensor]:
        """Buffers for the saved weights, allocated once and reused (re-made if the set of params changes)."""
        backup = self.backup
        if backup is None or len(backup) != len(params) or any(b.shape != p.shape for b, p in zip(backup, params)):
            backup = self.backup = [torch.empty_like(p) for p in params]
        return backup

    def _climb(
        self,
        weights: list[Tensor],
        grads: list[Tensor],
        grad_norm: Tensor,
        grad_unscale: Tensor | float,
        *,
        variant: str,
        rho: float,
        asam_eta: float,
        partitioned: Any = None,
        editing: Callable[[], Any] = contextlib.nullcontext,
    ) -> tuple[Tensor, list[Tensor]]:
        """``w ← w + e`` in place, ``w`` saved first; returns whether ``e`` was applied (on the device) and the
        saved weights. ``grads`` hold ``e`` afterwards. ``editing``: a context around the change of the weights."""
        at = weights
        if PERTURBATIONS[variant] == "asam" and any(w.dtype != g.dtype for w, g in zip(weights, grads)):
            at = [w.to(g.dtype) for w, g in zip(weights, grads)]  # T = |w| + η next to g (bf16 weights, fp32 g)
        scale = functional.perturbation_scale(
            variant, rho, grad_norm, params=at, grads=grads, asam_eta=asam_eta, grad_unscale=grad_unscale,
            partitioned=partitioned,
        )  # fmt: skip
        del at
        valid = torch.isfinite(scale) & torch.isfinite(grad_norm) & (grad_norm > 0)  # on device: no sync
        scale = torch.where(valid, scale, torch.zeros_like(scale))  # zero or non-finite ‖g‖: e = 0
        functional.zero_unless_(grads, valid)  # skipped: e = 0 exactly, even where g holds inf/NaN (fp16)
        backup = self._backup_buffers(weights)
        with editing():
            functional.save_(backup, weights)  # save w
            self._climbed = weights  # from here on, an exception restores w
            functional.ascend_(weights, grads, scale, variant=variant, asam_eta=asam_eta, overwrite_grads=True)
        return valid, backup

    def _restore(self, editing: Callable[[], Any] = contextlib.nullcontext) -> None:
        """``w`` back, exactly, if the weights were moved (also after an exception); no cast of ``w + e`` kept."""
        if self._climbed is not None:
            with editing():
                functional.restore_(self._climbed, self.backup)  # w, exactly
            self._climbed = None
        torch.clear_autocast_cache()

    @staticmethod
    def _renormalization(
        grad_norm: Tensor, ascent_grad_norm: Tensor, variant: str, renormalize: bool | None
    ) -> tuple[Tensor, bool, Tensor]:
        """``γ = ‖g‖/‖g_asc‖``, whether the variant rescales by it, and whether the rescale was skipped."""
        gamma, rescale_skipped = functional.renormalization_factor(grad_norm, ascent_grad_norm)
        return gamma, functional.uses_renormalization(variant, renormalize), rescale_skipped

    def run(
        self,
        params: Sequence[nn.Parameter],
        others: Sequence[nn.Parameter],
        first_pass: Callable[[], Tensor],
        second_pass: Callable[[], Tensor],
        *,
        variant: str,
        rho: float,
        renormalize: bool | None,
        asam_eta: float,
        unscale: Callable[[Tensor], Tensor | float],
        replay_rng: bool = True,
        batchnorm_layers: Sequence[nn.Module] = (),
        loss_scaled: bool = False,
        keep_orthogonal: bool = False,
    ) -> MicroBatchResult:
        """One micro-batch: ``.grad`` of ``params`` gains its SAM gradient, ``others`` their plain gradient.

        Args:
            params: the SAM set, perturbed (each parameter once).
            others: parameters outside it that may receive a gradient: they keep the first pass's, as in plain
                training.
            first_pass, second_pass: run forward and backward on the micro-batch (the same one) and return the loss.
            unscale: ``u`` with ``g = u · stored gradient``, given the stored ‖g‖ (called once, after the first pass).
            loss_scaled: an fp16 loss scaler checks the final gradient: an overflow of the first pass (g not finite,
                so ``e = 0``) is handed on to it as NaN in the SAM gradient, so that it skips the step even when the
                second pass did not overflow.
            keep_orthogonal: also return ``v``, the part of ``g_asc`` orthogonal to ``g`` (reused between SAM
                steps).
        """
        params, others = list(params), list(others)
        stash = _take_grads(params + others)  # gradient of earlier micro-batches, set aside
        self._climbed = None
        try:
            rng = RNGState.capture() if replay_rng else None
            loss = first_pass()  # g = ∇F(w)
            plain = _take_grads(others)  # outside the SAM set: the plain gradient of this micro-batch
            with torch.no_grad():
                with_grad = [p for p in params if p.grad is not None]
                grads = [p.grad for p in with_grad]
                grad_norm = functional.global_norm(grads)  # ‖g‖ (stored units)
                grad_unscale = unscale(grad_norm)  # g = stored · u
                kept = [t.clone() for t in grads] if keep_orthogonal else None  # g, for v (one more copy)
                valid, _ = self._climb(with_grad, grads, grad_norm, grad_unscale, variant=variant, rho=rho,
                                       asam_eta=asam_eta)  # w + e  # fmt: skip
                for p in with_grad:  # g is no longer needed: freed before the second pass (peak memory)
                    p.grad = None
                del grads
            torch.clear_autocast_cache()  # an autocast region around both passes must not reuse casts of w
            if rng is not None:
                rng.restore()  # same dropout masks in both passes
            with freeze_batchnorm_stats(list(batchnorm_layers)):
                ascent_loss = second_pass()  # g_asc = ∇F(w + e)
        except BaseException:
            with torch.no_grad():
                self._restore()  # w, exactly
                for p in params + others:
                    p.grad = None  # this micro-batch's partial gradients
                _give_back_grads(params + others, stash)  # the earlier micro-batches', as they were
            raise

        with torch.no_grad():
            self._restore()  # w, exactly; no cast of w + e kept
            orthogonal = None
            if kept is not None:
                at_w_plus_e = [p.grad if p.grad is not None else torch.zeros_like(p) for p in with_grad]
                functional.orthogonal_part_(kept, at_w_plus_e, grad_norm)  # v = g_asc − (⟨g_asc, g⟩/‖g‖²)·g
                v = kept
                functional.rescale_(v, torch.as_tensor(grad_unscale, device=grad_norm.device))  # in units of g
                by_param = {id(p): t for p, t in zip(with_grad, v)}
                orthogonal = [by_param.get(id(p), None) for p in params]
                orthogonal = [torch.zeros_like(p) if t is None else t for p, t in zip(params, orthogonal)]
                del kept, v
            with_grad = [p for p in params if p.grad is not None]
            ascent_grads = [p.grad for p in with_grad]
            ascent_grad_norm = functional.global_norm(ascent_grads)  # ‖g_asc‖ (stored units)
            gamma, renormalizes, rescale_skipped = self._renormalization(grad_norm, ascent_grad_norm, variant,
                                                                         renormalize)  # fmt: skip
            factor = gamma if renormalizes else None  # g_asc ← γ·g_asc
            if loss_scaled:  # × 1, or × NaN after a first-pass overflow: the scaler then skips the step
                overflow = torch.where(torch.isfinite(grad_norm), 1.0, float("nan")).to(gamma.dtype)
                factor = overflow if factor is None else factor * overflow
            if factor is not None:
                functional.rescale_(ascent_grads, factor)  # one pass over the gradients
            for p in others:
                p.grad = None  # a parameter outside the SAM set drops the second pass's gradient ...
            _give_back_grads(others, plain)  # ... and keeps the plain gradient of the first pass
            _give_back_grads(params + others, stash)  # + earlier micro-batches
        skipped = ~valid | rescale_skipped if renormalizes else ~valid
        return MicroBatchResult(
            loss, ascent_loss, grad_norm * grad_unscale, ascent_grad_norm * grad_unscale, gamma, skipped, orthogonal
        )

    def run_reuse(
        self,
        params: Sequence[nn.Parameter],
        one_pass: Callable[[], Tensor],
        direction: Sequence[Tensor] | None,
        *,
        alpha: float,
        renormalize: bool,
    ) -> tuple[Tensor, Tensor]:
        """One micro-batch of a step between SAM steps: one pass at ``w``, then ``g ← g + α·(‖g‖/‖v‖)·v`` for this
        micro-batch's ``g`` (``direction`` is ``v``, one tensor per param; None: a plain pass). Returns the loss and
        whether ``v`` was used. An exception leaves the gradient of earlier micro-batches as it was."""
        params = list(params)
        stash = _take_grads(params)  # earlier micro-batches, set aside: the direction applies to this one's g
        try:
            loss = one_pass()
        except BaseException:
            for p in params:
                p.grad = None
            _give_back_grads(params, stash)
            raise
        with torch.no_grad():
            if direction is None:
                used = torch.zeros((), dtype=torch.bool)
            else:
                pairs = [(p.grad, v) for p, v in zip(params, direction) if p.grad is not None]
                used = functional.add_reused_direction_(
                    [g for g, _ in pairs], [v for _, v in pairs], alpha, renormalize
                )  # g + α·(‖g‖/‖v‖)·v
            _give_back_grads(params, stash)
        return loss, used


# ------------------------------------------------------------------------------------ gradient bookkeeping


def _take_grads(params: list[nn.Parameter]) -> list[Tensor | None] | None:
    """Move the accumulated `.grad` tensors out of the parameters (no copy); None if there are none."""
    if all(p.grad is None for p in params):
        return None
    stash = [p.grad for p in params]
    for p in params:
        p.grad = None
    return stash


def _give_back_grads(params: list[nn.Parameter], stash: list[Tensor | None] | None) -> None:
    """`.grad ← .grad + stash` (the stash tensor is reused where the pass left no gradient)."""
    if stash is None:
        return
    targets, extra = [], []
    for p, s in zip(params, stash):
        if s is None:
            continue
        if p.grad is None:
            p.grad = s
        else:
            targets.append(p.grad)
            extra.append(s)
    if targets:
        torch._foreach_add_(targets, extra)


# ------------------------------------------------------------------------------------------- SSAMBackward


class SSAMBackward:
    r"""The SAM-family step for a hand-written loop: replaces ``accelerator.backward(loss)`` or ``loss.backward()``.

    ```python
    # doc: fragment
    sam_backward = SSAMBackward(model, optimizer, accelerator=accelerator, variant="ssam", rho=0.05)
    for batch in loader:
        with accelerator.accumulate(model):
            loss = sam_backward(lambda: loss_fn(model, batch))  # was: accelerator.backward(loss_fn(model, batch))
            optimizer.step(); lr_scheduler.step(); optimizer.zero_grad()
    ```

    Each call runs both passes on one micro-batch (at ``w``, then at ``w + e``, same dropout masks, BatchNorm
    statistics updated once) and **adds** the micro-batch's SAM gradient to ``.grad``, normalized like
    ``accelerator.backward``: divided by the accumulation steps, scaled by the fp16 loss scale when Accelerate or
    ``grad_scaler`` uses one. ρ is in units of that micro-batch's own mean-loss gradient, as in `SSAMTrainer`. The
    base optimizer steps as usual (``grad_scaler.step(optimizer)`` with a scaler). No host synchronisation happens
    in the call; `metrics` reads the ``sam/*`` values when asked.

    Args:
        model (`nn.Module`): The model the loop trains (after `accelerator.prepare`, if any).
        optimizer (`torch.optim.Optimizer`): The *base* optimizer the loop steps (prepared or not; never an
            `SSAMOptimizer`). The parameters it updates that require a gradient are perturbed (read at every call);
            other parameters of ``model`` keep their plain gradient.
        accelerator (`accelerate.Accelerator`, *optional*): Runs the backward (``accelerator.backward``), and gives
            the accumulation steps, the fp16 scaler and the DDP/FSDP2 gradient sync. `None` for a plain loop.
        variant (`str`, defaults to `"ssam"`): `"ssam"`, `"sam"`, `"usam"`, `"asam"`, or `"none"` (a plain backward).
        rho (`float`, defaults to 0.05): The radius ρ, `>= 0`.
        renormalize (`bool` or `None`): Rescale ``g_asc`` to ``‖g‖``; `None`: on for `"ssam"` only.
        asam_eta (`float`, defaults to 0.01): ASAM's η.
        sync_ascent (`bool`, defaults to `False`): With several processes, `False` perturbs each replica with its
            own gradient (the first pass under ``no_sync``; one all-reduce of the accumulated SAM gradient at the
            accumulation boundary); `True` all-reduces both passes, also between boundaries (the same step as one
            process on the global micro-batch). FSDP2 requires `True`.
        accumulation_steps (`int`, defaults to 1): Without ``accelerator``: micro-batches per optimizer step (the
            loss is divided by it). With one, set ``Accelerator(gradient_accumulation_steps=...)`` instead.
        grad_scaler (`torch.amp.GradScaler`, *optional*): Without ``accelerator``: the fp16 loss scaler of the loop.
        replay_rng (`bool`, defaults to `True`): The second pass draws the same dropout masks as the first.

    Raises:
        ValueError: a bad `variant`, `rho`, `renormalize` or `asam_eta` (the checks of `SSAMOptimizer` and
            `SSAMTrainingArguments`), non-bool switches, `accumulation_steps` not an integer >= 1 or given with an
            ``accelerator``, ``grad_scaler`` with an ``accelerator``, an `SSAMOptimizer` as ``optimizer``, DeepSpeed,
            FSDP1, and FSDP2 with `sync_ascent=False` or fp16.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        accelerator: Any = None,
        variant: str = "ssam",
        rho: float = 0.05,
        renormalize: bool | None = None,
        asam_eta: float = 0.01,
        sync_ascent: bool = False,
        accumulation_steps: int = 1,
        grad_scaler: Any = None,
        replay_rng: bool = True,
    ) -> None:
        check_sam_config(variant, rho, renormalize, asam_eta, prefix="")
        for name, value in (("sync_ascent", sync_ascent), ("replay_rng", replay_rng)):
            if not isinstance(value, bool):
                raise ValueError(
                    f"{name}={value!r} is invalid; choose one of [True, False] (a bool, not {type(value).__name__})."
                )
        if isinstance(accumulation_steps, bool) or not isinstance(accumulation_steps, int) or accumulation_steps < 1:
            raise ValueError(f"accumulation_steps={accumulation_steps!r} is invalid; it must be an integer >= 1.")
        _refuse_sam_optimizer(optimizer)
        if accelerator is not None:
            _refuse_unsupported_accelerator(accelerator, model, sync_ascent)
            if accumulation_steps != 1:
                raise ValueError(
                    f"accumulation_steps={accumulation_steps} is for a loop without an accelerator; with one, set "
                    "Accelerator(gradient_accumulation_steps=...) and run each micro-batch in "
                    "accelerator.accumulate(model)."
                )
            if grad_scaler is not None:
                raise ValueError(
                    "grad_scaler is for a loop without an accelerator; Accelerate keeps its own scaler "
                    "(Accelerator(mixed_precision='fp16'))."
                )
        elif is_fsdp2(model) and not sync_ascent:
            raise ValueError(_FSDP2_LOCAL)
        self.model, self.optimizer, self.accelerator = model, optimizer, accelerator
        self.variant, self.rho, self.renormalize, self.asam_eta = variant, rho, renormalize, asam_eta
        self.sync_ascent, self.replay_rng = sync_ascent, replay_rng
        self.accumulation_steps, self.grad_scaler = accumulation_steps, grad_scaler
        self._step = TwoPassStep()
        self._metrics = MetricsAccumulator()
        self._micro_batches = 0  # completed calls: the accumulation boundary of a loop without an accelerator
        self._param_cache: tuple[tuple, list[nn.Parameter], list[nn.Parameter]] | None = None
        self._batchnorm = batchnorm_modules(model)

    # ------------------------------------------------------------------------------------------- the call

    def __call__(self, loss_fn: Callable[[], Tensor]) -> Tensor:
        """Both passes of one micro-batch: ``loss_fn()`` runs the forward and returns the mean loss (not yet
        backpropagated). Returns the loss at ``w``, detached."""
        if self.variant == NO_SAM:
            loss = loss_fn()
            self._backward(loss)
            return loss.detach()
        params, others = self._param_sets()
        k = self._steps_per_update()

        def one_pass() -> Tensor:
            with pass_sync_context(self.model, self.sync_ascent, self._no_sync()):
                loss = loss_fn()
                self._backward(loss)
            return loss.detach()

        result = self._step.run(
            params, others, one_pass, one_pass, variant=self.variant, rho=self.rho, renormalize=self.renormalize,
            asam_eta=self.asam_eta, replay_rng=self.replay_rng, batchnorm_layers=self._batchnorm,
            loss_scaled=scaler_enabled(self._scaler()),
            unscale=lambda like: like.new_tensor(k) / loss_scale_of(self._scaler()),  # stored = scale · g / k
        )  # fmt: skip
        self._micro_batches += 1
        if not self.sync_ascent and self._at_boundary() and is_ddp(self.model):
            reduce_mean = torch_reduce_mean
            if self.accelerator is not None:
                reduce_mean = lambda flat: self.accelerator.reduce(flat, reduction="mean")  # noqa: E731
            all_reduce_mean_(params + [p for p in others if p.grad is not None], reduce_mean)
        self._metrics.add(result.grad_norm, result.ascent_grad_norm, result.gamma, result.ascent_loss / k,
                          result.skipped, k)  # fmt: skip
        return result.loss

    def metrics(self) -> dict[str, float]:
        """``sam/grad_norm``, ``sam/ascent_grad_norm``, ``sam/gamma``, ``sam/ascent_loss`` and ``sam/skipped``
        averaged since the last call (over processes with an accelerator); empty when nothing ran. Reads the
        device (a host synchronisation): call it when logging."""
        device = next(iter(self.model.parameters())).device
        return self._metrics.pop(self.accelerator, device)

    # -------------------------------------------------------------------------------------------- helpers

    def _param_sets(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        groups = self.optimizer.param_groups
        key = tuple(len(group["params"]) for group in groups)
        if self._param_cache is None or self._param_cache[0] != key:
            seen: set[int] = set()
            updated = []
            for group in groups:
                for p in group["params"]:
                    if id(p) not in seen:
                        seen.add(id(p))
                        updated.append(p)
            rest = [p for p in dict.fromkeys(self.model.parameters()) if id(p) not in seen]
            self._param_cache = (key, updated, rest)
        _, updated, rest = self._param_cache
        return [p for p in updated if p.requires_grad], [p for p in rest if p.requires_grad]

    def _steps_per_update(self) -> int:
        if self.accelerator is not None:
            return self.accelerator.gradient_accumulation_steps
        return self.accumulation_steps

    def _scaler(self) -> Any:
        return getattr(self.accelerator, "scaler", None) if self.accelerator is not None else self.grad_scaler

    def _no_sync(self) -> Callable[[nn.Module], Any] | None:
        return self.accelerator.no_sync if self.accelerator is not None else None

    def _at_boundary(self) -> bool:
        if self.accelerator is not None:
            return self.accelerator.sync_gradients
        return self._micro_batches % self.accumulation_steps == 0

    def _backward(self, loss: Tensor) -> None:
        if self.accelerator is not None:
            self.accelerator.backward(loss)  # divides by the accumulation steps, scales for fp16
            return
        loss = loss / self.accumulation_steps
        (self.grad_scaler.scale(loss) if self.grad_scaler is not None else loss).backward()


_FSDP2_LOCAL = (
    "sync_ascent=False is not supported under FSDP2: FSDP reduce-scatters every gradient, so each process only "
    "holds its shard of the gradient averaged over all processes and there is no per-replica gradient to perturb "
    "with. Set sync_ascent=True (the perturbation from the global-batch gradient)."
)


def _refuse_sam_optimizer(optimizer: Any) -> None:
    from .optimizer import SSAMOptimizer

    inner = getattr(optimizer, "optimizer", None)  # Accelerate's AcceleratedOptimizer
    if isinstance(optimizer, SSAMOptimizer) or isinstance(inner, SSAMOptimizer):
        raise ValueError(
            "SSAMBackward takes the *base* optimizer (e.g. torch.optim.AdamW(...)), not an SSAMOptimizer: it runs the "
            "two passes itself and leaves the SAM gradient in .grad for the base optimizer's step."
        )


def _refuse_unsupported_accelerator(accelerator: Any, model: nn.Module, sync_ascent: bool) -> None:
    kind = str(getattr(accelerator, "distributed_type", ""))
    if "DEEPSPEED" in kind.upper():
        raise ValueError(
            "SSAMBackward does not support DeepSpeed: its engine steps inside accelerator.backward(). Supported: one "
            "process, DDP and FSDP2; under DeepSpeed ZeRO use SSAMTrainer or a trainer with SSAMMixin."
        )
    if "FSDP" in kind.upper() and not is_fsdp2(model):
        raise ValueError(
            "SSAMBackward runs on FSDP2's DTensor shards only: use fsdp_version=2 in the Accelerate FSDP plugin, and "
            "build SSAMBackward after accelerator.prepare(model, ...)."
        )
    if is_fsdp2(model):
        if not sync_ascent:
            raise ValueError(_FSDP2_LOCAL)
        if getattr(accelerator, "mixed_precision", "no") == "fp16":
            raise ValueError("fp16 is not supported under FSDP2 (the loss scaler on sharded gradients); use bf16.")
