"""Figure 3 of the SSAM paper: the renormalization factor gamma = ||g|| / ||g_asc|| over a training run.

Commands (from the repository root)::

    .venv/bin/python bench/paper/gamma_trace.py            # 3 runs x 40 epochs, ~1-2 minutes
    .venv/bin/python bench/paper/gamma_trace.py --quick    # smoke test, seconds
    .venv/bin/python bench/paper/gamma_trace.py --full     # 200 epochs, as in the paper
    .venv/bin/python bench/paper/gamma_trace.py --epochs 200 --augment   # + the paper's crop/flip augmentation

Writes ``gamma_trace.csv`` (one row per optimizer step and rho) and ``gamma_trace.png`` to ``--out``
(default ``outputs/bench/gamma_trace/``).

Setup (the paper: ResNet-20 on CIFAR-10 and ResNet-56 on CIFAR-100, 200 epochs, trained with SAM). The
package's ``SSAMTrainer`` trains a small BatchNorm CNN (``_common.small_cnn``) on scikit-learn's 8x8
digits with ``sam_variant="usam"`` (the paper's SAM), rho in {0.01, 0.05, 0.2}, SGD (momentum 0.9,
weight decay 5e-4, passed with ``optimizers=``), lr 0.1 with the Trainer's cosine schedule, batch 128,
``logging_steps=1``. gamma is read back from ``trainer.state.log_history`` (key ``sam/gamma``), exactly
what a user sees in TensorBoard or W&B.

``--augment`` adds the paper's CIFAR augmentation (random crop of the image padded by one pixel, random
horizontal flip), which keeps the training loss away from zero; ``--lr-scheduler constant`` removes the
schedule. The CSV carries the learning rate of every step next to gamma.

Claims checked (the paper, Section 4.3.1: "for a fixed rho, gamma tends to decrease throughout training and
is smaller than 1"): for every rho, gamma < 1 on at least 90% of the steps, and its mean over the last fifth
of training is below its mean over the first fifth.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

import _common  # noqa: E402  (before torch: pins the offline, single-threaded environment)
import torch  # noqa: E402
from torch import nn  # noqa: E402

RHOS: tuple[float, ...] = (0.01, 0.05, 0.2)


class DigitsClassifier(nn.Module):
    """``small_cnn`` with the Trainer's calling convention: ``forward(pixel_values, labels) -> {loss, logits}``."""

    def __init__(self) -> None:
        super().__init__()
        self.net = _common.small_cnn()

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        logits = self.net(pixel_values)
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = nn.functional.cross_entropy(logits, labels)
        return out


