"""Figure 8 of the SSAM paper: the top Hessian eigenvalues at the minima SGD, SAM and SSAM find.

Commands (from the repository root)::

    .venv/bin/python bench/paper/minima_sharpness.py            # 3 optimizers x 3 seeds x 20 epochs, ~2-4 minutes
    .venv/bin/python bench/paper/minima_sharpness.py --quick    # smoke test, seconds
    .venv/bin/python bench/paper/minima_sharpness.py --full     # 60 epochs, 5 seeds

Writes ``minima_sharpness.csv`` (one row per optimizer and seed) and ``minima_sharpness.png`` to ``--out``
(default ``outputs/bench/minima_sharpness/``).

Setup (Section 5.4; the paper: ResNet-20 on CIFAR-10 and ResNet-56 on CIFAR-100, PyHessian). The BatchNorm
CNN of ``_common.small_cnn`` trains on 1297 of scikit-learn's 8x8 digits (500 held out for the test
accuracy) with SGD (momentum 0.9, weight decay 5e-4, lr 0.05, cosine decay, batch 128), plain or as the base
of the package's ``SSAMOptimizer`` with SAM (``usam``) and SSAM (``ssam``), rho = 0.1, the same budget and
seeds for every optimizer (``freeze_batchnorm_stats`` around the second pass). As the paper does (after
Jiang et al. 2020), every BatchNorm is then fused into the convolution before it (the fused network computes
the same function as the original in evaluation mode; the script checks it), and the five largest
eigenvalues of the Hessian of the mean training loss (all 1297 images, cross-entropy, batches of 256) with
respect to all the fused network's parameters come from ``hf_ssam.sharpness.top_hessian_eigenvalues``.

Claims checked (the paper's text): SAM's eigenvalues are well below SGD's (the top one, mean over seeds,
below 0.8x SGD's); SSAM's are the lowest (the top one below SAM's and SGD's).
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

OPTIMIZERS: dict[str, str] = {"sgd": "SGD", "usam": "SAM (usam)", "ssam": "SSAM (ssam)"}
RHO, LR, BATCH, N_TRAIN, K = 0.1, 0.05, 128, 1297, 5
WELL_BELOW = 0.8
FUSE_TOLERANCE = 1e-4


def split() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    x, y = _common.digits()
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(4321))
    train, test = order[:N_TRAIN], order[N_TRAIN:]
    return x[train], y[train], x[test], y[test]


def train(optimizer: str, seed: int, epochs: int, data: tuple, rho: float = RHO) -> nn.Module:
    x, y = data[0], data[1]
    torch.manual_seed(seed)
    model = _common.small_cnn()
    kwargs = dict(lr=LR, momentum=0.9, weight_decay=5e-4)
    opt = _common.sgd_or_sam(model.parameters(), optimizer, rho, **kwargs)
    steps_per_epoch = len(x) // BATCH
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps_per_epoch)
    loss_fn = nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=gen)
        for i in range(steps_per_epoch):
            xb, yb = x[perm[i * BATCH : (i + 1) * BATCH]], y[perm[i * BATCH : (i + 1) * BATCH]]
            _common.train_step(model, opt, loss_fn, xb, yb)
            schedule.step()
    return model.eval()


def fuse_batchnorm(model: nn.Sequential) -> nn.Sequential:
    """A copy of ``model`` with every Conv2d -> BatchNorm2d pair replaced by one Conv2d (evaluation-mode maths).

    ``W' = W * s``, ``b' = (b - mean) * s + beta`` with ``s = gamma / sqrt(var + eps)`` per output channel.
    """
    layers = list(model)
    fused: list[nn.Module] = []
    i = 0
    while i < len(layers):
        layer = layers[i]
        if isinstance(layer, nn.Conv2d) and i + 1 < len(layers) and isinstance(layers[i + 1], nn.BatchNorm2d):
            bn = layers[i + 1]
            conv = nn.Conv2d(
                layer.in_channels,
                layer.out_channels,
                layer.kernel_size,
                stride=layer.stride,
                padding=layer.padding,
                bias=True,
            )
            with torch.no_grad():
                s = bn.weight / torch.sqrt(bn.running_var + bn.eps)  # s = γ/√(var + ε)
                conv.weight.copy_(layer.weight * s.view(-1, 1, 1, 1))
                bias = layer.bias if layer.bias is not None else torch.zeros_like(bn.running_mean)
                conv.bias.copy_((bias - bn.running_mean) * s + bn.bias)
            fused.append(conv)
            i += 2
        else:
            fused.append(layer)
            i += 1
    return nn.Sequential(*fused).eval()


def measure(model: nn.Module, data: tuple, max_iter: int, hessian_images: int = N_TRAIN) -> dict:
    from hf_ssam.sharpness import top_hessian_eigenvalues

    x, y, x_test, y_test = data
    fused = fuse_batchnorm(model)
    with torch.no_grad():
        fuse_error = (fused(x) - model(x)).abs().max().item()
        train_loss = nn.functional.cross_entropy(model(x), y).item()
        test_acc = (model(x_test).argmax(1) == y_test).double().mean().item()
    if not fuse_error <= FUSE_TOLERANCE:
        raise RuntimeError(f"the fused network differs from the original by {fuse_error:.2e}")
    batches = [(x[i : i + 256], y[i : i + 256]) for i in range(0, hessian_images, 256)]

    def loss_fn(m: nn.Module, batch: tuple) -> torch.Tensor:
        # mean over batches of the batch means = the mean training loss (up to the short last batch's weight)
        return nn.functional.cross_entropy(m(batch[0]), batch[1])

    eig = top_hessian_eigenvalues(fused, loss_fn, batches, k=K, max_iter=max_iter, tol=1e-3)
    return {"train_loss": train_loss, "test_accuracy": test_acc, "fuse_error": fuse_error} | {
        f"eig{i + 1}": v for i, v in enumerate(eig)
    }


def claims(rows: list[dict]) -> list[str]:
    def top(opt: str) -> float:
        return statistics.fmean(r["eig1"] for r in rows if r["optimizer"] == opt)

    sgd, sam, ssam = top("sgd"), top("usam"), top("ssam")
    return [
        _common.verdict(
            sam < WELL_BELOW * sgd,
            f"SAM's top eigenvalue is well below SGD's (< {WELL_BELOW}x; mean over seeds: usam {sam:.3g}, "
            f"sgd {sgd:.3g}, ratio {sam / sgd:.2f})",
        ),
        _common.verdict(
            ssam < min(sam, sgd),
            f"SSAM's top eigenvalue is the lowest (ssam {ssam:.3g}, usam {sam:.3g}, sgd {sgd:.3g})",
        ),
    ]


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    width = 0.8 / len(OPTIMIZERS)
    colors = {"sgd": "k", "usam": "tab:blue", "ssam": "tab:green"}
    for j, (opt, label) in enumerate(OPTIMIZERS.items()):
        sub = [r for r in rows if r["optimizer"] == opt]
        means = [statistics.fmean(r[f"eig{i + 1}"] for r in sub) for i in range(K)]
        spread = [statistics.pstdev(r[f"eig{i + 1}"] for r in sub) for i in range(K)]
        ax.bar([i + j * width for i in range(K)], means, width, yerr=spread, color=colors[opt], label=label, alpha=0.8)
    ax.set_xticks([i + width for i in range(K)])
    ax.set_xticklabels([f"λ{i + 1}" for i in range(K)])
    ax.set_ylabel("Hessian eigenvalue (BatchNorm fused)")
    ax.set_title("top-5 Hessian eigenvalues, small CNN on digits", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    _common.savefig(fig, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument(
        "--quick", action="store_true", help="smoke test: 1 seed, 1 epoch, 10 Lanczos products on 256 images"
    )
    size.add_argument("--full", action="store_true", help="60 epochs, 5 seeds")
    parser.add_argument("--epochs", type=int, default=None, help="epochs (default 20)")
    parser.add_argument("--seeds", type=int, default=None, help="seeds (default 3)")
    parser.add_argument("--rho", type=float, default=RHO, help=f"rho of SAM and SSAM (default {RHO})")
    parser.add_argument("--out", type=Path, default=_common.default_out("minima_sharpness"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    epochs, seeds, max_iter = (1, 1, 10) if args.quick else (60, 5, 200) if args.full else (20, 3, 200)
    hessian_images = 256 if args.quick else N_TRAIN
    epochs, seeds = args.epochs or epochs, args.seeds or seeds
    data = split()
    started = time.perf_counter()
    print(f"{epochs} epochs, {seeds} seeds, rho {args.rho}, lr {LR} (cosine), batch {BATCH}", flush=True)
    rows = []
    for opt in OPTIMIZERS:
        for seed in range(seeds):
            t0 = time.perf_counter()
            model = train(opt, seed, epochs, data, args.rho)
            row = {"optimizer": opt, "seed": seed, **measure(model, data, max_iter, hessian_images)}
            rows.append(row)
            eigs = " ".join(f"{row[f'eig{i + 1}']:.3g}" for i in range(K))
            print(
                f"  {opt:5s} seed {seed}: train loss {row['train_loss']:.3g} test acc {row['test_accuracy']:.3f} "
                f"eigenvalues {eigs} "
                f"(fused |dy| {row['fuse_error']:.1e}, {time.perf_counter() - t0:.0f}s)",
                flush=True,
            )
    _common.write_csv(args.out / "minima_sharpness.csv", rows)
    plot(rows, args.out / "minima_sharpness.png")
    table = []
    for opt in OPTIMIZERS:
        sub = [r for r in rows if r["optimizer"] == opt]
        table.append(
            {"optimizer": opt}
            | {k: statistics.fmean(r[k] for r in sub) for k in ["train_loss", "test_accuracy"]}
            | {f"eig{i + 1}": statistics.fmean(r[f"eig{i + 1}"] for r in sub) for i in range(K)}
        )
    print()
    print(_common.format_table(table, list(table[0])))
    print()
    _common.print_lines(claims(rows))
    if any(not math.isfinite(r["eig1"]) for r in rows):
        print("some eigenvalues are not finite (a diverged run)")
    print(
        f"\nwrote {args.out / 'minima_sharpness.csv'} and minima_sharpness.png in {time.perf_counter() - started:.0f}s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
