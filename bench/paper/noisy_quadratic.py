"""Figures 6-7 of the SSAM paper: SGD, SAM, SAM* and SSAM on a noisy quadratic.

Commands (from the repository root)::

    .venv/bin/python bench/paper/noisy_quadratic.py            # 3 seeds x 300k steps, ~1 minute
    .venv/bin/python bench/paper/noisy_quadratic.py --quick    # smoke test, seconds
    .venv/bin/python bench/paper/noisy_quadratic.py --full     # the paper's one million steps

Writes ``noisy_quadratic.csv`` (loss curves), ``noisy_quadratic_summary.csv`` (one row per optimizer and
rho) and ``noisy_quadratic.png`` to ``--out`` (default ``outputs/bench/noisy_quadratic/``).

Setup (Section 5.2). f(x) = 1/2 x^T (A A^T / 2d + delta I) x with d = 20, A in R^(d x 2d) standard Gaussian
and delta = 1e-3; start x0 ~ N(0, I); SGD with a constant lr of 1e-3 as such and as the base of SAM*
(``sam``), SAM (``usam``) and SSAM (``ssam``) with rho in {0.01, 0.05, 0.1, 0.2, 0.5, 1, 2}. Every step
draws gradient noise xi ~ N(0, 1e-4 I), and both passes of that step see the same xi (one mini-batch per
step). A seed draws A, x0 and the noise; every optimizer of a seed shares them. The paper runs one million
steps; the default here runs 300k, ``--full`` the paper's million. The final-loss claims are also read
at shorter budgets (``BUDGETS``: the first T steps of the same run): the smallest eigenvalue of the
Hessian is about 0.09, so what is left of the start decays as exp(-2 lr 0.09 t) and reaches the size of
the noise ball after some 20k-50k steps; the answer depends on the budget.

Measured per optimizer and rho (losses are the noise-free f, means over the seeds):

* steps to converge: the first logged step at which f < ``THRESHOLD`` (1e-4; about 200x SGD's noise ball);
* final loss: the mean of f over the last 1000 steps of the budget (the paper's right panels);
* fluctuation: the standard deviation of log10 f over the last 1000 steps;
* noise ball: the same mean for a run started *at the minimum* (x0 = 0, same noise), after the same number
  of steps: the stationary loss, free of what is left of the initial condition.

All runs advance together as the rows of one tensor (``_common.rowwise_sam_direction``: per-row norms built
from ``hf_ssam.functional``); before the sweep a few rows are replayed through ``SSAMOptimizer`` (SGD base,
float64, same noise) and must agree to 1e-9, or the script stops.

Claims checked (the paper's text): SAM converges faster as rho grows; SAM's final loss first falls then
rises with rho; SSAM converges more slowly than SAM but reaches a lower final loss; SAM's noise ball is
larger than SGD's; SAM* is less stable than SAM (larger final loss and fluctuation).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import _common  # noqa: E402  (before torch: pins the offline, single-threaded environment)
import torch  # noqa: E402

from hf_ssam import SSAMOptimizer  # noqa: E402

OPTIMIZERS: dict[str, str] = {"sgd": "SGD", "sam": "SAM* (sam)", "usam": "SAM (usam)", "ssam": "SSAM (ssam)"}
RHOS: tuple[float, ...] = (0.01, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0)
D, DELTA, LR, NOISE_VAR = 20, 1e-3, 1e-3, 1e-4
THRESHOLD = 1e-4
TAIL = 1000
FIG7_RHO = 1.0  # the rho of the optimizer comparison panel
LOG_EVERY = 100
#: training budgets (steps) at which the final-loss claims are also read: a run of T steps is the first T
#: steps of the longer run (constant lr, same noise), so one run gives them all
BUDGETS: tuple[int, ...] = (
    10_000,
    20_000,
    30_000,
    40_000,
    50_000,
    60_000,
    70_000,
    80_000,
    100_000,
    300_000,
    1_000_000,
)


def hessians(seeds: int, seed0: int, dtype: torch.dtype) -> torch.Tensor:
    """H = A A^T / 2d + delta I per seed, (seeds, d, d)."""
    out = []
    for s in range(seeds):
        gen = torch.Generator().manual_seed(seed0 + 1000 * s)
        a = torch.randn(D, 2 * D, generator=gen, dtype=torch.float64)
        out.append(a @ a.T / (2 * D) + DELTA * torch.eye(D, dtype=torch.float64))
    return torch.stack(out).to(dtype)


def configs(rhos: tuple[float, ...]) -> list[tuple[str, float]]:
    return [("sgd", 0.0)] + [(opt, rho) for opt in ("sam", "usam", "ssam") for rho in rhos]


class Rows:
    """The (config, seed, start) grid as rows: x has shape (seeds * runs, d), H is per seed."""

    def __init__(self, cfgs: list[tuple[str, float]], h: torch.Tensor, extra: dict | None = None) -> None:
        self.cfgs, self.h = cfgs, h
        seeds, dtype = h.shape[0], h.dtype
        self.runs = 2 * len(cfgs)  # every config twice: from x0 and from the minimum (noise ball)
        per_run = [(opt, rho, start) for start in ("x0", "min") for opt, rho in cfgs]
        self.per_run = per_run
        rho = torch.tensor([r for _, r, _ in per_run], dtype=dtype).unsqueeze(1)
        self.rho = rho.repeat(seeds, 1)
        self.normalized = torch.tensor([o == "sam" for o, _, _ in per_run]).unsqueeze(1).repeat(seeds, 1)
        self.renormalize = torch.tensor([o == "ssam" for o, _, _ in per_run]).unsqueeze(1).repeat(seeds, 1)
        self.extra = extra or {}

    def gradient(self, x: torch.Tensor) -> torch.Tensor:
        s = self.h.shape[0]
        return torch.bmm(x.view(s, self.runs, D), self.h).view(-1, D)  # H x (H symmetric)

    def loss(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * (self.gradient(x) * x).sum(dim=1)  # f = 1/2 x^T H x


def run(
    rows: Rows, x0: torch.Tensor, steps: int, noise_seed: int, log_steps: set[int], budgets: list[int]
) -> tuple[dict, dict]:
    """Advance every row ``steps`` SGD-based steps.

    Returns {step: loss per row} at ``log_steps`` and, for every budget T, the losses of the TAIL steps
    up to T, (TAIL, rows).
    """
    seeds = rows.h.shape[0]
    gen = torch.Generator().manual_seed(noise_seed)
    std = math.sqrt(NOISE_VAR)
    x = x0.clone()
    curves = {0: rows.loss(x)}
    tails = {b: torch.empty(TAIL, x.shape[0], dtype=x.dtype) for b in budgets}
    for t in range(1, steps + 1):
        xi = torch.randn(seeds, 1, D, generator=gen, dtype=x.dtype) * std  # one draw per seed, shared by its runs
        xi = xi.expand(seeds, rows.runs, D).reshape(-1, D)
        d, _ = _common.rowwise_sam_direction(rows.gradient, x, xi, rows.rho, rows.normalized, rows.renormalize)
        x = x - LR * d
        if t in log_steps:
            curves[t] = rows.loss(x)
        for b, tail in tails.items():
            if b - TAIL < t <= b:
                tail[t - (b - TAIL) - 1] = rows.loss(x)
    return curves, tails


def cross_check(steps: int = 50) -> float:
    """Replay some rows through SSAMOptimizer one by one (float64); the largest relative deviation."""
    rhos = (0.05, 1.0)
    cfgs = configs(rhos)
    h = hessians(1, 7, torch.float64)
    rows = Rows(cfgs, h)
    gen = torch.Generator().manual_seed(3)
    x0 = torch.randn(1, D, generator=gen, dtype=torch.float64).repeat(rows.runs, 1)
    xis = torch.randn(steps, D, generator=gen, dtype=torch.float64) * math.sqrt(NOISE_VAR)
    x = x0.clone()
    trace = []
    for t in range(steps):
        d, _ = _common.rowwise_sam_direction(
            rows.gradient, x, xis[t].expand_as(x), rows.rho, rows.normalized, rows.renormalize
        )
        x = x - LR * d
        trace.append(x.clone())
    worst = 0.0
    for i, (opt, rho) in enumerate(cfgs):
        p = torch.nn.Parameter(x0[i].clone())
        if opt == "sgd":
            sgd = torch.optim.SGD([p], lr=LR)
        else:
            sam = SSAMOptimizer([p], torch.optim.SGD, variant=opt, rho=rho, lr=LR)
        for t in range(steps):

            def f(p: torch.Tensor = p, xi: torch.Tensor = xis[t]) -> torch.Tensor:
                return 0.5 * p @ h[0] @ p + xi @ p  # gradient H p + xi

            if opt == "sgd":
                sgd.zero_grad()
                f().backward()
                sgd.step()
            else:
                f().backward()
                sam.first_step(zero_grad=True)
                f().backward()
                sam.second_step(zero_grad=True)
            ref = trace[t][i]
            worst = max(worst, ((p.detach() - ref).abs() / ref.abs().clamp(min=1.0)).max().item())
    return worst


def summarize(rows: Rows, curves: dict, tail: torch.Tensor, seeds: int) -> list[dict]:
    steps_logged = sorted(curves)
    out = []
    for j, (opt, rho) in enumerate(rows.cfgs):
        from_x0 = [s * rows.runs + j for s in range(seeds)]
        from_min = [s * rows.runs + len(rows.cfgs) + j for s in range(seeds)]
        reach = []
        for i in from_x0:
            hit = next((t for t in steps_logged if curves[t][i].item() < THRESHOLD), None)
            reach.append(math.inf if hit is None else float(hit))
        final = [tail[:, i].mean().item() for i in from_x0]
        fluct = [tail[:, i].clamp(min=1e-30).log10().std().item() for i in from_x0]
        ball = [tail[:, i].mean().item() for i in from_min]
        out.append(
            {
                "optimizer": opt,
                "rho": rho,
                "steps_to_threshold": statistics.median(reach),
                "final_loss": statistics.fmean(final),
                "log10_fluctuation": statistics.fmean(fluct),
                "noise_ball": statistics.fmean(ball),
            }
        )
    return out


def final_loss_claims(summary: list[dict], rhos: tuple[float, ...], budget: int) -> list[tuple[bool, str]]:
    """The two claims about the loss at the end of a run of ``budget`` steps."""
    at = {(r["optimizer"], r["rho"]): r for r in summary}
    final = [at[("usam", r)]["final_loss"] for r in rhos]
    k = min(range(len(rhos)), key=lambda i: final[i])
    ok = 0 < k < len(rhos) - 1 and final[0] > final[k] < final[-1]
    detail = ", ".join(f"{r:g}: {v:.3g}" for r, v in zip(rhos, final))
    out = [
        (
            ok,
            f"[{budget} steps] SAM's final loss first falls then rises with rho "
            f"(minimum at rho={rhos[k]:g}; {detail})",
        )
    ]
    lower = [at[("ssam", r)]["final_loss"] < at[("usam", r)]["final_loss"] for r in rhos]
    detail = ", ".join(
        f"{r:g}: {at[('ssam', r)]['final_loss']:.3g} vs {at[('usam', r)]['final_loss']:.3g}" for r in rhos
    )
    out.append(
        (
            all(lower),
            f"[{budget} steps] SSAM reaches a lower final loss than SAM at every rho ({sum(lower)}/{len(rhos)}; "
            f"ssam vs usam: {detail})",
        )
    )
    return out


def claims(summary: list[dict], rhos: tuple[float, ...], by_budget: dict[int, list[dict]]) -> list[str]:
    at = {(r["optimizer"], r["rho"]): r for r in summary}
    sgd = at[("sgd", 0.0)]
    lines = []
    reach = [at[("usam", r)]["steps_to_threshold"] for r in rhos]
    ok = all(b <= a for a, b in zip(reach, reach[1:])) and reach[-1] < reach[0]
    detail = ", ".join(f"{r:g}: {v:.0f}" for r, v in zip(rhos, reach))
    lines.append(_common.verdict(ok, f"SAM converges faster as rho grows (steps to f < {THRESHOLD:g}: {detail})"))
    slower = [at[("ssam", r)]["steps_to_threshold"] > at[("usam", r)]["steps_to_threshold"] for r in rhos]
    detail = ", ".join(
        f"{r:g}: {at[('ssam', r)]['steps_to_threshold']:.0f} vs {at[('usam', r)]['steps_to_threshold']:.0f}"
        for r in rhos
    )
    lines.append(
        _common.verdict(
            all(slower), f"SSAM converges more slowly than SAM at every rho (steps, ssam vs usam: {detail})"
        )
    )
    for budget, rows in sorted(by_budget.items()):
        lines += [_common.verdict(ok, text) for ok, text in final_loss_claims(rows, rhos, budget)]
    larger = [at[("usam", r)]["noise_ball"] > sgd["noise_ball"] for r in rhos]
    detail = ", ".join(f"{r:g}: {at[('usam', r)]['noise_ball']:.3g}" for r in rhos)
    lines.append(
        _common.verdict(
            all(larger), f"SAM's noise ball is larger than SGD's ({sgd['noise_ball']:.3g}) at every rho ({detail})"
        )
    )
    less = [
        at[("sam", r)]["final_loss"] > at[("usam", r)]["final_loss"]
        and at[("sam", r)]["log10_fluctuation"] > at[("usam", r)]["log10_fluctuation"]
        for r in rhos
    ]
    detail = ", ".join(
        f"{r:g}: {at[('sam', r)]['final_loss']:.3g}/{at[('sam', r)]['log10_fluctuation']:.2f} vs "
        f"{at[('usam', r)]['final_loss']:.3g}/{at[('usam', r)]['log10_fluctuation']:.2f}"
        for r in rhos
    )
    lines.append(
        _common.verdict(
            all(less),
            f"SAM* is less stable than SAM: larger final loss and log10 fluctuation at every rho "
            f"({sum(less)}/{len(rhos)}; sam vs usam, final/fluct: {detail})",
        )
    )
    return lines


def plot(
    curve_rows: list[dict], summary: list[dict], rhos: tuple[float, ...], by_budget: dict[int, list[dict]], path: Path
) -> None:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(18, 3.6))
    fig.subplots_adjust(wspace=0.35)
    cmap = plt.get_cmap("viridis")
    for i, rho in enumerate(rhos):  # Figure 6 (left): SAM for every rho
        sub = [r for r in curve_rows if r["optimizer"] == "usam" and r["rho"] == rho]
        axes[0].plot([r["step"] for r in sub], [r["loss"] for r in sub], color=cmap(i / len(rhos)), label=f"{rho:g}")
    sub = [r for r in curve_rows if r["optimizer"] == "sgd"]
    axes[0].plot([r["step"] for r in sub], [r["loss"] for r in sub], "k:", label="SGD")
    axes[0].set_title("SAM (usam), rho = ...", fontsize=10)
    axes[0].legend(fontsize=7, ncol=2)
    mid = FIG7_RHO if FIG7_RHO in rhos else rhos[len(rhos) // 2]
    styles = {"sgd": ("k", ":"), "sam": ("tab:orange", "--"), "usam": ("tab:blue", "-."), "ssam": ("tab:green", "-")}
    for opt, label in OPTIMIZERS.items():  # Figure 7 (left): the optimizers at one rho
        r0 = 0.0 if opt == "sgd" else mid
        sub = [r for r in curve_rows if r["optimizer"] == opt and r["rho"] == r0]
        color, ls = styles[opt]
        axes[1].plot([r["step"] for r in sub], [r["loss"] for r in sub], ls, color=color, label=label)
    axes[1].set_title(f"optimizers at rho = {mid:g}", fontsize=10)
    axes[1].legend(fontsize=7)
    for ax in axes[:2]:
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("f(x)")
        ax.grid(alpha=0.3)
    for opt, label in OPTIMIZERS.items():  # final loss against rho
        color, ls = styles[opt]
        if opt == "sgd":
            value = next(r["final_loss"] for r in summary if r["optimizer"] == "sgd")
            axes[2].axhline(value, color=color, ls=ls, label=label)
            continue
        sub = sorted((r for r in summary if r["optimizer"] == opt), key=lambda r: r["rho"])
        axes[2].plot(
            [r["rho"] for r in sub], [r["final_loss"] for r in sub], ls, marker="o", ms=3, color=color, label=label
        )
    axes[2].set_xscale("log")
    axes[2].set_yscale("log")
    axes[2].set_xlabel("rho")
    axes[2].set_ylabel(f"mean f over the last {TAIL} steps")
    axes[2].legend(fontsize=7)
    axes[2].grid(alpha=0.3)
    axes[2].set_title(f"after {max(by_budget)} steps", fontsize=10)
    for i, (budget, rows) in enumerate(sorted(by_budget.items())):  # the rho trade-off at every budget
        sub = sorted((r for r in rows if r["optimizer"] == "usam"), key=lambda r: r["rho"])
        first = sub[0]["final_loss"]
        axes[3].plot(
            [r["rho"] for r in sub],
            [r["final_loss"] / first for r in sub],
            marker="o",
            ms=3,
            color=cmap(i / len(by_budget)),
            label=f"{budget}",
        )
    axes[3].set_xscale("log")
    axes[3].set_yscale("log")
    axes[3].set_xlabel("rho")
    axes[3].set_ylabel(f"SAM final loss / at rho={rhos[0]:g}")
    axes[3].set_title("SAM (usam) by budget (steps)", fontsize=10)
    axes[3].legend(fontsize=6, ncol=2)
    axes[3].grid(alpha=0.3)
    _common.savefig(fig, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="smoke test: 1 seed, 3000 steps")
    size.add_argument("--full", action="store_true", help="one million steps, as in the paper")
    parser.add_argument("--steps", type=int, default=None, help="steps per run (default 300000)")
    parser.add_argument("--seeds", type=int, default=None, help="seeds (default 3)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=_common.default_out("noisy_quadratic"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    steps, seeds = (3000, 1) if args.quick else (1_000_000, 3) if args.full else (300_000, 3)
    steps, seeds = args.steps or steps, args.seeds or seeds
    started = time.perf_counter()
    deviation = cross_check(steps=20 if args.quick else 50)
    print(f"cross-check against SSAMOptimizer (float64, one optimizer per run): max |dx| = {deviation:.2e}")
    if not deviation <= 1e-9:
        print("the vectorised runs do not match SSAMOptimizer; stopping", file=sys.stderr)
        return 1
    dtype = torch.float64
    cfgs = configs(RHOS)
    h = hessians(seeds, args.seed, dtype)
    rows = Rows(cfgs, h)
    gen = torch.Generator().manual_seed(args.seed + 1)
    x0 = torch.randn(seeds, 1, D, generator=gen, dtype=dtype).expand(seeds, rows.runs, D).clone()
    x0[:, len(cfgs) :] = 0.0  # the second copy of every config starts at the minimum
    eig = torch.linalg.eigvalsh(h)
    print(
        f"{len(cfgs)} configs x {seeds} seeds, {steps} steps, Hessian eigenvalues in "
        f"[{eig.min().item():.3g}, {eig.max().item():.3g}], initial f mean {rows.loss(x0.view(-1, D)).mean():.3g}",
        flush=True,
    )
    log_steps = {int(round(v)) for v in _common.log_space(1, steps, 300)} | set(range(0, steps + 1, LOG_EVERY))
    budgets = sorted({b for b in BUDGETS if TAIL <= b < steps} | {steps})
    curves, tails = run(rows, x0.view(-1, D), steps, args.seed + 2, log_steps, budgets)
    by_budget = {b: summarize(rows, curves, tails[b], seeds) for b in budgets}
    summary = by_budget[steps]
    curve_rows = []
    for j, (opt, rho) in enumerate(cfgs):
        for t in sorted(curves):
            values = [curves[t][s * rows.runs + j].item() for s in range(seeds)]
            curve_rows.append({"optimizer": opt, "rho": rho, "step": t, "loss": statistics.fmean(values)})
    _common.write_csv(args.out / "noisy_quadratic.csv", curve_rows)
    _common.write_csv(
        args.out / "noisy_quadratic_summary.csv", [{"budget": b, **r} for b in budgets for r in by_budget[b]]
    )
    plot(curve_rows, summary, RHOS, by_budget, args.out / "noisy_quadratic.png")
    print()
    cols = ["optimizer", "rho", "steps_to_threshold", "final_loss", "log10_fluctuation", "noise_ball"]
    print(_common.format_table(summary, cols))
    print()
    _common.print_lines(claims(summary, RHOS, by_budget))
    print(
        f"\nwrote {args.out / 'noisy_quadratic.csv'}, the summary and the plot in {time.perf_counter() - started:.0f}s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
