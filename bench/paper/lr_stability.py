"""Appendix A of the SSAM paper, scaled down: training stability against a constant learning rate.

Commands (from the repository root)::

    .venv/bin/python bench/paper/lr_stability.py            # 9 lrs x 4 optimizers x 20 epochs, ~3-5 minutes
    .venv/bin/python bench/paper/lr_stability.py --quick    # smoke test, seconds
    .venv/bin/python bench/paper/lr_stability.py --full     # 13 lrs in [0.01, 3.16] (the paper's range), 3 seeds

Writes ``lr_stability.csv`` and ``lr_stability.png`` to ``--out`` (default ``outputs/bench/lr_stability/``).

Setup (the paper: ResNet-20/56 on CIFAR, 200 epochs). A small BatchNorm CNN (three 3x3 convolutions,
``_common.small_cnn``) on scikit-learn's 8x8 digits (1797 images, all used for training), mini-batches of
128, SGD with momentum 0.9 and weight decay 5e-4, a *constant* learning rate log-spaced over two decades
(0.0316 ... 3.16), rho = 1.0, 20 epochs. SAM*, SAM and SSAM are the package's ``SSAMOptimizer``
(``sam``, ``usam``, ``ssam``) around the same SGD, with ``freeze_batchnorm_stats`` around the second pass.
Reported: training loss and accuracy of the final model on the whole training set (eval mode), as in the
paper's Figures 9-10. A run "fails" when its final accuracy is below 60% or its loss is not finite.

Claims checked (the paper's text): at the smallest lr SGD has the lowest loss and SAM beats SSAM; SAM
fails at large lr; SSAM is more stable than SAM (lower loss over the upper half of the sweep, no more
failures); SAM* is still more unstable than SAM (at least as many failures).
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
from torch import nn  # noqa: E402

OPTIMIZERS: dict[str, str] = {"sgd": "SGD", "sam": "SAM* (sam)", "usam": "SAM (usam)", "ssam": "SSAM (ssam)"}
RHO = 1.0
BATCH = 128
FAIL_ACCURACY = 0.6


def train(optimizer: str, lr: float, epochs: int, seed: int, data: tuple[torch.Tensor, torch.Tensor]) -> dict:
    """Train the CNN once; returns the final training loss and accuracy (whole set, eval mode)."""
    x, y = data
    torch.manual_seed(seed)
    model = _common.small_cnn()
    kwargs = dict(lr=lr, momentum=0.9, weight_decay=5e-4)
    opt = _common.sgd_or_sam(model.parameters(), optimizer, RHO, **kwargs)
    loss_fn = nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x) - BATCH + 1, BATCH):
            xb, yb = x[perm[i : i + BATCH]], y[perm[i : i + BATCH]]
            _common.train_step(model, opt, loss_fn, xb, yb)  # BatchNorm statistics: updated once, by the first pass
    model.eval()
    with torch.no_grad():
        logits = model(x)
        loss = loss_fn(logits, y).item()
        accuracy = (logits.argmax(dim=1) == y).double().mean().item()
    return {"loss": loss, "accuracy": accuracy if math.isfinite(loss) else 0.1}


def failed(row: dict) -> bool:
    return not math.isfinite(row["loss"]) or row["accuracy"] < FAIL_ACCURACY


def claims(rows: list[dict]) -> list[str]:
    lrs = sorted({r["lr"] for r in rows})
    at = {(r["optimizer"], r["lr"]): r for r in rows}

    def loss(opt: str, lr: float) -> float:
        value = at[(opt, lr)]["loss"]
        return value if math.isfinite(value) else float("inf")

    def fails(opt: str) -> list[float]:
        return [lr for lr in lrs if failed(at[(opt, lr)])]

    low, high = lrs[0], lrs[len(lrs) // 2 :]
    lines = []
    ok = loss("sgd", low) < loss("usam", low) < loss("ssam", low)
    lines.append(
        _common.verdict(
            ok,
            f"at the smallest lr ({low:.3g}) SGD has the lowest loss and SAM beats SSAM "
            f"(sgd {loss('sgd', low):.3g}, usam {loss('usam', low):.3g}, "
            f"ssam {loss('ssam', low):.3g})",
        )
    )
    lines.append(
        _common.verdict(
            bool(fails("usam")) and fails("usam")[-1] == lrs[-1],
            f"SAM (usam) fails at large lr (fails at lr {_fmt(fails('usam'))})",
        )
    )

    def mean_log_loss(opt: str) -> float:
        return statistics.fmean(math.log10(min(loss(opt, lr), 1e6)) for lr in high)

    ok = mean_log_loss("ssam") < mean_log_loss("usam") and len(fails("ssam")) <= len(fails("usam"))
    lines.append(
        _common.verdict(
            ok,
            f"SSAM is more stable than SAM: lower loss over lr >= {high[0]:.3g} "
            f"(geometric mean {10 ** mean_log_loss('ssam'):.3g} vs "
            f"{10 ** mean_log_loss('usam'):.3g}) and no more failures "
            f"(ssam fails at lr {_fmt(fails('ssam'))})",
        )
    )
    lines.append(
        _common.verdict(
            len(fails("sam")) >= len(fails("usam")),
            f"SAM* is still more unstable than SAM (sam fails at lr {_fmt(fails('sam'))})",
        )
    )
    return lines


def _fmt(values: list[float]) -> str:
    return "{" + ", ".join(f"{v:.3g}" for v in values) + "}"


def aggregate(runs: list[dict]) -> list[dict]:
    """Mean loss/accuracy over seeds per (optimizer, lr) (a diverged seed makes the mean loss infinite)."""
    keys = sorted({(r["optimizer"], r["lr"]) for r in runs}, key=lambda k: (list(OPTIMIZERS).index(k[0]), k[1]))
    out = []
    for opt, lr in keys:
        sub = [r for r in runs if r["optimizer"] == opt and r["lr"] == lr]
        losses = [r["loss"] if math.isfinite(r["loss"]) else float("inf") for r in sub]
        out.append(
            {
                "optimizer": opt,
                "rho": 0.0 if opt == "sgd" else RHO,
                "lr": lr,
                "seeds": len(sub),
                "loss": statistics.fmean(losses),
                "accuracy": statistics.fmean(r["accuracy"] for r in sub),
            }
        )
    return out


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(9, 3.4))
    styles = {
        "sgd": ("k", "o-"),
        "sam": ("tab:orange", "s--"),
        "usam": ("tab:blue", "^-."),
        "ssam": ("tab:green", "D-"),
    }
    for opt, label in OPTIMIZERS.items():
        sub = sorted((r for r in rows if r["optimizer"] == opt), key=lambda r: r["lr"])
        color, style = styles[opt]
        lrs = [r["lr"] for r in sub]
        ax_loss.plot(lrs, [min(r["loss"], 1e3) for r in sub], style, color=color, label=label, ms=4)
        ax_acc.plot(lrs, [100 * r["accuracy"] for r in sub], style, color=color, label=label, ms=4)
    for ax in (ax_loss, ax_acc):
        ax.set_xscale("log")
        ax.set_xlabel("learning rate (constant)")
        ax.grid(alpha=0.3)
    ax_loss.set_yscale("log")
    ax_loss.set_ylabel("final training loss")
    ax_acc.set_ylabel("final training accuracy (%)")
    ax_acc.legend(fontsize=8)
    fig.suptitle(f"small CNN on digits, SGD momentum 0.9, rho = {RHO:g}", fontsize=10)
    _common.savefig(fig, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="smoke test: 3 lrs, 1 epoch")
    size.add_argument("--full", action="store_true", help="13 lrs in [0.01, 3.16], 3 seeds, 40 epochs")
    parser.add_argument("--epochs", type=int, default=None, help="epochs per run (default 20)")
    parser.add_argument("--seeds", type=int, default=None, help="seeds per point (default 1)")
    parser.add_argument("--out", type=Path, default=_common.default_out("lr_stability"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.quick:
        lrs, epochs, seeds = _common.log_space(0.0316, 3.16, 3), 1, 1
    elif args.full:
        lrs, epochs, seeds = _common.log_space(0.01, 3.16, 13), 40, 3
    else:
        lrs, epochs, seeds = _common.log_space(0.0316, 3.16, 9), 20, 1
    epochs, seeds = args.epochs or epochs, args.seeds or seeds
    data = _common.digits()
    started = time.perf_counter()
    runs = []
    print(
        f"{len(lrs)} lrs in [{lrs[0]:.3g}, {lrs[-1]:.3g}], {epochs} epochs, {seeds} seed(s), rho={RHO:g}", flush=True
    )
    for opt in OPTIMIZERS:
        t0 = time.perf_counter()
        for lr in lrs:
            for seed in range(seeds):
                runs.append({"optimizer": opt, "lr": lr, "seed": seed, **train(opt, lr, epochs, seed, data)})
        line = " ".join(f"{r['lr']:.3g}:{r['accuracy']:.2f}" for r in runs if r["optimizer"] == opt)
        print(f"  {opt:5s} final accuracy by lr  {line}  ({time.perf_counter() - t0:.0f}s)", flush=True)
    rows = aggregate(runs)
    _common.write_csv(args.out / "lr_stability.csv", rows)
    plot(rows, args.out / "lr_stability.png")
    print()
    print(_common.format_table(rows, ["optimizer", "lr", "loss", "accuracy"]))
    print()
    _common.print_lines(claims(rows))
    print(f"\nwrote {args.out / 'lr_stability.csv'} and lr_stability.png in {time.perf_counter() - started:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
