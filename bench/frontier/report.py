"""Statistics over seeds, the paired cost ratio, the table, the verdict and the plot of the cost frontier."""

from __future__ import annotations

import math
import random
import statistics
from pathlib import Path
from typing import Any

import _common

from recipes.demo import mean_ci, paired_difference

__all__ = ["KEEP", "MAX_COST", "cost_ratio", "plot", "summarize", "table", "verdict_lines"]

#: The target: keep at least KEEP of full SSAM's accuracy gain over SGD at no more than MAX_COST times its cost.
KEEP, MAX_COST = 0.8, 1.3
#: Steps per block of the paired cost bootstrap: whole cycles of sam_interval 2 and 5.
BLOCK = 10


def cost_ratio(runs: list[dict], plain: list[dict], resamples: int = 2000) -> tuple[float, float, float]:
    """Thread CPU time of the whole run over ``plain``'s, paired by seed and step, with a 95 % bootstrap interval.

    The runs of one seed advanced in lockstep (one step each per turn), so the i-th step of one and of the other
    ran at nearly the same moment; blocks of `BLOCK` consecutive steps of both are resampled together, and the
    ratio is that of the totals (a late-phase schedule's cheap and expensive halves both count).
    """
    by_seed = {run["seed"]: run["step_times"] for run in plain}
    blocks = []
    for run in runs:
        a, b = run["step_times"], by_seed[run["seed"]]
        blocks += [(sum(a[i : i + BLOCK]), sum(b[i : i + BLOCK])) for i in range(0, len(a), BLOCK)]
    total = sum(x for x, _ in blocks) / sum(y for _, y in blocks)
    rng = random.Random(0)
    boot = []
    for _ in range(resamples):
        sample = rng.choices(blocks, k=len(blocks))
        boot.append(sum(x for x, _ in sample) / sum(y for _, y in sample))
    boot.sort()
    return total, boot[int(0.025 * resamples)], boot[int(0.975 * resamples) - 1]


def _by_seed(runs: list[dict], key: str = "accuracy", scale: float = 100.0) -> dict[int, float]:
    return {run["seed"]: scale * run[key] for run in runs}


def summarize(rows: list[dict[str, Any]], baseline: str = "none", full: str = "ssam") -> list[dict[str, Any]]:
    """One row per (task, schedule): accuracy (%) mean, std, 95 % CI; paired Δ vs ``baseline``; the fraction of
    ``full``'s gain kept; the top Hessian eigenvalue; passes per step; cost relative to ``baseline``."""
    out = []
    for task in dict.fromkeys(r["task"] for r in rows):
        at = [r for r in rows if r["task"] == task]
        base = [r for r in at if r["schedule"] == baseline]
        full_gain = paired_difference(_by_seed(base), _by_seed([r for r in at if r["schedule"] == full]))
        for schedule in dict.fromkeys(r["schedule"] for r in at):
            group = [r for r in at if r["schedule"] == schedule]
            acc = [100 * r["accuracy"] for r in group]
            mean, half = mean_ci(acc)
            eig = [r["hessian_top"] for r in group]
            gain = paired_difference(_by_seed(base), _by_seed(group))
            vs_full = paired_difference(_by_seed([r for r in at if r["schedule"] == full]), _by_seed(group))
            cost, low, high = cost_ratio(group, base) if base else (math.nan,) * 3
            kept = gain.mean / full_gain.mean if full_gain.mean > 0 else math.nan
            out.append({
                "task": task, "schedule": schedule, "seeds": len(group), "rho": group[0]["rho"],
                "acc_mean": mean, "acc_std": statistics.stdev(acc) if len(acc) > 1 else math.nan, "acc_ci": half,
                "gain": gain.mean, "gain_ci": gain.half_width, "gain_p": gain.t_p,
                "vs_full": vs_full.mean, "vs_full_ci": vs_full.half_width, "kept": kept,
                "eig_mean": statistics.fmean(eig), "eig_std": statistics.stdev(eig) if len(eig) > 1 else math.nan,
                "forwards": statistics.fmean(r["forwards_per_step"] for r in group),
                "backwards": statistics.fmean(r["backwards_per_step"] for r in group),
                "expected": statistics.fmean(r["expected_passes"] for r in group),
                "cost": cost, "cost_low": low, "cost_high": high,
                "meets": schedule not in (baseline, full) and kept >= KEEP and cost <= MAX_COST,
            })  # fmt: skip
    return out


def _pm(mean: float, spread: float, fmt: str = ".1f", signed: bool = False) -> str:
    if not math.isfinite(mean):
        return "—"
    text = format(mean, ("+" if signed else "") + fmt)
    return text + (f" ± {format(spread, fmt)}" if math.isfinite(spread) else "")


