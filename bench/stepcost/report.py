"""The report of the step-cost benchmark: PASS/FAIL/INFO checks, the plain-loop AMP summary, the plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import _common

from .amp_loops import AMP_LABEL
from .timing import paired_ratio

__all__ = ["AMP_TARGETS", "amp_summary", "checks_for", "plot"]

#: Targets of the plain-loop AMP configuration.
AMP_TARGETS = {"amp:plain": 2.05, "amp:ssam": 1.03}


def checks_for(model_name: str, rows: list[dict[str, Any]], extra: dict, memory: list[dict[str, Any]] | None):
    """The PASS/FAIL lines (target applies) and INFO lines (reported only), for the configurations that ran."""
    med = {r["config"]: r["median_ms"] for r in rows}
    times = extra["times"]
    book = extra["book"]
    out = []

    def add(name: str, value: float, target: float | None, note: str = "", ci: tuple[float, float] | None = None):
        status = "INFO" if target is None else ("PASS" if value <= target else "FAIL")
        out.append(
            {
                "model": model_name,
                "check": name,
                "value": value,
                "ci95": "" if ci is None else f"[{ci[0]:.3f}, {ci[1]:.3f}]",
                "target": "" if target is None else f"<= {target:g}",
                "status": status,
                "note": note,
            }
        )

    def ratio(a: str, b: str, target: float | None, note: str = "", group: int = 1) -> None:
        if a in times and b in times:
            value, low, high = paired_ratio(times[a], times[b], group)
            add(f"{a} / {b}", value, target, note, (low, high))

    ratio("trainer:ssam", "trainer:plain", 2.05, "two passes: 2.0 is the physical limit")
    ratio("trainer:ssam", "trainer:sam", 1.02)
    ratio("trainer:ssam", "loop:ssam", 1.05, "Trainer integration over hand-written SSAM maths")
    ratio("loop:ssam", "loop:plain", None, "the two-pass cost without the Trainer")
    ratio("trainer:plain", "loop:plain", None, "the Trainer's own overhead, no SAM")
    ratio("loop:SSAMOptimizer", "loop:ssam", None)
    ratio("trainer:none", "trainer:plain", None, "identical work: shows the noise")
    ratio("trainer:usam", "trainer:plain", None)
    ratio("trainer:asam", "trainer:plain", None)
    if book is not None and "trainer:ssam" in med:
        add(
            "bookkeeping (hf_ssam.functional) / trainer:ssam step",
            book["functional"] / (med["trainer:ssam"] / 1e3),
            0.03 if model_name == "bert" else None,
            f"{1e3 * book['functional']:.2f} ms for {int(book['n_tensors'])} tensors",
        )
        add(
            "bookkeeping (in place, loop:ssam) / trainer:ssam step",
            book["inplace"] / (med["trainer:ssam"] / 1e3),
            None,
            f"{1e3 * book['inplace']:.2f} ms",
        )
    ratio("trainer:ssam@5", "trainer:plain", 1.25, "whole 5-step cycles (one two-pass step in five)", group=5)
    ratio("amp:SSAMOptimizer", "amp:plain", AMP_TARGETS["amp:plain"], f"{AMP_LABEL}: SSAMOptimizer loop / plain loop")
    ratio(
        "amp:SSAMOptimizer",
        "amp:ssam",
        AMP_TARGETS["amp:ssam"],
        f"{AMP_LABEL}: SSAMOptimizer loop / hand-written loop",
    )
    ratio("amp:ssam", "amp:plain", None, f"{AMP_LABEL}: hand-written loop / plain loop")
    if memory:
        peak = {m["config"]: m["peak_bytes"] for m in memory}
        pbytes = memory[0]["param_bytes"]

        def extra_mem(config: str, ref: str) -> float:
            return (peak[config] - peak[ref]) / pbytes

        if "trainer:ssam" in peak and "trainer:plain" in peak:
            add(
                "extra peak memory trainer:ssam vs trainer:plain (x param bytes)",
                extra_mem("trainer:ssam", "trainer:plain"),
                1.1,
                f"param bytes {pbytes / 2**20:.1f} MiB",
            )
        for config, ref in (
            ("trainer:sam", "trainer:plain"),
            ("trainer:usam", "trainer:plain"),
            ("trainer:asam", "trainer:plain"),
            ("trainer:none", "trainer:plain"),
            ("loop:ssam", "loop:plain"),
            ("loop:SSAMOptimizer", "loop:plain"),
            ("amp:SSAMOptimizer", "amp:plain"),
            ("trainer:ssam+ga2", "trainer:plain+ga2"),
        ):
            if config in peak and ref in peak:
                add(f"extra peak memory {config} vs {ref} (x param bytes)", extra_mem(config, ref), None)
    return out


def amp_summary(checks: list[dict[str, Any]]) -> list[str]:
    """One line per model with the two plain-loop AMP ratios side by side."""
    lines = []
    for model_name in dict.fromkeys(c["model"] for c in checks):
        found = {c["check"]: c for c in checks if c["model"] == model_name}
        pair = [found.get(f"amp:SSAMOptimizer / {ref}") for ref in AMP_TARGETS]
        if all(pair):
            cells = [
                f"SSAMOptimizer loop / {name} loop = {c['value']:.3f} {c['ci95']} ({c['status']} {c['target']})"
                for name, c in zip(("plain", "hand-written"), pair)
            ]
            lines.append(f"[{model_name}] plain-loop AMP ({AMP_LABEL}): " + " | ".join(cells))
    return lines


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, len(models), figsize=(4.2 * len(models) + 1.2, 3.6), squeeze=False, sharey=True)
    for ax, model_name in zip(axes[0], models):
        sub = [r for r in rows if r["model"] == model_name]
        names = [r["config"] for r in sub]
        values = [r["vs_plain"] for r in sub]
        bounds = [[float(x) for x in r["vs_plain_ci95"].strip("[]").split(",")] for r in sub]
        err = [
            [max(0.0, v - lo) for v, (lo, _) in zip(values, bounds)],
            [max(0.0, hi - v) for v, (_, hi) in zip(values, bounds)],
        ]
        colors = ["tab:gray" if n.endswith(("plain", "none")) else "tab:blue" for n in names]
        ax.barh(names, values, xerr=err, color=colors, ecolor="k", capsize=2)
        ax.axvline(2.0, color="tab:red", lw=1, ls="--", label="2x (two passes)")
        ax.set_xlabel(f"step time / {sub[0]['plain']} (paired, 95% CI)")
        ax.set_title(model_name)
        ax.legend(loc="lower right", fontsize=8)
    axes[0][0].invert_yaxis()
    _common.savefig(fig, path)
