"""Figures 4-5 of the SSAM paper: algorithmic stability of SGD, SAM and SSAM on two training sets one example apart.

Commands (from the repository root)::

    .venv/bin/python bench/paper/stability.py            # MLP and CNN, 3 optimizers, 10 epochs, ~3-5 minutes
    .venv/bin/python bench/paper/stability.py --quick    # smoke test, seconds
    .venv/bin/python bench/paper/stability.py --full     # 50 epochs, 3 pairs of training sets

Writes ``stability.csv`` (one row per model, optimizer, pair and epoch) and ``stability.png`` to ``--out``
(default ``outputs/bench/stability/``).

Setup (Section 5.1, after Hardt et al. 2016). The paper uses MNIST (fully connected network) and CIFAR-10
(LeNet); neither is available offline, so both models train on scikit-learn's 8x8 digits (bundled with it):
a fixed split of 1000 training and 797 test images. S is 1000 training images; S' is S with one position
replaced by an image left out of S. Both copies of a model start from the same initialization and see the
examples in the same order (the same permutation every epoch; at the replaced position S' has its own
image). Models: an MLP with two hidden layers of 500 ReLU units (the paper's) and a small LeNet-style CNN
(two 3x3 convolutions with max-pooling, two linear layers), no BatchNorm, no dropout. SGD with batch size
1, constant lr 0.01, no momentum, no weight decay, plain or as the base of the package's
``SSAMOptimizer`` with SAM (``usam``) and SSAM (``ssam``), rho = 0.01 (with batch size 1, rho = 0.1 keeps
both at the initial loss for a whole epoch; the paper does not give its rho). Once per epoch: the parameter distance
||w_S - w_S'|| (all parameters) and the generalization gap of the model trained on S (test loss minus
training loss, cross-entropy, on the whole sets).

Claims checked (the paper's text): distance and gap move together (Pearson correlation over the epochs
> 0.5 for every model and optimizer); SGD's models diverge fastest (largest final distance); SSAM is less
sensitive than SAM (smaller final distance).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import _common  # noqa: E402  (before torch: pins the offline, single-threaded environment)
import torch  # noqa: E402
from torch import nn  # noqa: E402

OPTIMIZERS: dict[str, str] = {"sgd": "SGD", "usam": "SAM (usam)", "ssam": "SSAM (ssam)"}
MODELS: dict[str, str] = {"mlp": "MLP 2x500", "cnn": "LeNet-style CNN"}
RHO, LR, N_TRAIN = 0.01, 0.01, 1000
CORRELATION = 0.5


def build(name: str, hidden: int = 500) -> nn.Module:
    if name == "mlp":
        return nn.Sequential(
            nn.Flatten(), nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 10)
        )
    return nn.Sequential(  # 8x8 -> 4x4 -> 2x2
        nn.Conv2d(1, 6, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64, 32),
        nn.ReLU(),
        nn.Linear(32, 10),
    )


def training_sets(pair: int, n_train: int = N_TRAIN) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Indices of S, of S' (S with one position replaced) and of the test set, into ``_common.digits()``."""
    gen = torch.Generator().manual_seed(1234)
    order = torch.randperm(1797, generator=gen)  # fixed train/test split
    pool, test = order[: n_train + 1], order[N_TRAIN + 1 :]
    gen = torch.Generator().manual_seed(100 + pair)
    removed = int(torch.randint(n_train + 1, (1,), generator=gen))
    s = torch.cat([pool[:removed], pool[removed + 1 :]])
    s_prime = s.clone()
    s_prime[int(torch.randint(n_train, (1,), generator=gen))] = pool[removed]
    return s, s_prime, test


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return nn.functional.cross_entropy(model(x), y).item()


def distance(a: nn.Module, b: nn.Module) -> float:
    return sum(((p - q) ** 2).sum() for p, q in zip(a.parameters(), b.parameters())).sqrt().item()


def run(
    model_name: str, optimizer: str, pair: int, epochs: int, data: tuple, hidden: int, n_train: int = N_TRAIN
) -> list[dict]:
    """Train the two copies side by side; one row per epoch (epoch 0 = initialization)."""
    x, y = data
    s, s_prime, test = training_sets(pair, n_train)
    torch.manual_seed(pair)
    first = build(model_name, hidden)
    second = build(model_name, hidden)
    second.load_state_dict(first.state_dict())  # same initialization
    opts = [_common.sgd_or_sam(model.parameters(), optimizer, RHO, lr=LR) for model in (first, second)]
    loss_fn = nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(7 + pair)
    rows = []

    def record(epoch: int) -> None:
        train_loss = evaluate(first, x[s], y[s])
        test_loss = evaluate(first, x[test], y[test])
        rows.append(
            {
                "model": model_name,
                "optimizer": optimizer,
                "pair": pair,
                "epoch": epoch,
                "distance": distance(first, second),
                "train_loss": train_loss,
                "test_loss": test_loss,
                "gap": test_loss - train_loss,
            }
        )

    record(0)
    for epoch in range(1, epochs + 1):
        perm = torch.randperm(n_train, generator=gen)  # the same order for both sets
        for i in perm.tolist():
            for model, opt, idx in ((first, opts[0], s), (second, opts[1], s_prime)):
                xb, yb = x[idx[i] : idx[i] + 1], y[idx[i] : idx[i] + 1]
                _common.train_step(model, opt, loss_fn, xb, yb, freeze_bn=False)
        record(epoch)
    return rows


