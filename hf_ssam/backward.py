"""`SSAMBackward`: the two-pass step (`hf_ssam.step.TwoPassStep`) for hand-written loops.

It replaces ``accelerator.backward(loss)`` or ``loss.backward()``: each call runs both passes of one micro-batch
and leaves the micro-batch's SAM gradient added to ``.grad``, normalized as the replaced backward would.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from .engines import (
    all_reduce_mean_,
    is_ddp,
    is_fsdp2,
    loss_scale_of,
    pass_sync_context,
    scaler_enabled,
    torch_reduce_mean,
)
from .passes import batchnorm_modules
from .reporting import MetricsAccumulator
from .step import TwoPassStep
from .variants import NO_SAM, check_sam_config

__all__ = ["SSAMBackward"]


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
