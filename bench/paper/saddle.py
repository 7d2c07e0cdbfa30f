"""Figure 2 of the SSAM paper: escaping the saddle of f(x1, x2) = x1^4/4 - x1 x2 + x2^2/2.

Commands (from the repository root)::

    .venv/bin/python bench/paper/saddle.py            # 16 learning rates x 1000 starts, ~1-3 minutes
    .venv/bin/python bench/paper/saddle.py --quick    # smoke test, seconds
    .venv/bin/python bench/paper/saddle.py --full     # the paper's 100 learning rates x 10000 starts

Writes ``saddle.csv`` and ``saddle.png`` to ``--out`` (default ``outputs/bench/saddle/``).

Setup. f has a strict saddle at (0, 0) and minima at +-(1, 1). For every learning rate (log-spaced in
[1e-3, 0.3]) the same random starts, uniform in [-2, 2]^2, are trained with plain SGD and with SGD as the
base optimizer of SAM* (``sam``), SAM (``usam``) and SSAM (``ssam``), rho in {0.05, 0.2, 0.4}. Gradient
noise: every step draws xi ~ N(0, 0.005 I) and both passes of that step differentiate f(x) + xi.x (one
"mini-batch" per step, the same in both passes, as in the package).

Iteration budget: each run gets ``ceil(H / lr)`` steps (the same continuous time H = 20 for every
learning rate, 20000 steps at lr = 1e-3), enough for SGD to escape the saddle from almost every start.
Success: the final iterate is finite and within 0.1 of (1, 1) or (-1, -1); runs stuck near the saddle,
still wandering (e.g. jittering around a minimum by more than 0.1) or diverged count as failures.

Design. The runs are independent, so norms must be *per run*, while ``SSAMOptimizer`` and
``hf_ssam.functional`` take norms globally over all the tensors they are given: one optimizer over a
(N, 2) parameter, or over N (2,)-parameters, would mix the starts. All runs are therefore advanced
together as rows of one (rows, 2) tensor, with per-row norms and the package's element-wise pieces
(``functional.perturbation_scale``, ``functional.renormalization_factor``, ``functional.uses_renormalization``).
Before the sweep a few runs are replayed one by one through the package's own ``SSAMOptimizer`` (SGD base,
float64, the same noise) and must match the vectorised trajectories to 1e-9; the script stops otherwise.

Claims checked (printed as HOLDS / DOES NOT HOLD): SSAM ~ SGD at every lr (within 5 points); SAM and SAM*
fail more as lr grows and as rho grows; SAM* is the worst.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402

import _common  # noqa: E402  (before torch: pins the offline, single-threaded environment)
import torch  # noqa: E402

from hf_ssam import (
    SSAMOptimizer,  # noqa: E402
    functional,  # noqa: E402
)

OPTIMIZERS: dict[str, str] = {"sgd": "SGD", "sam": "SAM* (sam)", "usam": "SAM (usam)", "ssam": "SSAM (ssam)"}
RHOS: tuple[float, ...] = (0.05, 0.2, 0.4)
NOISE_VAR = 0.005
MINIMA = torch.tensor([[1.0, 1.0], [-1.0, -1.0]])


def objective(x: torch.Tensor) -> torch.Tensor:
    """f(x1, x2) = x1^4/4 - x1 x2 + x2^2/2, per row of an (n, 2) tensor (or for one (2,) point)."""
    x1, x2 = x[..., 0], x[..., 1]
    return x1**4 / 4 - x1 * x2 + x2**2 / 2


def gradient(x: torch.Tensor) -> torch.Tensor:
    """grad f = (x1^3 - x2, x2 - x1), per row."""
    x1, x2 = x[..., 0], x[..., 1]
    return torch.stack((x1**3 - x2, x2 - x1), dim=-1)


def run_rows(
    variant: str,
    rho: float,
    lr: torch.Tensor,
    x0: torch.Tensor,
    budgets: torch.Tensor,
    noise: Callable[[int, int], torch.Tensor],
    trace: list[torch.Tensor] | None = None,
) -> torch.Tensor:
    """Train every row of ``x0`` (independent runs) with SGD or an SGD-based SAM variant; returns final points.

    ``lr`` (rows, 1) and ``budgets`` (rows,) are per row, ``budgets`` sorted in decreasing order so that the
    rows still training at step t are a prefix. ``noise(t, n)`` is the (n, 2) gradient noise of step t.
    """
    x = x0.clone()
    max_steps = int(budgets[0]) if len(budgets) else 0
    # active[t] = number of rows whose budget exceeds t
    active = torch.searchsorted(-budgets.double(), -torch.arange(max_steps, dtype=torch.float64), right=False)
    renormalize = variant != "sgd" and functional.uses_renormalization(variant, None)
    for t in range(max_steps):
        n = int(active[t])
        xa = x[:n]
        xi = noise(t, n)
        g = gradient(xa) + xi  # g = grad F(x)
        if variant == "sgd":
            d = g
        else:
            grad_norm = torch.linalg.vector_norm(g, dim=1, keepdim=True)  # ||g|| per run
            scale = functional.perturbation_scale(variant, rho, grad_norm)  # e = scale * g
            ok = torch.isfinite(scale) & torch.isfinite(grad_norm) & (grad_norm > 0)  # else: no perturbation
            e = torch.where(ok, scale * g, 0.0)
            d = gradient(xa + e) + xi  # g_asc = grad F(x + e), same noise (same mini-batch)
            if renormalize:
                ascent_norm = torch.linalg.vector_norm(d, dim=1, keepdim=True)
                gamma, _ = functional.renormalization_factor(grad_norm, ascent_norm)  # gamma = ||g|| / ||g_asc||
                d = d * gamma
        x[:n] = xa - lr[:n] * d  # the SGD base step
        if trace is not None:
            trace.append(x.clone())
    return x


def _relative_deviation(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max(1, |b|); 0 if both diverged, inf if only one did."""
    fa, fb = bool(torch.isfinite(a).all()), bool(torch.isfinite(b).all())
    if fa and fb:
        return ((a - b).abs() / b.abs().clamp(min=1.0)).max().item()
    return 0.0 if not (fa or fb) else math.inf