def pearson(a: list[float], b: list[float]) -> float:
    if len(a) < 3 or statistics.pstdev(a) == 0 or statistics.pstdev(b) == 0:
        return float("nan")
    return statistics.correlation(a, b)


def summarize(rows: list[dict]) -> list[dict]:
    out = []
    for model in MODELS:
        for opt in OPTIMIZERS:
            sub = [r for r in rows if r["model"] == model and r["optimizer"] == opt]
            if not sub:
                continue
            last = max(r["epoch"] for r in sub)
            pairs = sorted({r["pair"] for r in sub})
            correlations = [
                pearson(
                    [r["distance"] for r in sub if r["pair"] == p and r["epoch"] > 0],
                    [r["gap"] for r in sub if r["pair"] == p and r["epoch"] > 0],
                )
                for p in pairs
            ]
            final = [r for r in sub if r["epoch"] == last]
            out.append(
                {
                    "model": model,
                    "optimizer": opt,
                    "final_distance": statistics.fmean(r["distance"] for r in final),
                    "final_gap": statistics.fmean(r["gap"] for r in final),
                    "final_train_loss": statistics.fmean(r["train_loss"] for r in final),
                    "correlation": statistics.fmean(correlations),
                }
            )
    return out


def claims(summary: list[dict]) -> list[str]:
    at = {(r["model"], r["optimizer"]): r for r in summary}
    lines = []
    corr = {k: v["correlation"] for k, v in at.items()}
    detail = ", ".join(f"{m}/{o}: {c:.2f}" for (m, o), c in corr.items())
    lines.append(
        _common.verdict(
            all(c > CORRELATION for c in corr.values()),
            f"parameter distance and generalization gap move together "
            f"(Pearson r > {CORRELATION} everywhere: {detail})",
        )
    )
    for model in MODELS:
        d = {o: at[(model, o)]["final_distance"] for o in OPTIMIZERS}
        detail = ", ".join(f"{o} {v:.3g}" for o, v in d.items())
        lines.append(
            _common.verdict(
                d["sgd"] > max(d["usam"], d["ssam"]),
                f"[{model}] SGD's models diverge fastest (final ||w_S - w_S'||: {detail})",
            )
        )
        lines.append(
            _common.verdict(
                d["ssam"] < d["usam"], f"[{model}] SSAM is less sensitive than SAM ({d['ssam']:.3g} < {d['usam']:.3g})"
            )
        )
    return lines


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(9, 6.4))
    styles = {"sgd": ("k", "-"), "usam": ("tab:blue", "-."), "ssam": ("tab:green", "-")}
    for row_axes, model in zip(axes, MODELS):
        for opt, label in OPTIMIZERS.items():
            sub = [r for r in rows if r["model"] == model and r["optimizer"] == opt]
            epochs = sorted({r["epoch"] for r in sub})
            color, ls = styles[opt]
            for ax, key in zip(row_axes, ("distance", "gap")):
                mean = [statistics.fmean(r[key] for r in sub if r["epoch"] == e) for e in epochs]
                ax.plot(epochs, mean, ls, color=color, label=label)
        row_axes[0].set_ylabel(f"{MODELS[model]}\n||w_S - w_S'||")
        row_axes[1].set_ylabel("test loss - train loss")
        for ax in row_axes:
            ax.grid(alpha=0.3)
            ax.set_xlabel("epoch")
    axes[0][0].set_title("(a) parameter distance", fontsize=10)
    axes[0][1].set_title("(b) generalization gap", fontsize=10)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    _common.savefig(fig, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="smoke test: 3 epochs, 100 images, 64-unit MLP")
    size.add_argument("--full", action="store_true", help="50 epochs, 3 pairs of training sets")
    parser.add_argument("--epochs", type=int, default=None, help="epochs (default 10)")
    parser.add_argument("--pairs", type=int, default=None, help="pairs (S, S') to average over (default 1)")
    parser.add_argument("--out", type=Path, default=_common.default_out("stability"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    epochs, pairs, hidden = (3, 1, 64) if args.quick else (50, 3, 500) if args.full else (10, 1, 500)
    n_train = 100 if args.quick else N_TRAIN
    epochs, pairs = args.epochs or epochs, args.pairs or pairs
    data = _common.digits()
    started = time.perf_counter()
    print(f"{epochs} epochs, {pairs} pair(s), batch 1, lr {LR}, rho {RHO}, {n_train} training images", flush=True)
    rows: list[dict] = []
    for model in MODELS:
        for opt in OPTIMIZERS:
            t0 = time.perf_counter()
            for pair in range(pairs):
                rows += run(model, opt, pair, epochs, data, hidden, n_train)
            last = rows[-1]
            print(
                f"  {model} {opt:5s} distance {last['distance']:.3g} gap {last['gap']:.3g} "
                f"train loss {last['train_loss']:.3g} ({time.perf_counter() - t0:.0f}s)",
                flush=True,
            )
    summary = summarize(rows)
    _common.write_csv(args.out / "stability.csv", rows)
    plot(rows, args.out / "stability.png")
    print()
    print(_common.format_table(summary, list(summary[0])))
    print()
    _common.print_lines(claims(summary))
    print(f"\nwrote {args.out / 'stability.csv'} and stability.png in {time.perf_counter() - started:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
