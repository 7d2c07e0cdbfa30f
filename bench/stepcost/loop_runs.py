"""Hand-written training loops on the Trainer's model, batches and base optimizer: plain, SSAM, SSAMOptimizer."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .timing import DEVICE, Baton, clock, elapsed, sync
from .trainer_runs import base_optimizer
from .workloads import RHO, Workload

__all__ = ["LOOP_CONFIGS", "MAX_GRAD_NORM", "LoopRunner"]

#: The Trainer's default ``max_grad_norm``: every loop clips its final gradient to it.
MAX_GRAD_NORM = 1.0
LOOP_CONFIGS: tuple[str, ...] = ("loop:plain", "loop:ssam", "loop:SSAMOptimizer")


class LoopRunner:
    """A hand-written training loop on the same model, batches and base optimizer as the Trainer's."""

    def __init__(
        self,
        config: str,
        workload: Workload,
        model: nn.Module,
        dataset: list,
        steps: int,
        tmp: str,
        baton: Baton | None = None,
    ):
        from transformers import default_data_collator

        self.config, self.model, self.steps, self.baton = config, model.to(DEVICE), steps, baton
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.bf16 = workload.bf16
        kind = config.split(":", 1)[1]  # plain, ssam or SSAMOptimizer
        self.opt = self.build_optimizer(kind, *base_optimizer(tmp, workload))
        b = workload.batch_size
        self.batches = [
            {k: v.to(DEVICE) for k, v in default_data_collator(dataset[i : i + b]).items()}
            for i in range(0, len(dataset) - b + 1, b)
        ]
        self.backup = [torch.empty_like(p) for p in self.params]
        self.times: list[tuple[float, float]] = []
        self.step = {"plain": self.step_plain, "ssam": self.step_ssam, "SSAMOptimizer": self.step_ssam_optimizer}[kind]

    def build_optimizer(self, kind: str, cls: type, kwargs: dict[str, Any]) -> torch.optim.Optimizer:
        """The Trainer's optimizer class and arguments; wrapped in SSAMOptimizer (clipping the final gradient)."""
        from hf_ssam import SSAMOptimizer

        if kind == "SSAMOptimizer":
            return SSAMOptimizer(self.params, cls, variant="ssam", rho=RHO, max_grad_norm=MAX_GRAD_NORM, **kwargs)
        return cls(self.params, **kwargs)

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.bf16:  # as the Trainer's bf16=True: the forward under bf16 autocast, fp32 weights and gradients
            with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
                return self.model(**batch)["loss"]
        return self.model(**batch)["loss"]

    def step_plain(self, batch: dict[str, torch.Tensor]) -> None:
        self.loss(batch).backward()
        torch.nn.utils.clip_grad_norm_(self.params, MAX_GRAD_NORM)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def step_ssam(self, batch: dict[str, torch.Tensor]) -> None:
        """SSAM written out: g, w+ρg (in place, weights saved), g_asc with the same RNG, restore, γ·g_asc.

        The first gradients are dropped before the second pass (``p.grad = None``): the second backward
        then writes fresh gradients instead of accumulating into zeroed buffers, and no gradient buffer
        is alive during the second forward.
        """
        rng = torch.get_rng_state()
        self.loss(batch).backward()  # g
        params = self.params
        with torch.no_grad():
            grads = [p.grad for p in params]
            gnorm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
            perturb = bool(torch.isfinite(gnorm) & (gnorm > 0))
            if perturb:
                torch._foreach_copy_(self.backup, params)
                torch._foreach_mul_(grads, RHO)  # e = ρ·g, in the gradient buffers (dropped next)
                torch._foreach_add_(params, grads)  # w + e
            del grads
            for p in params:
                p.grad = None
        torch.set_rng_state(rng)
        self.loss(batch).backward()  # g_asc
        with torch.no_grad():
            if perturb:
                torch._foreach_copy_(params, self.backup)
            grads = [p.grad for p in params]
            anorm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
            ok = torch.isfinite(anorm) & (anorm > 0) & (gnorm > 0)
            torch._foreach_mul_(grads, torch.where(ok, gnorm / torch.where(ok, anorm, 1.0), 1.0))
        torch.nn.utils.clip_grad_norm_(self.params, MAX_GRAD_NORM)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def step_ssam_optimizer(self, batch: dict[str, torch.Tensor]) -> None:
        from hf_ssam import RNGState

        opt = self.opt
        rng = RNGState.capture()
        self.loss(batch).backward()
        opt.first_step(zero_grad=True)  # type: ignore[attr-defined]
        rng.restore()
        self.loss(batch).backward()
        opt.second_step(zero_grad=True)  # type: ignore[attr-defined]  (clips γ·g_asc, as the Trainer does)

    def run(self) -> None:
        """Train ``steps`` steps (taking turns if there is a baton)."""
        self.model.train()
        try:
            for i in range(self.steps):
                batch = self.batches[i % len(self.batches)]
                if self.baton is not None:
                    self.baton.wait(self.config)
                sync()
                start = clock()
                self.step(batch)
                sync()
                self.times.append(elapsed(start))
                if self.baton is not None:
                    self.baton.pass_on(self.config)
        finally:
            if self.baton is not None:
                self.baton.finish(self.config)
