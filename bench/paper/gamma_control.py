"""The SSAM paper's open question: does controlling gamma help? Saddle, lr stability and noisy quadratic.

Commands (from the repository root)::

    .venv/bin/python bench/paper/gamma_control.py            # the three experiments, ~4-6 minutes
    .venv/bin/python bench/paper/gamma_control.py --quick    # smoke test, seconds
    .venv/bin/python bench/paper/gamma_control.py --only saddle   # one of saddle, lr_stability, quadratic
    .venv/bin/python bench/paper/gamma_control.py --only lr_stability --seeds 3 --configs usam ssam 'ssam[<=1]'

Writes ``gamma_control.csv`` (one row per experiment, configuration and setting) and
``gamma_control.png`` to ``--out`` (default ``outputs/bench/gamma_control/``).

The paper's conclusion proposes "imposing explicit constraints on [gamma's] bounds or adjusting the
perturbation radius according to the gradient norm of the ascent step". Both live here, in
``GammaControlledSAM`` (built from ``hf_ssam.functional``; ``SSAMOptimizer`` has no such options):
``gamma_bounds=(gamma_min, gamma_max)`` renormalizes with gamma clipped to [gamma_min, gamma_max]
(``functional.clip_renormalization_factor``), and ``scale_rho_by_gamma=True`` climbs with
rho_t = rho * gamma_{t-1}, the previous step's ||g|| / ||g_asc|| (``functional.rho_scaled_by_gamma``).
Configurations compared (``CONFIGS``): SAM* (``sam``), SAM (``usam``), SSAM (``ssam``); SSAM with gamma in
[0.5, 2], in (0, 1] (shrink only) and in [1, inf) (amplify only); SAM and SAM* with rho scaled by gamma.

Experiments (each a smaller copy of the script named):

* ``saddle`` (``saddle.py``): f = x1^4/4 - x1 x2 + x2^2/2, noise var 0.005, 8 lrs in [1e-3, 0.3] x 500 starts,
  horizon 20, rho in {0.2, 0.4}; score: mean success rate over the lrs (higher is better).
* ``lr_stability`` (``lr_stability.py``): the BatchNorm CNN on digits, SGD momentum 0.9, weight decay 5e-4,
  constant lr in {0.1, 1.0, 3.16}, rho = 1.0, 15 epochs; score: final training loss (lower is better).
* ``quadratic`` (``noisy_quadratic.py``): d = 20, lr 1e-3, noise var 1e-4, 3 seeds, 200k steps, rho in
  {0.2, 1, 2}; scores: mean loss over the last 1000 steps and steps to f < 1e-4 (lower is better).

The vectorised experiments (saddle, quadratic) use ``_common.rowwise_sam_direction`` with per-row bounds and
per-row gamma_{t-1}; the script first replays a few rows through the optimizers (``SSAMOptimizer`` for the
plain configurations, ``GammaControlledSAM`` for the controlled ones; float64) and stops unless they agree
to 1e-9. The CNN runs the same optimizers.

Claims printed (one per option and experiment): whether the controlled variant beats the plain one it
modifies (SSAM for the bounds, SAM / SAM* for the scaled rho), and whether it beats both SAM and SSAM.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import argparse  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import _common  # noqa: E402  (before torch: pins the offline, single-threaded environment)
import torch  # noqa: E402
from torch import nn  # noqa: E402

from hf_ssam import SSAMOptimizer, freeze_batchnorm_stats, functional  # noqa: E402
from hf_ssam.variants import NO_SAM, check_sam_config  # noqa: E402

INF = math.inf
#: name -> (variant, gamma bounds or None, scale rho by gamma)
CONFIGS: dict[str, tuple[str, tuple[float, float] | None, bool]] = {
    "sam": ("sam", None, False),
    "usam": ("usam", None, False),
    "ssam": ("ssam", None, False),
    "ssam[0.5,2]": ("ssam", (0.5, 2.0), False),
    "ssam[<=1]": ("ssam", (1e-6, 1.0), False),
    "ssam[>=1]": ("ssam", (1.0, INF), False),
    "usam+rho*gamma": ("usam", None, True),
    "sam+rho*gamma": ("sam", None, True),
}
#: controlled configuration -> the plain one it modifies
BASELINE: dict[str, str] = {
    "ssam[0.5,2]": "ssam",
    "ssam[<=1]": "ssam",
    "ssam[>=1]": "ssam",
    "usam+rho*gamma": "usam",
    "sam+rho*gamma": "sam",
}
GAMMA_FREE = (1e-30, INF)  # no bound at all (SSAM's own gamma)


class RowConfig:
    """Per-row tensors of a list of configurations (rows = configs x runs, config-major)."""

    def __init__(self, names: list[str], rhos: list[float], runs: int, dtype: torch.dtype) -> None:
        def column(values: list, as_float: bool = False) -> torch.Tensor:
            tensor = (
                torch.tensor(values, dtype=dtype) if as_float else torch.tensor(values)
            )  # ρ exactly, not via float32
            return tensor.repeat_interleave(runs).unsqueeze(1)

        cfg = [CONFIGS[n] for n in names]
        self.rho = column(rhos, as_float=True)
        self.normalized = column([c[0] == "sam" for c in cfg])
        self.renormalize = column([c[0] == "ssam" for c in cfg])
        self.lo = column([(c[1] or GAMMA_FREE)[0] for c in cfg], as_float=True)
        self.hi = column([(c[1] or GAMMA_FREE)[1] for c in cfg], as_float=True)
        self.scale_rho = column([c[2] for c in cfg])
        self.previous_gamma = torch.ones_like(self.rho)

    def direction(self, gradient, x: torch.Tensor, noise: torch.Tensor, active: int | None = None) -> torch.Tensor:
        n = x.shape[0] if active is None else active
        sl = slice(0, n)
        factor = torch.where(self.scale_rho[sl], self.previous_gamma[sl], 1.0)  # ρ_t = ρ·γ_{t−1} where enabled
        d, gamma = _common.rowwise_sam_direction(
            gradient,
            x,
            noise,
            self.rho[sl],
            self.normalized[sl],
            self.renormalize[sl],
            gamma_bounds=(self.lo[sl], self.hi[sl]),
            rho_factor=factor,
        )
        self.previous_gamma[sl] = gamma
        return d


class GammaControlledSAM:
    """`SSAMOptimizer`'s step over SGD (one parameter group, global norms, no loss scaling) with the γ controls.

    Built from the `hf_ssam.functional` pieces `SSAMOptimizer` uses, in the same order (without either control
    the weights equal `SSAMOptimizer`'s bitwise). Used as `SSAMOptimizer` is: `first_step()` after the first
    backward pass, `second_step()` after the second.

    Args:
        params: the parameters.
        variant: `"ssam"`, `"sam"`, `"usam"` or `"asam"`.
        rho: perturbation radius ρ ≥ 0.
        renormalize: rescale g_asc by γ = ‖g‖/‖g_asc‖; None means on for `"ssam"` only.
        asam_eta: ASAM's η ≥ 0.
        gamma_bounds: `(γ_min, γ_max)` with 0 < γ_min ≤ 1 ≤ γ_max: the renormalization uses γ clipped to
            these bounds (`functional.clip_renormalization_factor`). Needs renormalization.
        scale_rho_by_gamma: climb with ρ_t = ρ·γ_{t−1}, the previous step's γ (`functional.rho_scaled_by_gamma`);
            ρ at the first step.
        **sgd_kwargs: passed to `torch.optim.SGD` (lr, momentum, weight_decay).

    Raises:
        ValueError: a bad SAM setting (as `SSAMOptimizer` refuses it), bad `gamma_bounds` (not a pair, outside
            0 < γ_min ≤ 1 ≤ γ_max, or without renormalization) or a `scale_rho_by_gamma` that is not a bool.
    """

    def __init__(
        self,
        params,
        *,
        variant: str = "ssam",
        rho: float = 0.05,
        renormalize: bool | None = None,
        asam_eta: float = 0.01,
        gamma_bounds: tuple[float, float] | None = None,
        scale_rho_by_gamma: bool = False,
        **sgd_kwargs,
    ) -> None:
        check_sam_config(variant, rho, renormalize, asam_eta, prefix="")
        if variant == NO_SAM:
            raise ValueError(f"variant={variant!r} is not a SAM variant.")
        if gamma_bounds is not None:
            if not isinstance(gamma_bounds, (tuple, list)) or len(gamma_bounds) != 2:
                raise ValueError(f"gamma_bounds={gamma_bounds!r} is invalid; give a pair (gamma_min, gamma_max).")
            functional.check_gamma_bounds(gamma_bounds[0], gamma_bounds[1], prefix="gamma_bounds: ")
            if not functional.uses_renormalization(variant, renormalize):
                raise ValueError(
                    f"gamma_bounds={tuple(gamma_bounds)!r} needs renormalization, which variant={variant!r} with "
                    f"renormalize={renormalize!r} does not use; use variant='ssam' or renormalize=True."
                )
        if not isinstance(scale_rho_by_gamma, bool):
            raise ValueError(f"scale_rho_by_gamma={scale_rho_by_gamma!r} is invalid; choose one of [True, False].")
        self.params = list(params)
        self.base_optimizer = torch.optim.SGD(self.params, **sgd_kwargs)
        self.variant, self.rho, self.asam_eta = variant, rho, asam_eta
        self.renormalize = functional.uses_renormalization(variant, renormalize)
        self.gamma_bounds = None if gamma_bounds is None else (float(gamma_bounds[0]), float(gamma_bounds[1]))
        self.scale_rho_by_gamma = scale_rho_by_gamma
        self.previous_gamma: torch.Tensor | None = None  # γ_{t−1}: the measured, unclipped γ of the last step
        self._backup = {p: torch.empty_like(p) for p in self.params}  # saved w
        self._pending: tuple[list[torch.Tensor], torch.Tensor] | None = None  # (parameters moved, ‖g‖)

    def zero_grad(self) -> None:
        self.base_optimizer.zero_grad()

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        """w ← w + e, with ρ_t = ρ·γ_{t−1} if `scale_rho_by_gamma`."""
        params = [p for p in self.params if p.grad is not None]
        grads = [p.grad for p in params]
        grad_norm = functional.global_norm(grads)  # ‖g‖
        perturb = torch.isfinite(grad_norm) & (grad_norm > 0)
        scale = functional.perturbation_scale(
            self.variant, self.rho, grad_norm, params=params, grads=grads, asam_eta=self.asam_eta
        )
        scale = torch.where(perturb & torch.isfinite(scale), scale, 0.0)
        if self.scale_rho_by_gamma:
            scale = scale * functional.rho_scaled_by_gamma(1.0, self.previous_gamma)  # ρ_t = ρ·γ_{t−1}
        functional.save_([self._backup[p] for p in params], params)  # w
        if not zero_grad:
            grads = [g.clone() for g in grads]
        functional.zero_unless_(grads, perturb)
        functional.ascend_(
            params, grads, scale, variant=self.variant, asam_eta=self.asam_eta, overwrite_grads=True
        )  # w + e
        self._pending = (params, grad_norm)
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        """Restore w, g_asc ← clip(γ)·g_asc (if renormalizing), SGD step."""
        if self._pending is None:
            raise RuntimeError("second_step() called before first_step().")
        params, grad_norm = self._pending
        self._pending = None
        functional.restore_(params, [self._backup[p] for p in params])  # w, exactly
        grads = [p.grad for p in self.params if p.grad is not None]
        gamma, _ = functional.renormalization_factor(grad_norm, functional.global_norm(grads))  # γ = ‖g‖/‖g_asc‖
        self.previous_gamma = gamma
        if self.renormalize:
            bounded = (
                gamma
                if self.gamma_bounds is None
                else functional.clip_renormalization_factor(gamma, *self.gamma_bounds)
            )
            functional.rescale_(grads, bounded)  # g_asc ← γ·g_asc, γ ∈ [γ_min, γ_max]
        self.base_optimizer.step()
        if zero_grad:
            self.zero_grad()


def optimizer_for(name: str, params, rho: float, **base) -> SSAMOptimizer | GammaControlledSAM:
    """The package's `SSAMOptimizer` for a plain configuration, `GammaControlledSAM` for a controlled one."""
    variant, bounds, scale = CONFIGS[name]
    if bounds is None and not scale:
        return SSAMOptimizer(params, torch.optim.SGD, variant=variant, rho=rho, **base)
    return GammaControlledSAM(params, variant=variant, rho=rho, gamma_bounds=bounds, scale_rho_by_gamma=scale, **base)


def cross_check(steps: int = 40) -> float:
    """A quadratic and the saddle, a few rows replayed through the optimizers; the largest relative deviation."""
    import saddle

    names = list(CONFIGS)
    worst = 0.0
    gen = torch.Generator().manual_seed(5)
    h = torch.randn(4, 4, generator=gen, dtype=torch.float64)
    h = h @ h.T / 4 + 0.1 * torch.eye(4, dtype=torch.float64)
    problems = [
        (lambda x: x @ h, lambda p: 0.5 * p @ h @ p, 4, 1.5),  # gradient per row, objective of one point, dim, rho
        (saddle.gradient, saddle.objective, 2, 0.4),
    ]
    for gradient, objective, dim, rho in problems:
        rows = RowConfig(names, [rho] * len(names), 1, torch.float64)
        x0 = (torch.rand(1, dim, generator=gen, dtype=torch.float64) * 2 - 1).repeat(len(names), 1)  # no blow-up
        xis = torch.randn(steps, dim, generator=gen, dtype=torch.float64) * 0.1
        x, trace = x0.clone(), []
        for t in range(steps):
            x = x - 0.05 * rows.direction(gradient, x, xis[t].expand_as(x))
            trace.append(x.clone())
        for i, name in enumerate(names):
            p = nn.Parameter(x0[i].clone())
            opt = optimizer_for(name, [p], rho, lr=0.05)
            for t in range(steps):
                (objective(p) + xis[t] @ p).backward()
                opt.first_step(zero_grad=True)
                (objective(p) + xis[t] @ p).backward()
                opt.second_step(zero_grad=True)
                ref = trace[t][i]
                worst = max(worst, ((p.detach() - ref).abs() / ref.abs().clamp(min=1.0)).max().item())
    return worst


def saddle_experiment(quick: bool, names: list[str], seeds: int) -> list[dict]:
    import saddle

    n_lrs, n_starts, horizon = (2, 16, 1.0) if quick else (8, 500, 20.0)
    lrs = _common.log_space(1e-3, 0.3, n_lrs)
    gen = torch.Generator().manual_seed(0)
    starts = torch.rand(n_starts, 2, generator=gen) * 4 - 2
    out = []
    for rho in (0.2, 0.4):
        for name in names:
            successes = []
            for lr in lrs:  # one lr at a time: every row has the same budget
                rows = RowConfig([name], [rho], n_starts, torch.float32)
                noise_gen = torch.Generator().manual_seed(1)
                x = starts.clone()
                for _ in range(math.ceil(horizon / lr)):
                    xi = torch.randn(n_starts, 2, generator=noise_gen) * math.sqrt(saddle.NOISE_VAR)
                    x = x - lr * rows.direction(saddle.gradient, x, xi)
                dist = torch.cdist(x, saddle.MINIMA).min(dim=1).values
                ok = torch.isfinite(x).all(dim=1) & (dist < 0.1)
                successes.append(100.0 * ok.double().mean().item())
            out.append(
                {
                    "experiment": "saddle",
                    "config": name,
                    "setting": f"rho={rho:g}",
                    "score": statistics.fmean(successes),
                }
            )
            print(f"  saddle rho={rho:g} {name:15s} mean success {out[-1]['score']:.1f}%", flush=True)
    return out


def lr_stability_experiment(quick: bool, names: list[str], seeds: int) -> list[dict]:
    x, y = _common.digits()
    lrs, epochs = ((1.0,), 1) if quick else ((0.1, 1.0, 3.16), 15)
    if quick:
        x, y = x[:384], y[:384]
    loss_fn = nn.CrossEntropyLoss()
    out = []
    for lr in lrs:
        for name in names:
            losses, accs = [], []
            for seed in range(seeds):
                torch.manual_seed(seed)
                model = _common.small_cnn()
                opt = optimizer_for(name, model.parameters(), 1.0, lr=lr, momentum=0.9, weight_decay=5e-4)
                gen = torch.Generator().manual_seed(seed)
                model.train()
                for _ in range(epochs):
                    perm = torch.randperm(len(x), generator=gen)
                    for i in range(0, len(x) - 127, 128):
                        xb, yb = x[perm[i : i + 128]], y[perm[i : i + 128]]
                        loss_fn(model(xb), yb).backward()
                        opt.first_step(zero_grad=True)
                        with freeze_batchnorm_stats(model):
                            loss_fn(model(xb), yb).backward()
                        opt.second_step(zero_grad=True)
                model.eval()
                with torch.no_grad():
                    logits = model(x)
                    loss = loss_fn(logits, y).item()
                    accs.append((logits.argmax(1) == y).double().mean().item())
                losses.append(loss if math.isfinite(loss) else INF)
            out.append(
                {
                    "experiment": "lr_stability",
                    "config": name,
                    "setting": f"lr={lr:g}",
                    "score": statistics.fmean(losses),
                    "accuracy": statistics.fmean(accs),
                    "per_seed": " ".join(f"{v:.3g}" for v in losses),
                }
            )
            print(
                f"  lr_stability lr={lr:g} {name:15s} loss {out[-1]['score']:.3g} (seeds: {out[-1]['per_seed']}) "
                f"accuracy {out[-1]['accuracy']:.3f}",
                flush=True,
            )
    return out


def quadratic_experiment(quick: bool, names: list[str], seeds: int) -> list[dict]:
    import noisy_quadratic as nq

    steps, seeds = (2000, 1) if quick else (200_000, 3)
    rhos = (0.2, 1.0, 2.0)
    cfg_names = [n for _ in rhos for n in names]
    cfg_rhos = [r for r in rhos for _ in names]
    h = nq.hessians(seeds, 0, torch.float64)
    runs = len(cfg_names)
    rows = RowConfig(cfg_names, cfg_rhos, 1, torch.float64)  # one row per config; seeds stacked below
    for attr in ("rho", "normalized", "renormalize", "lo", "hi", "scale_rho", "previous_gamma"):
        setattr(rows, attr, getattr(rows, attr).repeat(seeds, 1))
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(seeds, 1, nq.D, generator=gen, dtype=torch.float64).expand(seeds, runs, nq.D).reshape(-1, nq.D)

    def gradient(z: torch.Tensor) -> torch.Tensor:
        return torch.bmm(z.view(seeds, runs, nq.D), h).view(-1, nq.D)

    def loss(z: torch.Tensor) -> torch.Tensor:
        return 0.5 * (gradient(z) * z).sum(dim=1)

    noise_gen = torch.Generator().manual_seed(2)
    reach = torch.full((x.shape[0],), INF, dtype=torch.float64)
    tail = torch.zeros(x.shape[0], dtype=torch.float64)
    n_tail = min(nq.TAIL, steps)
    for t in range(1, steps + 1):
        xi = torch.randn(seeds, 1, nq.D, generator=noise_gen, dtype=torch.float64) * math.sqrt(nq.NOISE_VAR)
        x = x - nq.LR * rows.direction(gradient, x, xi.expand(seeds, runs, nq.D).reshape(-1, nq.D))
        if t % 100 == 0 or t > steps - n_tail:
            f = loss(x)
            if t % 100 == 0:
                reach = torch.where(torch.isinf(reach) & (f < nq.THRESHOLD), float(t), reach)
            if t > steps - n_tail:
                tail += f / n_tail
    out = []
    for j, (name, rho) in enumerate(zip(cfg_names, cfg_rhos)):
        idx = [s * runs + j for s in range(seeds)]
        out.append(
            {
                "experiment": "quadratic",
                "config": name,
                "setting": f"rho={rho:g}",
                "score": statistics.fmean(tail[i].item() for i in idx),
                "steps_to_threshold": statistics.median(reach[i].item() for i in idx),
            }
        )
        print(
            f"  quadratic rho={rho:g} {name:15s} final loss {out[-1]['score']:.3g} "
            f"steps to f<{nq.THRESHOLD:g} {out[-1]['steps_to_threshold']:.0f}",
            flush=True,
        )
    return out


HIGHER_IS_BETTER = {"saddle": True, "lr_stability": False, "quadratic": False}


def claims(rows: list[dict]) -> list[str]:
    lines = []
    for experiment in dict.fromkeys(r["experiment"] for r in rows):
        sub = [r for r in rows if r["experiment"] == experiment]
        settings = list(dict.fromkeys(r["setting"] for r in sub))
        at = {(r["config"], r["setting"]): r["score"] for r in sub}
        sign = 1.0 if HIGHER_IS_BETTER[experiment] else -1.0

        def better(a: float, b: float, sign: float = sign) -> bool:
            return sign * (a - b) > 0

        configs = {r["config"] for r in sub}
        for name, base in BASELINE.items():
            if name not in configs or base not in configs:
                continue
            wins = [s for s in settings if better(at[(name, s)], at[(base, s)])]
            others = [o for o in ("usam", "ssam") if o in configs]
            rivals = "both SAM and SSAM" if len(others) == 2 else " and ".join(others) or "nothing else"
            best = [s for s in settings if all(better(at[(name, s)], at[(o, s)]) for o in others)]
            detail = ", ".join(f"{s}: {at[(name, s)]:.3g} vs {at[(base, s)]:.3g}" for s in settings)
            lines.append(
                _common.verdict(
                    len(wins) == len(settings),
                    f"[{experiment}] {name} improves on {base} in {len(wins)}/{len(settings)} settings ({detail}); "
                    f"beats {rivals} in {len(best)}/{len(settings)}",
                )
            )
    return lines


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib.pyplot as plt

    experiments = list(dict.fromkeys(r["experiment"] for r in rows))
    fig, axes = plt.subplots(1, len(experiments), figsize=(5.5 * len(experiments), 3.8), squeeze=False)
    for ax, experiment in zip(axes[0], experiments):
        sub = [r for r in rows if r["experiment"] == experiment]
        settings = list(dict.fromkeys(r["setting"] for r in sub))
        names = list(dict.fromkeys(r["config"] for r in sub))
        width = 0.8 / len(settings)
        for k, setting in enumerate(settings):
            values = [next(r["score"] for r in sub if r["config"] == n and r["setting"] == setting) for n in names]
            values = [min(v, 1e3) for v in values]
            ax.bar([i + k * width for i in range(len(names))], values, width, label=setting)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(names))])
        ax.set_xticklabels(names, rotation=45, ha="right", fontsize=7)
        if not HIGHER_IS_BETTER[experiment]:
            ax.set_yscale("log")
        ylabel = {"saddle": "mean success (%)", "lr_stability": "final training loss", "quadratic": "final loss"}
        ax.set_ylabel(ylabel[experiment])
        ax.set_title(experiment, fontsize=10)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    _common.savefig(fig, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke test, seconds")
    parser.add_argument("--only", choices=["saddle", "lr_stability", "quadratic"], action="append", default=None)
    parser.add_argument(
        "--configs", nargs="+", default=list(CONFIGS), help=f"a subset of {list(CONFIGS)} (default all)"
    )
    parser.add_argument("--seeds", type=int, default=1, help="seeds of the lr_stability runs (default 1)")
    parser.add_argument("--out", type=Path, default=_common.default_out("gamma_control"))
    args = parser.parse_args(argv)
    names = list(dict.fromkeys(args.configs))
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        parser.error(f"--configs: unknown {unknown}; choose from {list(CONFIGS)}")
    torch.set_num_threads(1)
    started = time.perf_counter()
    deviation = cross_check(steps=10 if args.quick else 40)
    print(f"cross-check against SSAMOptimizer / GammaControlledSAM (float64): max |dx| = {deviation:.2e}")
    if not deviation <= 1e-9:
        print("the vectorised runs do not match the optimizers; stopping", file=sys.stderr)
        return 1
    experiments = {
        "saddle": saddle_experiment,
        "lr_stability": lr_stability_experiment,
        "quadratic": quadratic_experiment,
    }
    rows: list[dict] = []
    for name, fn in experiments.items():
        if args.only is None or name in args.only:
            t0 = time.perf_counter()
            rows += fn(args.quick, names, args.seeds)
            print(f"  ({name}: {time.perf_counter() - t0:.0f}s)", flush=True)
    _common.write_csv(args.out / "gamma_control.csv", rows)
    plot(rows, args.out / "gamma_control.png")
    print()
    _common.print_lines(claims(rows))
    print(f"\nwrote {args.out / 'gamma_control.csv'} and gamma_control.png in {time.perf_counter() - started:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