def table(summary: list[dict[str, Any]]) -> str:
    """The markdown table: one row per (task, schedule)."""
    lines = [
        "| task | schedule | ρ | accuracy % (mean ± std) | 95 % CI | Δ vs none (paired, 95 % CI) "
        "| Δ vs ssam (paired, 95 % CI) | kept of ssam's gain | top Hessian eigenvalue (mean ± std) "
        "| fwd / bwd passes per step (expected) | cost vs none (95 % CI) | ≥ 80 % at ≤ 1.3× |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summary:
        ci = f"[{s['acc_mean'] - s['acc_ci']:.1f}, {s['acc_mean'] + s['acc_ci']:.1f}]" if math.isfinite(
            s["acc_ci"]) else "—"  # fmt: skip
        base = s["schedule"] == "none"
        kept = "—" if base or not math.isfinite(s["kept"]) else f"{100 * s['kept']:.0f} %"
        lines.append(
            f"| {s['task']} | `{s['schedule']}` | {s['rho']:.3g} | {_pm(s['acc_mean'], s['acc_std'])} | {ci} "
            f"| {'—' if base else _pm(s['gain'], s['gain_ci'], signed=True)} "
            f"| {'—' if s['schedule'] == 'ssam' else _pm(s['vs_full'], s['vs_full_ci'], signed=True)} "
            f"| {kept} "
            f"| {_pm(s['eig_mean'], s['eig_std'], '.2f')} "
            f"| {s['forwards']:.3g} / {s['backwards']:.3g} ({s['expected']:.3g}) "
            f"| {s['cost']:.2f} [{s['cost_low']:.2f}, {s['cost_high']:.2f}] "
            f"| {'—' if s['schedule'] in ('none', 'ssam') else ('yes' if s['meets'] else 'no')} |"
        )
    return "\n".join(lines)


def verdict_lines(summary: list[dict[str, Any]]) -> list[str]:
    """One HOLDS / DOES NOT HOLD line per (task, schedule), then the VERDICT over all tasks."""
    lines = []
    tasks = list(dict.fromkeys(s["task"] for s in summary))
    for task in tasks:
        full = next(s for s in summary if s["task"] == task and s["schedule"] == "ssam")
        measurable = full["gain"] - full["gain_ci"] > 0
        lines.append(
            f"[{task}] full SSAM over SGD: {full['gain']:+.2f} ± {full['gain_ci']:.2f} points (paired, 95 % CI; "
            f"{'distinguishable from zero' if measurable else 'NOT distinguishable from zero'}) "
            f"at {full['cost']:.2f}x cost"
        )
        for s in summary:
            if s["task"] != task or s["schedule"] in ("none", "ssam"):
                continue
            claim = (
                f"[{task}] {s['schedule']} keeps >= {100 * KEEP:.0f} % of full SSAM's gain at <= {MAX_COST}x cost "
                f"(keeps {100 * s['kept']:.0f} %: {s['gain']:+.2f} of {full['gain']:+.2f} points; "
                f"cost {s['cost']:.2f}x [{s['cost_low']:.2f}, {s['cost_high']:.2f}])"
            )
            lines.append(_common.verdict(bool(s["meets"]), claim))
    schedules = [s["schedule"] for s in summary if s["task"] == tasks[0] and s["schedule"] not in ("none", "ssam")]
    passing = [n for n in schedules if all(s["meets"] for s in summary if s["schedule"] == n)]
    lines.append(
        f"VERDICT: schedules keeping >= {100 * KEEP:.0f} % of full SSAM's accuracy gain over SGD at <= {MAX_COST}x "
        f"cost on every task ({', '.join(tasks)}): {', '.join(passing) if passing else 'none'}"
    )
    return lines


def pareto(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both cost (lower) and accuracy (higher), by cost."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front, best = [], -math.inf
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front


def plot(summary: list[dict[str, Any]], path: Path, title: str) -> Path:
    """Accuracy (mean ± std over seeds) against cost (paired ratio, 95 % CI) per task, Pareto front marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(s["task"] for s in summary))
    fig, axes = plt.subplots(1, len(tasks), figsize=(6.5 * len(tasks), 5.2), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        rows = [s for s in summary if s["task"] == task]
        points = [(s["cost"], s["acc_mean"]) for s in rows]
        front = pareto(points)
        for i, s in enumerate(rows):
            color = "tab:red" if i in front else "tab:blue"
            ax.errorbar(s["cost"], s["acc_mean"], yerr=s["acc_std"],
                        xerr=[[s["cost"] - s["cost_low"]], [s["cost_high"] - s["cost"]]],
                        fmt="o", color=color, capsize=3, markersize=5)  # fmt: skip
            ax.annotate(s["schedule"], (s["cost"], s["acc_mean"]), textcoords="offset points", xytext=(5, 4),
                        fontsize=7)  # fmt: skip
        fx, fy = zip(*sorted(points[i] for i in front))
        ax.step(fx, fy, where="post", color="tab:red", alpha=0.6, label="Pareto front")
        base = next(s for s in rows if s["schedule"] == "none")["acc_mean"]
        full = next(s for s in rows if s["schedule"] == "ssam")["acc_mean"]
        ax.axhline(base + KEEP * (full - base), color="grey", linestyle="--", linewidth=0.8,
                   label=f"{100 * KEEP:.0f} % of ssam's gain")  # fmt: skip
        ax.axvline(MAX_COST, color="grey", linestyle=":", linewidth=0.8, label=f"{MAX_COST}x cost")
        ax.set(title=task, xlabel="cost vs none (thread CPU time, paired)", ylabel="clean validation accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return _common.savefig(fig, path, dpi=100)