class AugmentedDigits(torch.utils.data.Dataset):
    """The digits with the paper's CIFAR augmentation: a random 8x8 crop of the image padded by 1, random flip."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        padded = nn.functional.pad(self.images[i], (1, 1, 1, 1))
        dy, dx = torch.randint(0, 3, (2,)).tolist()
        image = padded[:, dy : dy + 8, dx : dx + 8]
        if torch.rand(()) < 0.5:
            image = image.flip(-1)
        return {"pixel_values": image, "labels": self.labels[i]}


def run(
    rho: float,
    epochs: int,
    max_steps: int,
    seed: int,
    output_dir: str,
    scheduler: str = "cosine",
    augment: bool = False,
) -> list[dict]:
    """Train once with SSAMTrainer; returns the per-step log rows that carry ``sam/gamma``."""
    from transformers import PrinterCallback

    from hf_ssam import SSAMTrainer, SSAMTrainingArguments

    images, labels = _common.digits()
    if augment:
        dataset: Any = AugmentedDigits(images, labels)
    else:
        dataset = [{"pixel_values": images[i], "labels": labels[i]} for i in range(len(labels))]
    torch.manual_seed(seed)
    model = DigitsClassifier()
    args = SSAMTrainingArguments(
        output_dir=output_dir,
        sam_variant="usam",
        sam_rho=rho,
        num_train_epochs=epochs,
        max_steps=max_steps,
        per_device_train_batch_size=128,
        learning_rate=0.1,
        lr_scheduler_type=scheduler,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        use_cpu=not torch.cuda.is_available(),
        seed=seed,
    )
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    trainer = SSAMTrainer(model=model, args=args, train_dataset=dataset, optimizers=(sgd, None))
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    return [
        {
            "rho": rho,
            "step": entry["step"],
            "gamma": entry["sam/gamma"],
            "loss": entry.get("loss"),
            "learning_rate": entry.get("learning_rate"),
            "grad_norm": entry.get("sam/grad_norm"),
            "ascent_grad_norm": entry.get("sam/ascent_grad_norm"),
            "ascent_loss": entry.get("sam/ascent_loss"),
        }
        for entry in trainer.state.log_history
        if "sam/gamma" in entry
    ]


def claims(rows: list[dict[str, Any]]) -> list[str]:
    lines = []
    below, decrease = [], []
    for rho in RHOS:
        gammas = [r["gamma"] for r in rows if r["rho"] == rho]
        fifth = max(1, len(gammas) // 5)
        below.append((rho, sum(g < 1 for g in gammas) / len(gammas)))
        decrease.append((rho, statistics.fmean(gammas[:fifth]), statistics.fmean(gammas[-fifth:])))
    lines.append(
        _common.verdict(
            all(frac >= 0.9 for _, frac in below),
            "gamma < 1 on at least 90% of the steps ("
            + ", ".join(f"rho={rho:g}: {100 * frac:.0f}%" for rho, frac in below)
            + ")",
        )
    )
    lines.append(
        _common.verdict(
            all(last < first for _, first, last in decrease),
            "gamma decreases over training (mean of the first fifth -> last fifth: "
            + ", ".join(f"rho={rho:g}: {a:.3f} -> {b:.3f}" for rho, a, b in decrease)
            + ")",
        )
    )
    return lines


def plot(rows: list[dict[str, Any]], path: Path, steps_per_epoch: int, title: str) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    for rho, color in zip(RHOS, ("tab:blue", "tab:orange", "tab:green")):
        sub = [r for r in rows if r["rho"] == rho]
        epochs = [r["step"] / steps_per_epoch for r in sub]
        gammas = [r["gamma"] for r in sub]
        ax.plot(epochs, gammas, color=color, alpha=0.25, lw=0.8)
        k = max(1, steps_per_epoch)  # one-epoch moving average on top of the raw per-step values
        smooth = [statistics.fmean(gammas[max(0, i - k + 1) : i + 1]) for i in range(len(gammas))]
        ax.plot(epochs, smooth, color=color, lw=1.6, label=f"rho = {rho:g}")
    ax.axhline(1.0, color="k", lw=0.8, ls=":")
    ax.set_xlabel("epoch")
    ax.set_ylabel("gamma = ||g|| / ||g_asc||")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    _common.savefig(fig, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="smoke test: 6 steps per rho")
    size.add_argument("--full", action="store_true", help="200 epochs, as in the paper")
    parser.add_argument("--epochs", type=int, default=None, help="epochs per run (default 40)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr-scheduler", default="cosine", help="the Trainer's lr_scheduler_type (default cosine)")
    parser.add_argument(
        "--augment", action="store_true", help="random crop (padding 1) and flip, as the paper's CIFAR training"
    )
    parser.add_argument("--out", type=Path, default=_common.default_out("gamma_trace"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    epochs = args.epochs or (200 if args.full else 40)
    max_steps = 6 if args.quick else -1
    started = time.perf_counter()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for rho in RHOS:
            t0 = time.perf_counter()
            rows += run(rho, epochs, max_steps, args.seed, tmp, args.lr_scheduler, args.augment)
            gammas = [r["gamma"] for r in rows if r["rho"] == rho]
            print(
                f"  rho={rho:<5g} {len(gammas)} steps, gamma median {statistics.median(gammas):.3f} "
                f"min {min(gammas):.3f} max {max(gammas):.3f} ({time.perf_counter() - t0:.0f}s)",
                flush=True,
            )
    _common.write_csv(args.out / "gamma_trace.csv", rows)
    title = f"SSAMTrainer, SAM (usam), CNN on digits, {epochs} epochs, {args.lr_scheduler} lr"
    plot(rows, args.out / "gamma_trace.png", -(-1797 // 128), title + (", augmented" if args.augment else ""))
    print()
    _common.print_lines(claims(rows))
    print(f"\nwrote {args.out / 'gamma_trace.csv'} and gamma_trace.png in {time.perf_counter() - started:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
