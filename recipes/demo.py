"""What does SSAM do to my training? ``none``, ``sam``, ``ssam`` over several seeds, offline, on a CPU (``make demo``).

Task: scikit-learn's handwritten digits (1797 real 8x8 images, 10 classes; 1437 train / 360 validation, stratified)
with 20% of the *training* labels flipped to another class at random (validation labels stay clean), learned by an
MLP (64-256-256-10, ReLU) with SGD (momentum 0.9, constant learning rate, batch 32, 20 epochs) through
``SSAMTrainer``, with rho = 0.05 (the package default) for ``sam`` and ``ssam``. Label
noise is where sharpness-aware training is documented to help (Foret et al. 2021), and the small model lets every
variant run over several seeds in minutes. Each run reports the clean validation accuracy, the last logged
training loss, the top Hessian eigenvalue of the training loss and the SAM sharpness at the end (measured by
``hf_ssam.sharpness.SharpnessCallback`` at every evaluation, on 512 training examples), and whether it collapsed
(training loss not finite or near chance level). The whole grid runs at the
base learning rate and at a large one, where the paper predicts that SAM degrades and SSAM does not.

Writes ``outputs/demo/results.md`` (the table, mean ± standard deviation over seeds) and ``outputs/demo/demo.png``
(training loss with seed bands, gamma = ||g|| / ||g_asc|| over training, top Hessian eigenvalue over training),
prints one line per run and the table at the end.

    python recipes/demo.py            # the full demo (make demo): 3 variants x 5 seeds x 2 learning rates
    python -m recipes.demo --quick    # the same, run as a module
    python recipes/demo.py --quick    # a smoke run of the same pipeline (seconds)
    python recipes/demo.py --lrs 0.05 0.1 0.2 0.35 0.5 --seeds 0   # the learning-rate sweep of docs/recipes.md
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset
from transformers import PrinterCallback, ProgressCallback
from transformers.utils import logging as hf_logging

from hf_ssam import SSAMTrainer, SSAMTrainingArguments
from hf_ssam.sharpness import SharpnessCallback

if __package__:  # imported as recipes.demo, or run with python -m recipes.demo
    from ._recipe_utils import argmax_logits, make_compute_metrics
else:  # run as a file, python recipes/demo.py: Python puts this folder first on the import path
    from _recipe_utils import argmax_logits, make_compute_metrics

VARIANTS = ("none", "sam", "ssam")
LABELS = {
    "none": "SGD (none)",
    "sam": "SAM* (sam)",
    "usam": "SAM (usam)",
    "asam": "ASAM (asam)",
    "ssam": "SSAM (ssam)",
}
#: Learning rates of the full demo: the base one and the large one picked from the sweep in docs/recipes.md (the
#: largest rate of the sweep at which plain SGD still trains normally).
BASE_LR, LARGE_LR = 0.05, 0.2
#: A run whose last training loss is not finite or within 10% of chance level (ln 10 for ten classes) collapsed.
COLLAPSED_LOSS = 0.9 * math.log(10)
EIGEN_KEY, SAM_KEY = "sharpness/hessian_top_1", "sharpness/sam_rho"


@dataclass(frozen=True)
class DemoConfig:
    """Everything a run depends on besides variant, learning rate and seed."""

    epochs: int = 20
    batch_size: int = 32
    hidden: int = 256
    label_noise: float = 0.2
    rho: float = 0.05
    evaluations: int = 6  # evaluations (and sharpness measurements) per run, evenly spaced
    hessian_samples: int = 512  # training examples the sharpness is measured on
    logging_steps: int = 10


QUICK = DemoConfig(epochs=1, hidden=64, evaluations=2, hessian_samples=128)


# ------------------------------------------------------------------------------------------------ data and model


def digits_with_label_noise(noise: float, seed: int = 0) -> dict[str, torch.Tensor]:
    """Standardized digits split 1437/360 (stratified, seed 42); ``noise`` of the training labels flipped.

    A flipped label is drawn uniformly from the nine other classes; which labels flip is fixed by ``seed`` and
    does not depend on the training seed, so every run sees the same data.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x_train, x_val, y_train, y_val = train_test_split(x, y, test_size=0.2, random_state=42, stratify=y)
    mean, std = x_train.mean(0), x_train.std(0) + 1.0  # +1: several border pixels are always 0
    rng = np.random.default_rng(seed)
    noisy = y_train.copy()
    flip = rng.random(len(noisy)) < noise
    noisy[flip] = (noisy[flip] + rng.integers(1, 10, flip.sum())) % 10
    as_float = lambda a: torch.tensor((a - mean) / std, dtype=torch.float32)  # noqa: E731
    return {
        "train_x": as_float(x_train),
        "train_y": torch.tensor(noisy),
        "clean_train_y": torch.tensor(y_train),
        "val_x": as_float(x_val),
        "val_y": torch.tensor(y_val),
    }


