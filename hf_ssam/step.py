"""The two-pass step of one micro-batch around *a* backward, once: `TwoPassStep`.

`TwoPassStep.run` is the whole SAM-family step of one micro-batch, whatever runs the passes: the Trainer's own
`training_step` (`SSAMMixin`), `accelerator.backward` or ``loss.backward()`` (`hf_ssam.backward.SSAMBackward`);
`hf_ssam.zero.ZeroTwoPassStep` is the same step on DeepSpeed's gradient storage:

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
from .functional import PERTURBATIONS
from .passes import RNGState, freeze_batchnorm_stats

__all__ = ["MicroBatchResult", "TwoPassStep"]


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
