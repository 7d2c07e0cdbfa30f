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

Writes ``outputs/demo/results.md`` (the table: mean ± 95 % confidence interval over seeds, and each variant's
accuracy paired by seed against ``none`` -- the mean difference with its interval, the paired t-test and the sign
test --, then ``ssam`` against ``sam``), ``outputs/demo/runs.json`` (every run's final numbers) and
``outputs/demo/demo.png`` (training loss with seed bands, gamma = ||g|| / ||g_asc|| over training, top Hessian
eigenvalue over training), prints one line per run and the table at the end.

Runs repeat exactly on one machine, but rounding-sized differences (another CPU's kernels, another thread count)
grow into different runs; ``--threads`` and ``--init_jitter`` make such differences on purpose, and ``--compare``
shows how far each cell's mean moves (docs/recipes.md has the measurement).

    python recipes/demo.py            # the full demo (make demo): 3 variants x 10 seeds x 2 learning rates
    python -m recipes.demo --quick    # the same, run as a module
    python recipes/demo.py --quick    # a smoke run of the same pipeline (seconds)
    python recipes/demo.py --lrs 0.05 0.1 0.2 0.35 0.5 --seeds 0   # the learning-rate sweep of docs/recipes.md
    python recipes/demo.py --threads 2 --output_dir outputs/demo_2threads --compare outputs/demo/runs.json
"""

from __future__ import annotations

import argparse
import json
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
#: Seeds of the full demo (0 to SEEDS - 1).
SEEDS = 10
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


def jitter_weights(model: nn.Module, scale: float, seed: int) -> None:
    """Multiply every weight by 1 + scale * N(0, 1) (a draw fixed by ``seed``, apart from the training RNG).

    With a scale near float32 rounding (1e-6), this measures how far rounding-sized differences -- such as another
    machine's kernels summing in another order -- carry a run.
    """
    noise = torch.Generator().manual_seed(10_000 + seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(1.0 + scale * torch.randn(parameter.shape, generator=noise))


# ------------------------------------------------------------------------------------------------ one run


def run_one(
    variant: str,
    lr: float,
    seed: int,
    config: DemoConfig,
    data: dict[str, torch.Tensor],
    output_dir: Path,
    init_jitter: float = 0.0,
) -> dict[str, Any]:
    """Train one model; returns the final metrics, the sharpness at each evaluation and the Trainer logs.

    ``init_jitter`` > 0 multiplies every initial weight by 1 + init_jitter * N(0, 1) (a draw fixed by the seed).
    """
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
    if init_jitter:
        jitter_weights(model, init_jitter, seed)
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


# ------------------------------------------------------------------------------------------------ statistics
# Small-sample statistics over seeds, written out here (no scipy): Student's t through the regularized incomplete
# beta function, the exact sign test.


def _beta_continued_fraction(a: float, b: float, x: float) -> float:
    """The continued fraction of the incomplete beta function (modified Lentz; Numerical Recipes, 6.4)."""
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):  # fmt: skip
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            h *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return h


def regularized_beta(a: float, b: float, x: float) -> float:
    """I_x(a, b), the regularized incomplete beta function."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_continued_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_continued_fraction(b, a, 1.0 - x) / b


def t_two_sided_p(t: float, df: int) -> float:
    """P(|T| >= |t|) for Student's t with ``df`` degrees of freedom."""
    if math.isnan(t):
        return math.nan
    if math.isinf(t):
        return 0.0
    return regularized_beta(df / 2.0, 0.5, df / (df + t * t))


def t_quantile(level: float, df: int) -> float:
    """The t with P(|T| <= t) = ``level`` (so ``t_quantile(0.95, df)`` is the 97.5th percentile), by bisection."""
    low, high = 0.0, 1.0
    while t_two_sided_p(high, df) > 1.0 - level:
        low, high = high, 2.0 * high
    for _ in range(200):
        middle = 0.5 * (low + high)
        low, high = (middle, high) if t_two_sided_p(middle, df) > 1.0 - level else (low, middle)
    return 0.5 * (low + high)


def mean_ci(values: Sequence[float], level: float = 0.95) -> tuple[float, float]:
    """Mean and half-width of its ``level`` confidence interval (t distribution, n - 1 degrees of freedom).

    Non-finite values are left out; the half-width is nan with fewer than two values.
    """
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return math.nan, math.nan
    if len(finite) < 2:
        return finite[0], math.nan
    return statistics.fmean(finite), t_quantile(level, len(finite) - 1) * statistics.stdev(finite) / math.sqrt(
        len(finite)
    )


def sign_test_p(differences: Sequence[float]) -> float:
    """Exact two-sided sign test: how likely a split at least this uneven is if either sign had probability 1/2.

    Zero differences (ties) are left out.
    """
    above = sum(d > 0 for d in differences)
    n = above + sum(d < 0 for d in differences)
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(above, n - above) + 1)) / 2**n
    return min(1.0, 2.0 * tail)