class Examples(Dataset):
    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[i], "labels": self.y[i]}


class DigitsMLP(nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                 nn.Linear(hidden, 10))  # fmt: skip

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        logits = self.net(x)
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = nn.functional.cross_entropy(logits, labels)
        return out


# ------------------------------------------------------------------------------------------------ one run


def run_one(
    variant: str, lr: float, seed: int, config: DemoConfig, data: dict[str, torch.Tensor], output_dir: Path
) -> dict[str, Any]:
    """Train one model; returns the final metrics, the sharpness at each evaluation and the Trainer logs."""
    train = Examples(data["train_x"], data["train_y"])
    steps = config.epochs * math.ceil(len(train) / config.batch_size)
    args = SSAMTrainingArguments(
        output_dir=str(output_dir / f"{variant}_lr{lr:g}_seed{seed}"),
        sam_variant=variant,
        sam_rho=config.rho,
        learning_rate=lr,
        lr_scheduler_type="constant",
        max_steps=steps,
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=512,
        eval_strategy="steps",
        eval_steps=math.ceil(steps / config.evaluations),  # the last one at the final step
        logging_steps=config.logging_steps,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=seed,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    torch.manual_seed(seed)
    model = DigitsMLP(config.hidden)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    measure_on = [
        {"x": data["train_x"][: config.hessian_samples], "labels": data["train_y"][: config.hessian_samples]}
    ]
    sharpness = SharpnessCallback(measure_on, k=1, rho=config.rho)
    trainer = SSAMTrainer(
        model=model,
        args=args,
        train_dataset=train,
        eval_dataset=Examples(data["val_x"], data["val_y"]),
        optimizers=(optimizer, None),
        compute_metrics=make_compute_metrics(10, backend="numpy"),
        preprocess_logits_for_metrics=argmax_logits,
        callbacks=[sharpness],
    )
    sharpness.bind(trainer)
    for quiet in (PrinterCallback, ProgressCallback):  # one summary line per run instead of every log row
        trainer.remove_callback(quiet)
    start = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - start
    history = trainer.state.log_history
    losses = [row["loss"] for row in history if "loss" in row]
    final_loss = losses[-1] if losses else math.nan
    evals = [row for row in history if "eval_accuracy" in row]
    eigen = [row for row in history if EIGEN_KEY in row]
    return {
        "variant": variant,
        "lr": lr,
        "seed": seed,
        "accuracy": evals[-1]["eval_accuracy"] if evals else math.nan,
        "train_loss": final_loss,
        "hessian_top": eigen[-1][EIGEN_KEY] if eigen else math.nan,
        "sam_sharpness": eigen[-1][SAM_KEY] if eigen else math.nan,
        "collapsed": not (math.isfinite(final_loss) and final_loss < COLLAPSED_LOSS),
        "wall_time_s": wall,
        "log_history": history,
    }


# ------------------------------------------------------------------------------------------------ summary


def _mean_std(values: list[float]) -> str:
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return "—"
    std = statistics.stdev(finite) if len(finite) > 1 else 0.0
    return f"{statistics.fmean(finite):.3g} ± {std:.2g}"


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (learning rate, variant): mean ± std over all seeds (finite values), and how many collapsed."""
    rows = []
    for lr in dict.fromkeys(run["lr"] for run in runs):
        for variant in dict.fromkeys(run["variant"] for run in runs):
            group = [run for run in runs if run["lr"] == lr and run["variant"] == variant]
            if not group:
                continue
            rows.append(
                {
                    "lr": lr,
                    "variant": variant,
                    "accuracy": _mean_std([100 * run["accuracy"] for run in group]),
                    "train_loss": _mean_std([run["train_loss"] for run in group]),
                    "hessian_top": _mean_std([run["hessian_top"] for run in group]),
                    "sam_sharpness": _mean_std([run["sam_sharpness"] for run in group]),
                    "collapsed": f"{sum(run['collapsed'] for run in group)}/{len(group)}",
                    "time": f"{statistics.fmean(run['wall_time_s'] for run in group):.1f}",
                }
            )
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    """A markdown table of `summarize` rows."""
    lines = [
        "| lr | variant | val. accuracy (%) | final train loss | top Hessian eigenvalue | SAM sharpness | collapsed "
        "| s / run |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['lr']:g} | {row['variant']} | {row['accuracy']} | {row['train_loss']} | {row['hessian_top']} "
            f"| {row['sam_sharpness']} | {row['collapsed']} | {row['time']} |"
        )
    return "\n".join(lines)


def _series(history: list[dict[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray]:
    rows = [row for row in history if key in row and "step" in row]
    return np.array([row["step"] for row in rows]), np.array([row[key] for row in rows], dtype=float)


def _band(ax: Any, runs: list[dict[str, Any]], key: str, label: str, color: str, style: str = "-") -> None:
    """Mean over seeds, with a band from the lowest to the highest seed."""
    curves = [_series(run["log_history"], key) for run in runs]
    curves = [c for c in curves if len(c[0])]
    if not curves:
        return
    length = min(len(c[0]) for c in curves)
    steps = curves[0][0][:length]
    values = np.stack([c[1][:length] for c in curves])
    with np.errstate(invalid="ignore"):
        ax.plot(steps, np.nanmean(values, 0), style, color=color, label=label)
        ax.fill_between(steps, np.nanmin(values, 0), np.nanmax(values, 0), color=color, alpha=0.2)


def plot(runs: list[dict[str, Any]], path: Path) -> None:
    """Training loss per learning rate (seed bands), gamma over training, top Hessian eigenvalue over training."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lrs = list(dict.fromkeys(run["lr"] for run in runs))
    variants = list(dict.fromkeys(run["variant"] for run in runs))
    colors = dict(zip(VARIANTS + tuple(v for v in variants if v not in VARIANTS), plt.cm.tab10.colors))
    styles = ["-", "--", ":", "-."]
    columns = math.ceil((len(lrs) + 2) / 2)
    fig, grid = plt.subplots(2, columns, figsize=(6 * columns, 8.5), squeeze=False)
    axes = list(grid.flat)
    for ax in axes[len(lrs) + 2 :]:
        ax.set_visible(False)
    axes = axes[: len(lrs) + 2]
    for ax, lr in zip(axes, lrs):
        for variant in variants:
            group = [run for run in runs if run["lr"] == lr and run["variant"] == variant]
            _band(ax, group, "loss", LABELS.get(variant, variant), colors[variant])
        ax.set(title=f"training loss, lr {lr:g}", xlabel="step", ylabel="cross-entropy (noisy labels)")
        ax.set_ylim(0, 3.0)
    ax_gamma, ax_eigen = axes[len(lrs)], axes[len(lrs) + 1]
    for i, lr in enumerate(lrs):
        for variant in variants:
            group = [run for run in runs if run["lr"] == lr and run["variant"] == variant]
            label = f"{LABELS.get(variant, variant)}, lr {lr:g}"
            if variant != "none":
                _band(ax_gamma, group, "sam/gamma", label, colors[variant], styles[i % len(styles)])
            _band(ax_eigen, group, EIGEN_KEY, label, colors[variant], styles[i % len(styles)])
    ax_gamma.axhline(1.0, color="grey", linewidth=0.8)
    ax_gamma.set(title=r"$\gamma = \|g\| / \|g_{asc}\|$ (applied by ssam only)", xlabel="step", ylabel="sam/gamma")
    ax_eigen.set(title="top Hessian eigenvalue of the training loss", xlabel="step", ylabel=r"$\lambda_{max}$")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    seeds = len({run["seed"] for run in runs})
    fig.suptitle(f"digits with 20% label noise, MLP, SGD: mean and min-max band over {seeds} seeds")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------ main


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), help="sam_variant values to compare.")
    parser.add_argument("--seeds", nargs="+", type=int, default=None, help="Training seeds (default 0 1 2 3 4).")
    parser.add_argument("--lrs", nargs="+", type=float, default=None, help=f"Default {BASE_LR} {LARGE_LR}.")
    parser.add_argument("--quick", action="store_true", help="2 seeds, 1 epoch, a smaller MLP: a smoke test.")
    parser.add_argument("--output_dir", default="outputs/demo", help="Where the table and the plot go.")
    args = parser.parse_args(argv)
    for variant in args.variants:
        if variant not in LABELS and variant != "none":
            raise ValueError(f"--variants {variant} is not one of {sorted(LABELS)}.")
    config = QUICK if args.quick else DemoConfig()
    seeds = args.seeds if args.seeds is not None else ([0, 1] if args.quick else [0, 1, 2, 3, 4])
    lrs = args.lrs if args.lrs is not None else [BASE_LR, LARGE_LR]
    output_dir = Path(args.output_dir)
    hf_logging.set_verbosity_error()

    data = digits_with_label_noise(config.label_noise)
    flipped = float((data["train_y"] != data["clean_train_y"]).float().mean())
    total = len(lrs) * len(args.variants) * len(seeds)
    print(f"digits, {100 * flipped:.1f}% of {len(data['train_y'])} training labels flipped; {total} runs", flush=True)
    start = time.perf_counter()
    runs = []
    for lr in lrs:
        for variant in args.variants:
            for seed in seeds:
                run = run_one(variant, lr, seed, config, data, output_dir / "runs")
                runs.append(run)
                print(
                    f"[{len(runs):2d}/{total}] lr {lr:<5g} {variant:<5} seed {seed}: "
                    f"val acc {100 * run['accuracy']:5.1f}%"
                    f"  train loss {run['train_loss']:.3f}  top eigenvalue {run['hessian_top']:8.2f}"
                    f"{'  COLLAPSED' if run['collapsed'] else ''}  ({run['wall_time_s']:.1f} s)",
                    flush=True,
                )
    wall = time.perf_counter() - start

    table = format_table(summarize(runs))
    plot(runs, output_dir / "demo.png")
    header = (
        f"Digits with {100 * flipped:.0f}% flipped training labels, MLP, SGD (momentum 0.9), rho {config.rho:g}, "
        f"{config.epochs} epochs; mean ± std over seeds {seeds}; "
        f"{total} runs in {wall:.0f} s."
    )
    (output_dir / "results.md").write_text(header + "\n\n" + table + "\n", encoding="utf-8")
    print("\n" + header + "\n\n" + table)
    print(f"\nplot: {output_dir / 'demo.png'}   table: {output_dir / 'results.md'}")
    return {"runs": runs, "table": table, "wall_time_s": wall}


if __name__ == "__main__":
    main()