def cross_check(steps: int = 60, starts: int = 3) -> float:
    """Replay a few runs through ``SSAMOptimizer`` one by one; returns the largest deviation from ``run_rows``."""
    gen = torch.Generator().manual_seed(123)
    x0 = torch.rand(starts, 2, generator=gen, dtype=torch.float64) * 4 - 2
    lr_value = 0.05
    lr = torch.full((starts, 1), lr_value, dtype=torch.float64)
    budgets = torch.full((starts,), steps)
    xi_all = torch.randn(steps, starts, 2, generator=gen, dtype=torch.float64) * math.sqrt(NOISE_VAR)
    worst = 0.0
    for variant in ("sam", "usam", "ssam"):
        for rho in (0.05, 0.4):
            trace: list[torch.Tensor] = []
            run_rows(variant, rho, lr, x0, budgets, lambda t, n: xi_all[t, :n], trace)
            for i in range(starts):
                p = torch.nn.Parameter(x0[i].clone())
                opt = SSAMOptimizer([p], torch.optim.SGD, variant=variant, rho=rho, lr=lr_value)
                for t in range(steps):
                    xi = xi_all[t, i]
                    (objective(p) + (xi * p).sum()).backward()
                    opt.first_step(zero_grad=True)
                    (objective(p) + (xi * p).sum()).backward()
                    opt.second_step(zero_grad=True)
                    worst = max(worst, _relative_deviation(p.detach(), trace[t][i]))
    return worst


def sweep(lrs: list[float], n_starts: int, horizon: float, seed: int, dtype: torch.dtype) -> list[dict]:
    """Success rate for every optimizer, rho and learning rate."""
    gen = torch.Generator().manual_seed(seed)
    starts = torch.rand(n_starts, 2, generator=gen, dtype=dtype) * 4 - 2
    lrs_sorted = sorted(lrs)  # increasing lr = decreasing budget
    lr = torch.tensor(lrs_sorted, dtype=dtype).repeat_interleave(n_starts).unsqueeze(1)
    per_lr_budget = [math.ceil(horizon / v) for v in lrs_sorted]
    budgets = torch.tensor(per_lr_budget).repeat_interleave(n_starts)
    x0 = starts.repeat(len(lrs_sorted), 1)
    std = math.sqrt(NOISE_VAR)
    minima = MINIMA.to(dtype)
    rows = []
    for variant in OPTIMIZERS:
        for rho in RHOS if variant != "sgd" else (0.0,):
            noise_gen = torch.Generator().manual_seed(seed + 1)  # the same noise for every optimizer

            def noise(t: int, n: int, gen: torch.Generator = noise_gen) -> torch.Tensor:
                return torch.randn(n, 2, generator=gen, dtype=dtype) * std

            started = time.perf_counter()
            final = run_rows(variant, rho, lr, x0, budgets, noise)
            dist = torch.cdist(final, minima).min(dim=1).values
            success = (torch.isfinite(final).all(dim=1) & (dist < 0.1)).view(len(lrs_sorted), n_starts)
            stuck = (torch.linalg.vector_norm(final, dim=1) < 0.1).view(len(lrs_sorted), n_starts)
            diverged = (~torch.isfinite(final).all(dim=1)).view(len(lrs_sorted), n_starts)
            for j, value in enumerate(lrs_sorted):
                rows.append(
                    {
                        "optimizer": variant,
                        "rho": rho,
                        "lr": value,
                        "steps": per_lr_budget[j],
                        "success_pct": 100.0 * success[j].double().mean().item(),
                        "near_saddle_pct": 100.0 * stuck[j].double().mean().item(),
                        "diverged_pct": 100.0 * diverged[j].double().mean().item(),
                    }
                )
            print(
                f"  {variant:5s} rho={rho:<5g} mean success {100 * success.double().mean().item():5.1f}% "
                f"({time.perf_counter() - started:.1f}s)",
                flush=True,
            )
    return rows


