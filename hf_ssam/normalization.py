"""What a Trainer pass leaves in ``.grad``, in units of g: the gradient of the micro-batch's own mean loss.

ρ is in units of g, whatever the accumulation steps, the token counts and the number of processes. A Trainer
pass stores

* ``loss_scale · ∇L_i / k`` when the loss ``L_i`` is the micro-batch's own mean (the Trainer divides by the ``k``
  accumulation steps), or ``loss_scale · W · ∇L_i`` when the Trainer *believes* the loss is normalized by
  ``num_items_in_batch`` but the loss ignores it (then it divides by nothing);
* ``loss_scale · W · ∇S_i / N`` when the loss sums over the micro-batch's ``n_i`` items and divides by
  ``num_items_in_batch = N``, the items of the accumulated batch (of all processes with
  ``average_tokens_across_devices``; ``W`` the factor `Trainer.compute_loss` multiplies by then).

Which kind a model's loss is cannot be read off the Trainer: `model_accepts_loss_kwargs` is True for any
``forward(**kwargs)``, and BERT's, T5's and BART's losses take the keyword and ignore it. So `probe_loss` measures
it once per model, on the first SAM step's batch: the loss at ``num_items_in_batch = N`` and at ``2N`` (same
weights, same dropout masks) tells whether the loss divides by it, and the loss without it (the loss's own mean)
tells how many items it averages over: ``labels`` or ``labels[..., 1:]`` (a causal LM's loss shifts its labels, and
transformers counts them shifted only for the models it registers as such: not GPT-2).
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .passes import RNGState, freeze_batchnorm_stats, leave_no_trace, shallow_copy

__all__ = ["LossKind", "count_items", "grad_unscale", "probe_loss", "trusted_loss_kind"]

logger = logging.getLogger(__name__)

#: How far ``L(N)/L(2N)`` may be from 2 (divides by N) or 1 (ignores N), relative: a float32 loss divided by N or 2N
#: agrees with the exact ratio to about 1e-7, a loss with a term that ignores N (an auxiliary loss) is far off.
RATIO_TOLERANCE = 1e-3
#: How far the item count read off the probe may be from a whole count.
COUNT_TOLERANCE = 0.05


@dataclass(frozen=True)
class LossKind:
    """How a model's loss is normalized, as measured by `probe_loss` (or assumed from the Trainer's flags).

    Attributes:
        per_item: True when the loss is ``S_i / num_items_in_batch`` (sums over items, divides by the keyword),
            False when it is the micro-batch's own mean whatever the keyword says.
        shifted: whether the loss averages over ``labels[..., 1:]`` (True) or ``labels`` (False); None: as the Trainer
            counts (``Trainer._loss_shifts_labels``), e.g. when the probe's batch could not tell the two apart.
        measured: False when taken from the Trainer's flags without a probe.
    """

    per_item: bool
    shifted: bool | None = None
    measured: bool = True

    def describe(self) -> str:
        if not self.per_item:
            return "a mean over the micro-batch (num_items_in_batch is ignored)"
        count = {True: "labels[..., 1:]", False: "labels", None: "labels, counted as the Trainer counts them"}
        return f"summed over the items of {count[self.shifted]} and divided by num_items_in_batch"


def trusted_loss_kind(trainer: Any, num_items_in_batch: Any) -> LossKind | None:
    """The kind the Trainer's own flags imply, or None when the Trainer believes the loss is normalized by items
    without being told (``loss_is_scaled_for_ga`` unset): then it must be measured."""
    explicit = getattr(trainer, "loss_is_scaled_for_ga", None)
    if explicit is not None:  # the trainer class says what its compute_loss does
        return LossKind(per_item=bool(explicit), measured=False)
    believed = (trainer.model_accepts_loss_kwargs and num_items_in_batch is not None) or (
        trainer.compute_loss_func is not None
    )
    if not believed or num_items_in_batch is None:
        return LossKind(per_item=False, measured=False)
    return None


def count_items(inputs: Any, shifted: bool) -> torch.Tensor | None:
    """The label items of one micro-batch, over ``labels[..., 1:]`` when ``shifted`` (``shift_labels`` as given)."""
    if not isinstance(inputs, Mapping) or "labels" not in inputs:
        return None
    if "shift_labels" in inputs:
        labels = inputs["shift_labels"]
    else:
        labels = inputs["labels"][..., 1:] if shifted else inputs["labels"]
    try:
        return labels.ne(-100).sum()
    except (TypeError, AttributeError):
        return None


def loss_multiplier(trainer: Any) -> int:
    """``W``: what `Trainer.compute_loss` multiplies a loss given ``num_items_in_batch`` by (token averaging)."""
    across = trainer.args.average_tokens_across_devices and (
        trainer.model_accepts_loss_kwargs or trainer.compute_loss_func is not None
    )
    return trainer.accelerator.num_processes // trainer.get_tp_size() if across else 1


def probe_loss(
    trainer: Any,
    model: nn.Module,
    inputs: Any,
    num_items_in_batch: Any,
    batchnorm_layers: list[nn.Module],
) -> LossKind:
    """Measure how ``trainer.compute_loss`` normalizes ``model``'s loss, on one prepared micro-batch.

    Three forward passes under ``no_grad`` with the same dropout masks, BatchNorm statistics untouched and no trace
    left on the trainer (the generators end where they started): ``L(N)``, ``L(2N)`` and ``L`` without
    ``num_items_in_batch``. A loss that divides by N halves; one that ignores it does not change. The loss's own
    mean then gives its item count: ``n = L(N)·N / (W·L)``, compared with the counts over ``labels`` and
    ``labels[..., 1:]``. Runs on every process at the same step (the model's collectives, if any, stay matched);
    the count rule is agreed over processes. The one host synchronisation of the run's SAM steps.
    """
    probe_model = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    rng = RNGState.capture()
    losses: list[float | None] = []
    with (
        torch.no_grad(),
        freeze_batchnorm_stats(batchnorm_layers),
        leave_no_trace(trainer),
        contextlib.ExitStack() as stack,
    ):
        stack.callback(rng.restore)  # the generators end where they started
        for items in (num_items_in_batch, 2 * num_items_in_batch, None):
            rng.restore()  # same dropout masks in every probe
            try:
                with trainer.compute_loss_context_manager():
                    loss = trainer.compute_loss(probe_model, shallow_copy(inputs), num_items_in_batch=items)
            except (TypeError, ValueError, ZeroDivisionError):  # a compute_loss_func that requires the count
                if items is not None:
                    raise
                losses.append(None)
                continue
            losses.append(float(loss.detach().float().mean()))
    at_n, at_2n, own_mean = losses
    ratio = at_n / at_2n if at_2n else float("nan")
    if abs(ratio - 1.0) <= RATIO_TOLERANCE:
        return LossKind(per_item=False)
    if abs(ratio - 2.0) > 2.0 * RATIO_TOLERANCE:
        warnings.warn(
            f"hf_ssam could not tell how the loss is normalized (L(N)/L(2N) = {ratio:.6g} for num_items_in_batch N, "
            "neither 1 nor 2): g is taken as the Trainer's flags imply (normalized by num_items_in_batch).",
            stacklevel=3,
        )
        return LossKind(per_item=True, shifted=None)
    shifted = _shift_rule(trainer, inputs, num_items_in_batch, at_n, own_mean)
    return LossKind(per_item=True, shifted=shifted)


def _shift_rule(trainer: Any, inputs: Any, num_items: Any, at_n: float, own_mean: float | None) -> bool | None:
    """Whether the loss averages over ``labels[..., 1:]``, read off the probe and agreed over processes."""
    vote = 0  # 0: cannot tell, 1: labels, 2: labels[..., 1:]
    plain, shifted = count_items(inputs, False), count_items(inputs, True)
    if own_mean and plain is not None and shifted is not None and "shift_labels" not in inputs:
        n = at_n * float(num_items) / (loss_multiplier(trainer) * own_mean)  # items the loss averages over
        plain, shifted = int(plain), int(shifted)
        if plain != shifted:
            if abs(n - shifted) <= COUNT_TOLERANCE:
                vote = 2
            elif abs(n - plain) <= COUNT_TOLERANCE:
                vote = 1
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        votes = torch.tensor([vote], device=trainer.args.device)
        torch.distributed.all_reduce(votes, op=torch.distributed.ReduceOp.MAX)
        vote = int(votes.item())
    return {0: None, 1: False, 2: True}[vote]


def grad_unscale(
    trainer: Any,
    kind: LossKind,
    inputs: Any,
    num_items_in_batch: Any,
    k: int,
    loss_scale: float | torch.Tensor,
    like: torch.Tensor,
    synced: bool,
) -> torch.Tensor:
    """The factor ``u`` with ``g = u · stored gradient`` for one micro-batch (see the module docstring).

    ``synced``: the first pass's gradient was averaged over processes (synchronized ascent under DDP or FSDP2),
    so g is the gradient of the global micro-batch's mean loss.
    """
    if not kind.per_item:
        if kind.measured:  # the Trainer did not divide by k; it multiplied by W
            return like.new_tensor(1.0 / loss_multiplier(trainer)) / loss_scale
        return like.new_tensor(k) / loss_scale  # stored = loss_scale · g / k
    shifted = getattr(trainer, "_loss_shifts_labels", False) if kind.shifted is None else kind.shifted
    n_i = count_items(inputs, shifted)
    if num_items_in_batch is None or n_i is None:
        return like.new_tensor(1.0) / loss_scale  # a loss normalized by its own compute_loss: used as is
    total = torch.as_tensor(num_items_in_batch).to(like.device, like.dtype).reshape(())  # N
    n_i = n_i.to(like.device, like.dtype)
    world = loss_multiplier(trainer)  # W
    if synced:
        # The first pass averages ∇(W·S_r/N) over the processes (DDP's all-reduce, FSDP's reduce-scatter): g is the
        # gradient of the global micro-batch mean, Σ_r ∇S_r / Σ_r n_r. Without token averaging each process divides
        # by its own N_r, and Σ_r N_r / Σ_r n_r is exact when every process's micro-batch holds the same share of
        # its tokens.
        counts = trainer.accelerator.reduce(torch.stack([n_i, total]), reduction="sum")
        n_i, total, world = counts[0], (total if world > 1 else counts[1]), 1
    factor = total / (n_i * world)  # g = stored · N / (n_i · W)
    factor = torch.where(n_i > 0, factor, torch.ones_like(factor))  # no items: the gradient is zero anyway
    return factor / loss_scale


def report(trainer: Any, model: nn.Module, kind: LossKind) -> None:
    """Log the measured kind once, and warn when the Trainer's own accumulated gradient is too large for it."""
    name = type(getattr(model, "module", model)).__name__
    logger.info("hf_ssam: the training loss of %s is %s.", name, kind.describe())
    k = trainer.args.gradient_accumulation_steps
    world = loss_multiplier(trainer)
    if not kind.per_item and (k > 1 or world > 1):
        factor = " × ".join([f"{k} (gradient_accumulation_steps)"] * (k > 1) + [f"{world} (processes)"] * (world > 1))
        warnings.warn(
            f"The loss of {name} ignores num_items_in_batch, but its forward accepts **kwargs, so transformers' "
            "Trainer sets model_accepts_loss_kwargs=True and treats the loss as already normalized over the "
            "accumulated batch: it does not divide it by gradient_accumulation_steps (and multiplies it by the "
            f"number of processes with average_tokens_across_devices). The accumulated gradient is {factor} times "
            "the mean gradient. hf_ssam keeps rho in units of each micro-batch's own gradient and leaves the descent "
            "step as the Trainer makes it (sam_rho=0 equals the plain Trainer). To train on the mean gradient, set "
            "trainer.model_accepts_loss_kwargs = False after building the trainer.",
            stacklevel=3,
        )