@dataclass(frozen=True)
class Paired:
    """``b`` minus ``a`` over the seeds both have: mean difference, its CI half-width, paired t and sign tests."""

    n: int
    mean: float
    half_width: float
    t_p: float
    higher: int  # seeds on which b is above a
    sign_p: float


def paired_difference(a: dict[int, float], b: dict[int, float], level: float = 0.95) -> Paired:
    """Paired comparison of two {seed: value} maps (a seed gives the same initialization and batch order)."""
    seeds = [s for s in a if s in b and math.isfinite(a[s]) and math.isfinite(b[s])]
    diffs = [round(b[s] - a[s], 9) for s in seeds]  # equal differences of rounded accuracies compare equal
    mean, half = mean_ci(diffs, level)
    if len(diffs) < 2:
        t_p = math.nan
    else:
        se = statistics.stdev(diffs) / math.sqrt(len(diffs))
        t_p = t_two_sided_p(mean / se, len(diffs) - 1) if se > 0 else (1.0 if mean == 0 else 0.0)
    return Paired(len(diffs), mean, half, t_p, sum(d > 0 for d in diffs), sign_test_p(diffs))


# ------------------------------------------------------------------------------------------------ summary

#: Confidence level of the intervals in the table.
LEVEL = 0.95


def _fmt_ci(mean: float, half: float, signed: bool = False) -> str:
    if not math.isfinite(mean):
        return "—"
    text = f"{mean:+.3g}" if signed else f"{mean:.3g}"
    return text + (f" ± {half:.2g}" if math.isfinite(half) else "")


def _fmt_p(p: float) -> str:
    return "—" if not math.isfinite(p) else (f"{p:.2g}" if p >= 0.001 else "<0.001")


def _by_seed(group: list[dict[str, Any]], key: str, scale: float = 1.0) -> dict[int, float]:
    return {run["seed"]: scale * run[key] for run in group}


def summarize(runs: list[dict[str, Any]], baseline: str = "none", level: float = LEVEL) -> list[dict[str, Any]]:
    """One row per (learning rate, variant): mean ± CI half-width over the seeds (finite values), how many runs
    collapsed, and the accuracy paired by seed against ``baseline`` at the same learning rate (difference ± CI
    half-width, paired t-test p, seeds above the baseline and the sign test's p)."""
    rows = []
    for lr in dict.fromkeys(run["lr"] for run in runs):
        at_lr = [run for run in runs if run["lr"] == lr]
        base = _by_seed([run for run in at_lr if run["variant"] == baseline], "accuracy", 100.0)
        for variant in dict.fromkeys(run["variant"] for run in runs):
            group = [run for run in at_lr if run["variant"] == variant]
            if not group:
                continue
            row = {"lr": lr, "variant": variant, "seeds": len(group)}
            for key, scale in (("accuracy", 100.0), ("train_loss", 1.0), ("hessian_top", 1.0), ("sam_sharpness", 1.0)):
                row[key] = _fmt_ci(*mean_ci([scale * run[key] for run in group], level))
            paired = paired_difference(base, _by_seed(group, "accuracy", 100.0), level)
            if variant == baseline or not base or paired.n == 0:
                row.update(vs_baseline="—", t_p="—", higher="—")
            else:
                row.update(
                    vs_baseline=_fmt_ci(paired.mean, paired.half_width, signed=True),
                    t_p=_fmt_p(paired.t_p),
                    higher=f"{paired.higher}/{paired.n} ({_fmt_p(paired.sign_p)})",
                )
            row["collapsed"] = f"{sum(run['collapsed'] for run in group)}/{len(group)}"
            row["time"] = f"{statistics.fmean(run['wall_time_s'] for run in group):.1f}"
            rows.append(row)
    return rows