def claims(rows: list[dict]) -> list[str]:
    def curve(opt: str, rho: float) -> list[float]:
        rho = 0.0 if opt == "sgd" else rho
        return [
            r["success_pct"] for r in sorted(rows, key=lambda r: r["lr"]) if r["optimizer"] == opt and r["rho"] == rho
        ]

    def mean(v: list[float]) -> float:
        return sum(v) / len(v)

    sgd = curve("sgd", 0.0)
    k = max(1, len(sgd) // 4)  # compare the lowest and the highest quarter of the learning rates
    gap = max(abs(a - b) for rho in RHOS for a, b in zip(curve("ssam", rho), sgd))
    lines = [_common.verdict(gap <= 5.0, f"SSAM ~ SGD at every lr and rho (largest gap {gap:.1f} points <= 5)")]
    for opt in ("usam", "sam"):
        drops = [(mean(curve(opt, rho)[:k]), mean(curve(opt, rho)[-k:])) for rho in RHOS]
        ok = all(hi < lo for lo, hi in drops)
        detail = ", ".join(f"rho={rho:g}: {lo:.0f}% -> {hi:.0f}%" for rho, (lo, hi) in zip(RHOS, drops))
        lines.append(_common.verdict(ok, f"{OPTIMIZERS[opt]} fails more at large lr ({detail})"))
        means = [mean(curve(opt, rho)) for rho in RHOS]
        ok = all(a >= b for a, b in zip(means, means[1:])) and means[0] > means[-1]
        detail = ", ".join(f"rho={rho:g}: {m:.0f}%" for rho, m in zip(RHOS, means))
        lines.append(_common.verdict(ok, f"{OPTIMIZERS[opt]} fails more as rho grows (mean success {detail})"))
    worst = all(mean(curve("sam", rho)) <= min(mean(curve(o, rho)) for o in ("sgd", "usam", "ssam")) for rho in RHOS)
    detail = "; ".join(
        f"rho={rho:g}: " + " ".join(f"{o}={mean(curve(o, rho)):.0f}%" for o in OPTIMIZERS) for rho in RHOS
    )
    lines.append(_common.verdict(worst, f"SAM* is the worst (mean success over lr: {detail})"))
    return lines


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(RHOS), figsize=(4.2 * len(RHOS), 3.4), sharey=True)
    styles = {"sgd": ("k", "-"), "sam": ("tab:orange", "--"), "usam": ("tab:blue", "-."), "ssam": ("tab:green", "-")}
    for ax, rho in zip(axes, RHOS):
        for opt, label in OPTIMIZERS.items():
            sub = sorted(
                (r for r in rows if r["optimizer"] == opt and r["rho"] == (0.0 if opt == "sgd" else rho)),
                key=lambda r: r["lr"],
            )
            color, ls = styles[opt]
            ax.plot([r["lr"] for r in sub], [r["success_pct"] for r in sub], ls, color=color, label=label, lw=1.6)
        ax.set_xscale("log")
        ax.set_xlabel("learning rate")
        ax.set_title(f"rho = {rho:g}")
        ax.set_ylim(-3, 103)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("successful runs (%)")
    axes[0].legend(fontsize=8, loc="lower left")
    _common.savefig(fig, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="smoke test: 4 lrs x 64 starts, short horizon")
    size.add_argument("--full", action="store_true", help="paper size: 100 lrs x 10000 starts")
    parser.add_argument("--lrs", type=int, default=None, help="number of learning rates (default 16)")
    parser.add_argument("--starts", type=int, default=None, help="random starts per lr (default 1000)")
    parser.add_argument("--horizon", type=float, default=None, help="steps per run = ceil(horizon / lr) (default 20)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=_common.default_out("saddle"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    n_lrs, n_starts, horizon = (4, 64, 2.0) if args.quick else (100, 10000, 20.0) if args.full else (16, 1000, 20.0)
    n_lrs, n_starts = args.lrs or n_lrs, args.starts or n_starts
    horizon = args.horizon or horizon
    started = time.perf_counter()

    deviation = cross_check(steps=20 if args.quick else 60)
    print(f"cross-check against SSAMOptimizer (float64, one optimizer per run): max |dx| = {deviation:.2e}")
    if not deviation <= 1e-9:
        print("the vectorised runs do not match SSAMOptimizer; stopping", file=sys.stderr)
        return 1

    lrs = _common.log_space(1e-3, 0.3, n_lrs)
    print(
        f"{n_lrs} lrs in [1e-3, 0.3] x {n_starts} starts, steps = ceil({horizon:g}/lr) "
        f"({math.ceil(horizon / lrs[0])} at lr=1e-3), noise var {NOISE_VAR}",
        flush=True,
    )
    rows = sweep(lrs, n_starts, horizon, args.seed, torch.float32)
    _common.write_csv(args.out / "saddle.csv", rows)
    plot(rows, args.out / "saddle.png")
    print()
    _common.print_lines(claims(rows))
    print(f"\nwrote {args.out / 'saddle.csv'} and saddle.png in {time.perf_counter() - started:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
