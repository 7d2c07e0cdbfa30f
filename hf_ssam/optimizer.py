"""`SSAMOptimizer`: the SAM-family step for plain PyTorch and timm training loops."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from . import functional as F
from .passes import RNGState
from .variants import NO_SAM, check_sam_config

__all__ = ["SSAMOptimizer"]


class SSAMOptimizer(torch.optim.Optimizer):
    """Wraps a base optimizer with a SAM-family two-pass step.

    Args:
        params: parameters or parameter groups, as for any optimizer.
        base_optimizer_cls: the optimizer that takes the step (e.g. `torch.optim.SGD`, `torch.optim.AdamW`).
        variant: `"ssam"`, `"sam"`, `"usam"` or `"asam"` (see `SSAMTrainingArguments`).
        rho: perturbation radius ρ ≥ 0.
        renormalize: rescale the descent gradient by γ = ‖g‖/‖g_asc‖; None means on for `"ssam"` only.
        asam_eta: ASAM's η ≥ 0.
        gamma_bounds: experimental; `(γ_min, γ_max)` with 0 < γ_min ≤ 1 ≤ γ_max: the renormalization uses
            γ clipped to these bounds (`functional.clip_renormalization_factor`). Needs renormalization.
            `last_metrics["gamma"]` stays the measured, unclipped γ.
        scale_rho_by_gamma: experimental; climb with ρ_t = ρ·γ_{t−1}, γ_{t−1} = ‖g‖/‖g_asc‖ of the previous
            step (`functional.rho_scaled_by_gamma`); ρ at the first step. The last γ is not saved in
            `state_dict()`: a resumed run starts again from ρ.
        **base_kwargs: passed to `base_optimizer_cls` (lr, momentum, weight_decay, …).

    Two ways to use it, with two calls around your own backward passes:

    ```python
    loss_fn(model(x), y).backward()
    opt.first_step(zero_grad=True)      # w ← w + e
    loss_fn(model(x), y).backward()     # g_asc at w + e, same batch
    opt.second_step(zero_grad=True)     # w restored, g_asc rescaled, base step
    ```

    or with a closure that runs forward + backward and returns the loss: `loss = opt.step(closure)`.

    The parameter groups are the base optimizer's, so LR schedulers attach to this object and
    `state_dict()` / `load_state_dict()` carry the base optimizer's state (momentum, Adam moments).
    Norms are global over all parameters with a gradient. Gradients must be unscaled (no fp16 loss scale).
    Under DDP keep both backward passes synchronized (the default): every replica then computes the same
    γ. With the first pass under `no_sync`, `ssam` replicas would each apply their own γ to an already
    averaged gradient and drift apart (`SSAMTrainer` handles the local mode correctly).
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        base_optimizer_cls: type[torch.optim.Optimizer],
        *,
        variant: str = "ssam",
        rho: float = 0.05,
        renormalize: bool | None = None,
        asam_eta: float = 0.01,
        gamma_bounds: tuple[float, float] | None = None,
        scale_rho_by_gamma: bool = False,
        **base_kwargs: Any,
    ) -> None:
        check_sam_config(variant, rho, renormalize, asam_eta, prefix="")
        _check_gamma_control(gamma_bounds, scale_rho_by_gamma, variant, renormalize)
        if variant == NO_SAM:
            raise ValueError(
                f"variant={variant!r} is not supported by SSAMOptimizer; choose one of {list(F.VARIANTS)} "
                "(use the base optimizer itself for plain training)."
            )
        if not (isinstance(base_optimizer_cls, type) and issubclass(base_optimizer_cls, torch.optim.Optimizer)):
            raise ValueError(f"base_optimizer_cls={base_optimizer_cls!r} is not a torch.optim.Optimizer subclass.")
        defaults = dict(variant=variant, rho=rho, renormalize=renormalize, asam_eta=asam_eta, **base_kwargs)
        super().__init__(params, defaults)
        for group in self.param_groups:  # settings given per parameter group get the same checks
            check_sam_config(group["variant"], group["rho"], group["renormalize"], group["asam_eta"], prefix="")
        self.base_optimizer = base_optimizer_cls(self.param_groups, **base_kwargs)
        self._link_base()
        self._backup: dict[Tensor, Tensor] = {}  # saved w, one buffer per parameter, reused every step
        self._perturbed: list[Tensor] = []
        self._grad_norm: Tensor | None = None
        self._skipped = False
        self._last: tuple[Tensor, Tensor, Tensor, Tensor] | None = None
        self._gamma_bounds = None if gamma_bounds is None else (float(gamma_bounds[0]), float(gamma_bounds[1]))
        self._scale_rho_by_gamma = scale_rho_by_gamma
        self._previous_gamma: Tensor | None = None  # γ_{t−1}, for scale_rho_by_gamma

    def _link_base(self) -> None:
        """Share param groups and state with the base optimizer (one truth for schedulers and checkpoints)."""
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state
        self.defaults.update(self.base_optimizer.defaults)

    def _backup_buffer(self, p: Tensor) -> Tensor:
        buf = self._backup.get(p)
        if buf is None or buf.shape != p.shape or buf.dtype != p.dtype:
            buf = self._backup[p] = torch.empty_like(p)
        return buf

    def _params_with_grad(self, group: dict[str, Any]) -> list[Tensor]:
        return [p for p in group["params"] if p.grad is not None]

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        """Climb from `w` to `w + e` using the gradients in `.grad` (saving `w` to restore it exactly)."""
        groups = [(g, self._params_with_grad(g)) for g in self.param_groups]
        all_grads = [p.grad for _, ps in groups for p in ps]
        self._grad_norm = grad_norm = F.global_norm(all_grads)  # ‖g‖
        self._perturbed.clear()
        if not bool(torch.isfinite(grad_norm) & (grad_norm > 0)):
            self._skipped = True  # zero or non-finite ‖g‖: no perturbation this step
        else:
            self._skipped = False
            everything = [p for _, ps in groups for p in ps]  # ASAM's ‖T·g‖ is global too
            scales = [
                F.perturbation_scale(
                    group["variant"],
                    group["rho"],
                    grad_norm,
                    params=everything,
                    grads=all_grads,
                    asam_eta=group["asam_eta"],
                )
                for group, _ in groups
            ]  # all scales before any weight moves
            if self._scale_rho_by_gamma:  # ρ_t = ρ·γ_{t−1}
                factor = F.rho_scaled_by_gamma(1.0, self._previous_gamma).to(grad_norm.device)
                scales = [scale * factor for scale in scales]
            for (group, ps), scale in zip(groups, scales):
                if not ps:
                    continue
                backup = [self._backup_buffer(p) for p in ps]
                torch._foreach_copy_(backup, ps)  # save w
                self._perturbed.extend(ps)
                grads = [p.grad for p in ps]
                variant, eta = group["variant"], group["asam_eta"]
                F.ascend(ps, grads, scale.to(ps[0].device), variant=variant, asam_eta=eta, overwrite_grads=zero_grad)
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        """Restore `w` exactly, rescale `g_asc` (if renormalizing) and let the base optimizer step."""
        if self._grad_norm is None:
            raise RuntimeError("second_step() called before first_step().")
        if self._perturbed:
            F.restore_(self._perturbed, [self._backup[p] for p in self._perturbed])  # w, exactly
            self._perturbed.clear()
        group_grads = [(g, [p.grad for p in self._params_with_grad(g)]) for g in self.param_groups]
        ascent_grad_norm = F.global_norm([t for _, gs in group_grads for t in gs])  # ‖g_asc‖
        gamma, rescale_skipped = F.renormalization_factor(self._grad_norm, ascent_grad_norm)  # γ = ‖g‖/‖g_asc‖
        if self._scale_rho_by_gamma:
            self._previous_gamma = gamma
        applied = gamma if self._gamma_bounds is None else F.clip_renormalization_factor(gamma, *self._gamma_bounds)
        renormalized = False
        for group, grads in group_grads:
            if F.uses_renormalization(group["variant"], group["renormalize"]):
                renormalized = True
                F.rescale_(grads, applied)  # g_asc ← γ·g_asc (γ clipped to [γ_min, γ_max] if bounded)
        self.base_optimizer.step()
        self._opt_called = True  # second_step is this optimizer's step for LR schedulers' order check
        skipped = rescale_skipped if renormalized else torch.zeros((), dtype=torch.bool)
        self._last = (self._grad_norm, ascent_grad_norm, gamma, skipped | self._skipped)  # tensors: no host sync
        self._grad_norm = None
        if zero_grad:
            self.zero_grad()

    @property
    def last_metrics(self) -> dict[str, float]:
        """‖g‖, ‖g_asc‖, γ and whether the perturbation or rescale was skipped, for the last step (read on demand)."""
        if self._last is None:
            return {}
        grad_norm, ascent_grad_norm, gamma, skipped = self._last
        return {
            "grad_norm": float(grad_norm),
            "ascent_grad_norm": float(ascent_grad_norm),
            "gamma": float(gamma),
            "skipped": float(skipped),
        }

    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor:  # type: ignore[override]
        """A whole SAM step. `closure` runs forward + backward on one batch and returns the loss at `w`.

        The gradients are zeroed before each of the two calls and the RNG is replayed for the second,
        so both passes see the same dropout masks. Returns the loss of the first call.
        """
        if closure is None:
            raise ValueError(
                "SSAMOptimizer.step needs closure=...: a function running forward + backward "
                "and returning the loss (or call first_step() / second_step() yourself)."
            )
        rng = RNGState.capture()
        self.zero_grad()
        with torch.enable_grad():
            loss = closure()  # g = ∇F(w)
        self.first_step(zero_grad=True)
        rng.restore()
        with torch.enable_grad():
            closure()  # g_asc = ∇F(w + e)
        self.second_step()
        return loss

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load the base optimizer's state (and the SAM settings kept in the param groups)."""
        self.base_optimizer.load_state_dict(state_dict)
        self._link_base()

    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's state dict; the param groups also hold `variant`, `rho`, `renormalize`, `asam_eta`."""
        return self.base_optimizer.state_dict()


def _check_gamma_control(
    gamma_bounds: tuple[float, float] | None, scale_rho_by_gamma: bool, variant: str, renormalize: bool | None
) -> None:
    """Refuse bad γ-control options with a ValueError naming the field and the allowed values."""
    if gamma_bounds is not None:
        if not isinstance(gamma_bounds, (tuple, list)) or len(gamma_bounds) != 2:
            raise ValueError(f"gamma_bounds={gamma_bounds!r} is invalid; give a pair (gamma_min, gamma_max) or None.")
        F.check_gamma_bounds(gamma_bounds[0], gamma_bounds[1], prefix="gamma_bounds: ")
        if not F.uses_renormalization(variant, renormalize):
            raise ValueError(
                f"gamma_bounds={tuple(gamma_bounds)!r} needs renormalization, which variant={variant!r} with "
                f"renormalize={renormalize!r} does not use; use variant='ssam' or renormalize=True."
            )
    if scale_rho_by_gamma not in (True, False):
        raise ValueError(f"scale_rho_by_gamma={scale_rho_by_gamma!r} is invalid; choose one of [True, False].")