def format_table(rows: list[dict[str, Any]], baseline: str = "none", level: float = LEVEL) -> str:
    """A markdown table of `summarize` rows."""
    ci = f"{100 * level:g} % CI"
    lines = [
        f"| lr | variant | val. accuracy (%), mean ± {ci} | Δ accuracy vs {baseline}, paired ± {ci} | paired t p "
        f"| seeds above {baseline} (sign test p) | final train loss | top Hessian eigenvalue | SAM sharpness "
        "| collapsed | s / run |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['lr']:g} | {row['variant']} | {row['accuracy']} | {row['vs_baseline']} | {row['t_p']} "
            f"| {row['higher']} | {row['train_loss']} | {row['hessian_top']} | {row['sam_sharpness']} "
            f"| {row['collapsed']} | {row['time']} |"
        )
    return "\n".join(lines)


def pairwise_lines(runs: list[dict[str, Any]], baseline: str = "none", level: float = LEVEL) -> list[str]:
    """The paired accuracy comparisons the table leaves out: every pair of non-baseline variants per learning rate."""
    lines = []
    variants = [v for v in dict.fromkeys(run["variant"] for run in runs) if v != baseline]
    for lr in dict.fromkeys(run["lr"] for run in runs):
        groups = {v: _by_seed([r for r in runs if r["lr"] == lr and r["variant"] == v], "accuracy", 100.0)
                  for v in variants}  # fmt: skip
        for i, a in enumerate(variants):
            for b in variants[i + 1 :]:
                paired = paired_difference(groups[a], groups[b], level)
                if paired.n < 2:
                    continue
                lines.append(
                    f"lr {lr:g}: {b} − {a} = {_fmt_ci(paired.mean, paired.half_width, signed=True)} points "
                    f"({100 * level:g} % CI, paired t p {_fmt_p(paired.t_p)}; {b} above on {paired.higher}/{paired.n} "
                    f"seeds, sign test p {_fmt_p(paired.sign_p)})"
                )
    return lines


