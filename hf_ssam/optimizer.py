"""`SSAMOptimizer`: the SAM-family step for plain PyTorch and timm training loops."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from . import amp, functional
from .passes import RNGState
from .variants import NO_SAM, VARIANTS, check_sam_config

__all__ = ["SSAMOptimizer"]

#: The SAM settings each parameter group carries (a group may set its own, e.g. a per-group ``rho``).
SAM_GROUP_KEYS: tuple[str, ...] = ("variant", "rho", "renormalize", "asam_eta")


@dataclass
class _FirstStep:
    """What `first_step` leaves for the second half of the step."""

    params: list[Tensor]  # the parameters that had a gradient, saved and (maybe) moved to w + e
    grad_norm: Tensor  # ‖g‖, unscaled
    perturb_skipped: Tensor  # ‖g‖ zero or not finite: w was not moved
    found_inf: Tensor  # g not finite (a loss-scale overflow when there is a scaler)
    grad_scaler: torch.amp.GradScaler | None  # the enabled scaler whose scale multiplied g


class SSAMOptimizer(torch.optim.Optimizer):
    """Wraps a base optimizer with a SAM-family two-pass step.

    Args:
        params: parameters or parameter groups, as for any optimizer.
        base_optimizer_cls: the optimizer that takes the step (e.g. `torch.optim.SGD`, `torch.optim.AdamW`).
            To wrap an optimizer that is already built, use `SSAMOptimizer.wrap`.
        variant: `"ssam"`, `"sam"`, `"usam"` or `"asam"` (see `SSAMTrainingArguments`).
        rho: perturbation radius ρ ≥ 0, an int or float. A string is refused: unlike `SSAMTrainingArguments`,
            which converts `sam_rho="5e-2"` from YAML or the command line, the optimizer converts nothing.
        renormalize: rescale g_asc to ‖g‖ (`γ = ‖g‖/‖g_asc‖`) before the base step; None means on for
            `"ssam"` only.
        asam_eta: ASAM's η ≥ 0.
        max_grad_norm: clip the final gradient (after the rescale, unscaled) to this global L2 norm before the
            base step, as `SSAMTrainer` clips with `max_grad_norm`; None (default) does not clip.
        **base_kwargs: passed to `base_optimizer_cls` (lr, momentum, weight_decay, …).

    Raises:
        ValueError: a bad `variant`, `rho`, `renormalize`, `asam_eta` or `max_grad_norm`, or `variant="none"`
            (here or in a parameter group; groups added later with `add_param_group`, or to the base optimizer,
            get the same checks).
        TypeError: `base_optimizer_cls` is not a `torch.optim.Optimizer` subclass.

    Two calls around your own backward passes:

    ```python
    loss_fn(model(x), y).backward()
    opt.first_step(zero_grad=True)      # w ← w + e
    loss_fn(model(x), y).backward()     # g_asc at w + e, same batch
    opt.second_step(zero_grad=True)     # w restored, g_asc rescaled, clipped, base step
    ```

    with fp16 loss scaling, the torch idiom:

    ```python
    scaler.scale(loss_fn(model(x), y)).backward()
    opt.first_step(zero_grad=True, grad_scaler=scaler)
    scaler.scale(loss_fn(model(x), y)).backward()
    scaler.step(opt); scaler.update()   # restore, rescale, clip, base step (or skip on inf/NaN)
    ```

    or with a closure that runs forward + backward and returns the loss: `loss = opt.step(closure)`.

    An exception raised while the weights are at `w + e` leaves no trace: `step(closure)` puts `w` back (bitwise)
    before the exception propagates, and in the two-call form `opt.abandon_step()` does the same before a new
    `first_step()` (e.g. after an out-of-memory error in the second pass).

    The parameter groups are the base optimizer's, so LR schedulers attach to this object and
    `state_dict()` / `load_state_dict()` carry the base optimizer's state (momentum, Adam moments).
    Norms are global over all parameters with a gradient; groups without gradients are left alone.
    Under DDP keep both backward passes synchronized (the default): every replica then computes the same
    γ. With the first pass under `no_sync`, `ssam` replicas would each apply their own γ to an already
    averaged gradient and drift apart (`SSAMTrainer` handles the local mode correctly).
    """

    # `GradScaler.step(opt)` then always calls `step()` (which must restore w even when the step is skipped),
    # with the loss scale and its inf/NaN check as the attributes `grad_scale` and `found_inf`.
    _step_supports_amp_scaling = True

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        base_optimizer_cls: type[torch.optim.Optimizer],
        *,
        variant: str = "ssam",
        rho: float = 0.05,
        renormalize: bool | None = None,
        asam_eta: float = 0.01,
        max_grad_norm: float | None = None,
        **base_kwargs: Any,
    ) -> None:
        sam = _checked_settings(variant, rho, renormalize, asam_eta, max_grad_norm)
        if not (isinstance(base_optimizer_cls, type) and issubclass(base_optimizer_cls, torch.optim.Optimizer)):
            if isinstance(base_optimizer_cls, torch.optim.Optimizer):
                got = f"a built {type(base_optimizer_cls).__name__} instance"
                hint = "; to wrap a built optimizer, use SSAMOptimizer.wrap(optimizer, ...)"
            else:
                got, hint = repr(base_optimizer_cls)[:120], ""
            raise TypeError(
                f"base_optimizer_cls={got} is not a torch.optim.Optimizer subclass (e.g. torch.optim.AdamW){hint}."
            )
        super().__init__(params, {**sam, **base_kwargs})
        self._adopt(base_optimizer_cls(self.param_groups, **base_kwargs), max_grad_norm)

    @classmethod
    def wrap(
        cls,
        base_optimizer: torch.optim.Optimizer,
        *,
        variant: str = "ssam",
        rho: float = 0.05,
        renormalize: bool | None = None,
        asam_eta: float = 0.01,
        max_grad_norm: float | None = None,
    ) -> SSAMOptimizer:
        """The SAM optimizer over an optimizer that is already built, sharing its parameter groups and state.

        For optimizers made by a factory (timm's `create_optimizer_v2`, a `transformers` or bitsandbytes
        optimizer, `torch.optim.AdamW(fused=True)`, …): the groups keep their own keys (`lr_scale`,
        `weight_decay`, …) and gain the SAM settings; a group that already has `rho` (or `variant`,
        `renormalize`, `asam_eta`) keeps it. Schedulers attach to the returned optimizer (or, equally, to
        the base one) and `state_dict()` is the base optimizer's. Keyword arguments as for the constructor.

        Raises:
            TypeError: `base_optimizer` is not a `torch.optim.Optimizer` instance, or is an `SSAMOptimizer`.
            ValueError: a bad SAM setting, as for the constructor.
        """
        if isinstance(base_optimizer, SSAMOptimizer):
            raise TypeError("SSAMOptimizer.wrap() got an SSAMOptimizer; wrap its base optimizer only once.")
        if not isinstance(base_optimizer, torch.optim.Optimizer):
            what = f"the class {base_optimizer.__name__}" if isinstance(base_optimizer, type) else repr(base_optimizer)
            hint = "; for a class, use SSAMOptimizer(params, cls, ...)" if isinstance(base_optimizer, type) else ""
            raise TypeError(
                f"SSAMOptimizer.wrap() takes a built torch.optim.Optimizer instance (e.g. "
                f"torch.optim.AdamW(model.parameters()) or timm's create_optimizer_v2(model, ...)); got "
                f"{type(base_optimizer).__name__}: {what[:120]}{hint}."
            )
        sam = _checked_settings(variant, rho, renormalize, asam_eta, max_grad_norm)
        self = cls.__new__(cls)
        # The base optimizer's own group dicts: the SAM keys are filled in where a group does not set them.
        torch.optim.Optimizer.__init__(self, base_optimizer.param_groups, sam)
        self._adopt(base_optimizer, max_grad_norm)
        return self

    def _adopt(self, base_optimizer: torch.optim.Optimizer, max_grad_norm: float | None) -> None:
        self.base_optimizer = base_optimizer
        self.max_grad_norm = max_grad_norm
        self._link_base()
        self._check_groups()
        self._backup: dict[Tensor, Tensor] = {}  # saved w, one buffer per parameter, reused every step
        self._pending: _FirstStep | None = None
        self._last: tuple[Tensor, Tensor, Tensor, Tensor] | None = None

    def _link_base(self) -> None:
        """Share param groups and state with the base optimizer (one truth for schedulers and checkpoints)."""
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state
        self.defaults.update(self.base_optimizer.defaults)

    def _check_groups(self) -> None:
        """Check every parameter group's SAM settings, filling the ones a group lacks from the defaults."""
        for index, group in enumerate(self.param_groups):  # settings given per parameter group get the same checks
            for key in SAM_GROUP_KEYS:
                group.setdefault(key, self.defaults[key])
            _check_sam_settings(group, f"param_groups[{index}]: ")
        self._checked_groups = list(self.param_groups)

    def _check_new_groups(self) -> None:
        """At each step: check groups added since the last check (e.g. to the base optimizer after `wrap`)."""
        checked = self._checked_groups
        if len(checked) != len(self.param_groups) or any(a is not b for a, b in zip(checked, self.param_groups)):
            self._check_groups()

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a parameter group, as for any optimizer: to the base optimizer, whose groups these are.

        SAM settings the group does not set (`variant`, `rho`, `renormalize`, `asam_eta`) come from the
        defaults (the constructor's or `wrap`'s), and the group's settings get the constructor's checks. A group
        added to the base optimizer itself (`optimizer.base_optimizer.add_param_group(...)`, as progressive
        unfreezing may do after `wrap`) is filled and checked in the same way at the next step.

        Raises:
            ValueError: a bad SAM setting in the group (the message starts with the group's index).
        """
        if "base_optimizer" not in self.__dict__:  # torch.optim.Optimizer.__init__ collecting the first groups
            super().add_param_group(param_group)
            return
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, got {type(param_group).__name__}.")
        settings = {key: param_group.get(key, self.defaults[key]) for key in SAM_GROUP_KEYS}
        _check_sam_settings(settings, f"param_groups[{len(self.param_groups)}]: ")
        param_group.update(settings)
        self.base_optimizer.add_param_group(param_group)
        self._check_new_groups()

    def _backup_buffer(self, p: Tensor) -> Tensor:
        buf = self._backup.get(p)
        if buf is None or buf.shape != p.shape or buf.dtype != p.dtype:
            buf = self._backup[p] = torch.empty_like(p)
        return buf

    def _groups_with_grads(self) -> list[tuple[dict[str, Any], list[Tensor]]]:
        """(group, its parameters that have a gradient) for every group with at least one."""
        groups = []
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                groups.append((group, params))
        return groups

    def _no_gradient_error(self, where: str, what: str) -> RuntimeError:
        n = sum(len(g["params"]) for g in self.param_groups)
        return RuntimeError(
            f"{where}: no parameter has a gradient (.grad is None for all {n} parameters in "
            f"{len(self.param_groups)} parameter group(s)); {what}. With step(closure), the closure must call "
            "loss.backward()."
        )

    # ------------------------------------------------------------------------------------------- the step

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False, grad_scaler: torch.amp.GradScaler | None = None) -> None:
        """Climb from `w` to `w + e` using the gradients in `.grad` (saving `w` to restore it exactly).

        Args:
            zero_grad: drop the gradients afterwards (as `zero_grad()` does), ready for the second backward.
            grad_scaler: the `torch.amp.GradScaler` whose `scale(loss)` made these gradients. The perturbation
                then uses the true `g = .grad / scale` (`.grad` itself is left as it is), and an inf/NaN in
                `g` skips the perturbation here and the whole step in `grad_scaler.step(optimizer)`, which
                finishes the step instead of `second_step()`.

        The zero/non-finite check runs on the device: nothing here waits for the host. An exception during the
        climb leaves the weights at `w` (and, with `zero_grad=True`, no gradients); after this returns, finish the
        step with `second_step()` or drop it with `abandon_step()`.

        Raises:
            TypeError: `grad_scaler` is not a `torch.amp.GradScaler`.
            RuntimeError: no parameter has a gradient, or the previous `first_step()` was not finished.
        """
        if self._pending is not None:
            raise RuntimeError(
                "first_step() called again before the step it began was finished (the weights are still at "
                "w + e): call second_step(), step() or grad_scaler.step(optimizer) after the second backward, or "
                "abandon_step() to put the weights back at w and drop that step (e.g. after an exception in the "
                "second pass)."
            )
        self._check_new_groups()
        inv_scale = amp.inverse_scale(grad_scaler)
        groups = self._groups_with_grads()
        if not groups:
            raise self._no_gradient_error("first_step()", "run loss.backward() before first_step()")
        params = [p for _, ps in groups for p in ps]
        grads = [p.grad for p in params]
        stored_norm = functional.global_norm(grads)  # ‖g‖ in the units of .grad (times the loss scale, if any)
        finite = torch.isfinite(stored_norm)
        perturb = finite & (stored_norm > 0)  # a zero or non-finite ‖g‖ skips the perturbation
        scales = []
        for group, _ in groups:  # all scales before any weight moves; ASAM's ‖T·g‖ is global too
            variant = group["variant"]
            scale = functional.perturbation_scale(
                variant, group["rho"], stored_norm, params=params, grads=grads, asam_eta=group["asam_eta"]
            )
            if inv_scale is not None and functional.PERTURBATIONS[variant] == "usam":
                scale = scale * inv_scale  # e = ρ·g = ρ·.grad/scale (sam's and asam's scales do not depend on it)
            scales.append(torch.where(perturb & torch.isfinite(scale), scale, 0.0))
        functional.save_([self._backup_buffer(p) for p in params], params)  # w
        if not zero_grad:
            grads = [g.clone() for g in grads]  # .grad stays g
        functional.zero_unless_(grads, perturb)  # skipped: e = 0 exactly, even where .grad holds inf/NaN
        start = 0
        try:
            for (group, ps), scale in zip(groups, scales):
                functional.ascend_(
                    ps,
                    grads[start : start + len(ps)],
                    scale.to(ps[0].device),
                    variant=group["variant"],
                    asam_eta=group["asam_eta"],
                    overwrite_grads=True,
                )  # w + e
                start += len(ps)
        except BaseException:  # some groups may have moved (an out-of-memory error in ASAM's T²·g)
            functional.restore_(params, [self._backup[p] for p in params])  # w, exactly
            if zero_grad:
                self.zero_grad()  # .grad may hold part of e
            raise
        grad_norm = stored_norm if inv_scale is None else stored_norm * inv_scale  # ‖g‖
        scaler = grad_scaler if inv_scale is not None else None
        self._pending = _FirstStep(params, grad_norm, ~perturb, ~finite, scaler)
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        """Restore `w` exactly, rescale `g_asc` (if renormalizing), clip (if `max_grad_norm`), base step.

        Inside `grad_scaler.step(optimizer)` (which calls `step()`, and so this), `g_asc` is unscaled first and
        the base step is skipped when either pass found an inf/NaN; `w` is restored in every case. The base
        step is skipped on the device for an optimizer that supports it (`fused=True`); otherwise the skip
        reads the inf/NaN flag on the host, as `GradScaler.step` does for any optimizer. Without a scaler,
        nothing here waits for the host.

        Raises:
            RuntimeError: called before `first_step()`; no parameter has a gradient; or the loss scale was
                given to only one of `first_step(grad_scaler=...)` and `grad_scaler.step(optimizer)`.
        """
        pending = self._pending
        if pending is None:
            raise RuntimeError(
                "second_step() called before first_step(): call first_step() after the first backward pass."
            )
        functional.restore_(pending.params, [self._backup[p] for p in pending.params])  # w, exactly
        self._pending = None
        self._check_new_groups()
        in_scaler_step = hasattr(self, "found_inf")  # set by GradScaler.step() around this call
        if pending.grad_scaler is not None and not in_scaler_step:
            raise RuntimeError(
                "first_step(grad_scaler=...) was given loss-scaled gradients: finish the step with "
                "grad_scaler.step(optimizer) and grad_scaler.update(), not second_step() or step()."
            )
        if in_scaler_step and pending.grad_scaler is None:
            raise RuntimeError(
                "grad_scaler.step(optimizer) finishes a step whose first_step() was not told the loss scale: "
                "call first_step(zero_grad=True, grad_scaler=scaler)."
            )
        groups = self._groups_with_grads()
        if not groups:
            raise self._no_gradient_error("second_step()", "run the second forward and loss.backward() at w + e")
        grads_per_group = [[p.grad for p in ps] for _, ps in groups]
        grads = [g for gs in grads_per_group for g in gs]
        grad_scale = getattr(self, "grad_scale", None)  # None when grad_scaler.unscale_(optimizer) ran already
        if grad_scale is not None:
            functional.rescale_(
                grads, grad_scale.double().reciprocal().float()
            )  # g_asc = .grad / scale, as unscale_ does
        ascent_grad_norm = functional.global_norm(grads)  # ‖g_asc‖
        gamma, rescale_skipped = functional.renormalization_factor(
            pending.grad_norm, ascent_grad_norm
        )  # γ = ‖g‖/‖g_asc‖
        skipped = pending.perturb_skipped
        for (group, _), group_grads in zip(groups, grads_per_group):
            if functional.uses_renormalization(group["variant"], group["renormalize"]):
                skipped = pending.perturb_skipped | rescale_skipped
                functional.rescale_(group_grads, gamma)  # g_asc ← γ·g_asc
        if self.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_([p for _, ps in groups for p in ps], self.max_grad_norm)  # the final g
        if in_scaler_step:
            found_inf = pending.found_inf | (self.found_inf.to(pending.found_inf.device) > 0)  # either pass
            amp.add_found_inf(pending.grad_scaler, self, pending.found_inf)  # update() backs off for it too
            amp.step_unless(self.base_optimizer, found_inf)
            skipped = skipped | found_inf
        else:
            self.base_optimizer.step()
        self._opt_called = True  # second_step is this optimizer's step for LR schedulers' order check
        self._last = (pending.grad_norm, ascent_grad_norm, gamma, skipped)  # tensors: no host sync
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def abandon_step(self, zero_grad: bool = True) -> bool:
        """Drop the step that `first_step()` began: the weights go back to `w` exactly, ready for a new `first_step()`.

        For the two-call form, when the second pass fails (an out-of-memory error, an interrupt) and training
        goes on, e.g. with a smaller batch. Nothing is stepped: the base optimizer's state, the learning-rate
        schedulers and `last_metrics` stay as they were. A step begun with `first_step(grad_scaler=scaler)` also
        leaves no trace in `scaler` (a `scaler.unscale_(optimizer)` of the dropped step is forgotten); a no-op
        when no step is begun. `step(closure)` calls this by itself when its second closure call raises.

        Args:
            zero_grad: drop the gradients too (as `zero_grad()` does), when a step was begun: they belong to
                the abandoned second pass (or, after `first_step(zero_grad=False)`, to the first).

        Returns:
            Whether a begun step was abandoned.
        """
        pending = self._pending
        if pending is None:
            return False
        functional.restore_(pending.params, [self._backup[p] for p in pending.params])  # w, exactly
        self._pending = None
        if pending.grad_scaler is not None:  # scaler.unscale_(self) of this step must not count for the next one
            pending.grad_scaler._per_optimizer_states.pop(id(self), None)
        if zero_grad:
            self.zero_grad()
        return True

    @property
    def last_metrics(self) -> dict[str, float]:
        """‖g‖, ‖g_asc‖, γ and whether the perturbation, rescale or step was skipped, for the last step.

        Read on demand (this is where the host waits for the device). Norms are unscaled.
        """
        if self._last is None:
            return {}
        grad_norm, ascent_grad_norm, gamma, skipped = self._last
        return {
            "grad_norm": float(grad_norm),
            "ascent_grad_norm": float(ascent_grad_norm),
            "gamma": float(gamma),
            "skipped": float(skipped),
        }

    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:  # type: ignore[override]
        """A whole SAM step with `closure`, or, without one, the end of the step that `first_step()` began.

        `closure` runs forward + backward on one batch and returns the loss at `w`. The gradients are zeroed
        before each of its two calls and the RNG is replayed for the second, so both passes see the same
        dropout masks; returns the loss of the first call. Without a closure this is `second_step()` (which
        is how `grad_scaler.step(optimizer)` finishes the step) and returns None.

        An exception in the second closure call (at `w + e`), `KeyboardInterrupt` and out-of-memory errors
        included, propagates unchanged after `abandon_step()`: the weights are back at `w` bitwise, the gradients
        are dropped, nothing was stepped, and the next `step(closure)` is a normal step.

        Raises:
            RuntimeError: no closure and no `first_step()` to finish, or the errors of the two steps.
        """
        if closure is None:
            if self._pending is None:
                raise RuntimeError(
                    "SSAMOptimizer.step() was called with closure=None before first_step(). Either pass "
                    "closure=... (a function running forward + backward and returning the loss), or call "
                    "first_step() after the first backward pass and then step() (or grad_scaler.step(optimizer), "
                    "or second_step()) after the second."
                )
            self.second_step()
            return None
        rng = RNGState.capture()
        self.zero_grad()
        with torch.enable_grad():
            loss = closure()  # g = ∇F(w)
        self.first_step(zero_grad=True)
        try:
            rng.restore()
            with torch.enable_grad():
                closure()  # g_asc = ∇F(w + e)
        except BaseException:
            self.abandon_step()  # w, exactly; the partial g_asc dropped
            raise
        self.second_step()
        return loss

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict of this optimizer, or of its base optimizer alone.

        A base optimizer's state dict (a checkpoint saved before switching to SAM) has no SAM settings in its
        parameter groups: each group then keeps the settings it has here (its own, else the defaults).
        """
        current = [{key: group[key] for key in SAM_GROUP_KEYS if key in group} for group in self.param_groups]
        self.base_optimizer.load_state_dict(state_dict)
        self._link_base()
        for group, settings in zip(self.param_groups, current):
            for key in SAM_GROUP_KEYS:
                group.setdefault(key, settings.get(key, self.defaults[key]))
        self._check_groups()

    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's state dict; the param groups also hold `variant`, `rho`, `renormalize`, `asam_eta`."""
        return self.base_optimizer.state_dict()


def _checked_settings(
    variant: str,
    rho: float,
    renormalize: bool | None,
    asam_eta: float,
    max_grad_norm: float | None,
) -> dict[str, Any]:
    """The SAM group settings, after every constructor argument was checked (a ValueError names a bad one)."""
    settings = dict(variant=variant, rho=rho, renormalize=renormalize, asam_eta=asam_eta)
    _check_sam_settings(settings)
    _check_max_grad_norm(max_grad_norm)
    return settings


def _check_sam_settings(settings: dict[str, Any], where: str = "") -> None:
    """The one check of a set of SAM settings: the constructor's keywords and every parameter group's.

    `where` (e.g. ``"param_groups[2]: "``) starts the message of a parameter group's refusal.
    """
    try:
        check_sam_config(*(settings[key] for key in SAM_GROUP_KEYS), prefix="")
    except ValueError as error:
        raise ValueError(f"{where}{error}") from None
    if settings["variant"] == NO_SAM:
        raise ValueError(
            f"{where}variant={settings['variant']!r} is not supported by SSAMOptimizer; choose one of "
            f"{list(VARIANTS)} (use the base optimizer itself for plain training)."
        )


def _check_max_grad_norm(max_grad_norm: float | None) -> None:
    if max_grad_norm is None:
        return
    number = isinstance(max_grad_norm, (int, float)) and not isinstance(max_grad_norm, bool)
    if not (number and 0 < max_grad_norm < math.inf):
        raise ValueError(
            f"max_grad_norm={max_grad_norm!r} is invalid; it must be None (no clipping) or a finite number > 0."
        )