def compare_runs(runs: list[dict[str, Any]], other: list[dict[str, Any]]) -> list[str]:
    """How far each cell's mean accuracy moves between two runs of the grid (e.g. at another thread count).

    Per (learning rate, variant): the mean here and there over the seeds both have, the shift of the mean, the
    median per-seed |difference|, and how many seeds gave bitwise the same accuracy.
    """
    lines = []
    for lr in dict.fromkeys(run["lr"] for run in runs):
        for variant in dict.fromkeys(run["variant"] for run in runs):
            here = _by_seed([r for r in runs if r["lr"] == lr and r["variant"] == variant], "accuracy", 100.0)
            there = _by_seed([r for r in other if r["lr"] == lr and r["variant"] == variant], "accuracy", 100.0)
            seeds = [s for s in here if s in there]
            if not seeds:
                continue
            a, b = statistics.fmean(here[s] for s in seeds), statistics.fmean(there[s] for s in seeds)
            per_seed = statistics.median(abs(here[s] - there[s]) for s in seeds)
            same = sum(here[s] == there[s] for s in seeds)
            lines.append(
                f"lr {lr:g} {variant:<5}: mean {a:.2f} here, {b:.2f} there, shift {a - b:+.2f}; "
                f"median per-seed |difference| {per_seed:.2f}; identical on {same}/{len(seeds)} seeds"
            )
    return lines


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
    parser.add_argument(
        "--seeds", nargs="+", type=int, default=None, help=f"Training seeds (default 0 to {SEEDS - 1})."
    )
    parser.add_argument("--lrs", nargs="+", type=float, default=None, help=f"Default {BASE_LR} {LARGE_LR}.")
    parser.add_argument("--quick", action="store_true", help="2 seeds, 1 epoch, a smaller MLP: a smoke test.")
    parser.add_argument("--output_dir", default="outputs/demo", help="Where the table, runs.json and the plot go.")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: as set up).")
    parser.add_argument(
        "--init_jitter", type=float, default=0.0, help="Multiply each initial weight by 1 + this * N(0, 1)."
    )
    parser.add_argument(
        "--compare", default=None, help="runs.json of an earlier run: print how far each cell's mean moved."
    )
    args = parser.parse_args(argv)
    for variant in args.variants:
        if variant not in LABELS and variant != "none":
            raise ValueError(f"--variants {variant} is not one of {sorted(LABELS)}.")
    config = QUICK if args.quick else DemoConfig()
    seeds = args.seeds if args.seeds is not None else ([0, 1] if args.quick else list(range(SEEDS)))
    lrs = args.lrs if args.lrs is not None else [BASE_LR, LARGE_LR]
    output_dir = Path(args.output_dir)
    hf_logging.set_verbosity_error()
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    data = digits_with_label_noise(config.label_noise)
    flipped = float((data["train_y"] != data["clean_train_y"]).float().mean())
    total = len(lrs) * len(args.variants) * len(seeds)
    print(f"digits, {100 * flipped:.1f}% of {len(data['train_y'])} training labels flipped; {total} runs", flush=True)
    start = time.perf_counter()
    runs = []
    for lr in lrs:
        for variant in args.variants:
            for seed in seeds:
                run = run_one(variant, lr, seed, config, data, output_dir / "runs", args.init_jitter)
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
    pairs = pairwise_lines(runs)
    plot(runs, output_dir / "demo.png")
    header = (
        f"Digits with {100 * flipped:.0f}% flipped training labels, MLP, SGD (momentum 0.9), rho {config.rho:g}, "
        f"{config.epochs} epochs, {torch.get_num_threads()} thread(s)"
        f"{f', initial weights jittered by {args.init_jitter:g}' if args.init_jitter else ''}; "
        f"{len(seeds)} seeds ({seeds[0]} to {seeds[-1]}), mean ± {100 * LEVEL:g} % confidence interval (t); "
        f"Δ: paired by seed (same initialization and batch order) against none; {total} runs in {wall:.0f} s."
    )
    report = header + "\n\n" + table + "\n" + "".join(f"\n{line}" for line in pairs)
    compared = []
    if args.compare:
        other = json.loads(Path(args.compare).read_text(encoding="utf-8"))
        compared = compare_runs(runs, other)
        report += f"\n\nAgainst {args.compare}:\n" + "\n".join(compared)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "results.md").write_text(report + "\n", encoding="utf-8")
    saved = [{k: v for k, v in run.items() if k != "log_history"} for run in runs]
    (output_dir / "runs.json").write_text(json.dumps(saved, indent=1) + "\n", encoding="utf-8")
    print("\n" + report)
    print(f"\nplot: {output_dir / 'demo.png'}   table: {output_dir / 'results.md'}   runs: {output_dir / 'runs.json'}")
    return {"runs": runs, "table": table, "pairs": pairs, "compared": compared, "wall_time_s": wall}


if __name__ == "__main__":
    main()
