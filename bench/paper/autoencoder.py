"""Figure 1 of the SSAM paper: escaping the saddle of a linear autoencoder at the origin.

Commands (from the repository root)::

    .venv/bin/python bench/paper/autoencoder.py            # 3 seeds x 5000 steps, ~1-2 minutes
    .venv/bin/python bench/paper/autoencoder.py --quick    # smoke test, seconds
    .venv/bin/python bench/paper/autoencoder.py --full     # 10 seeds

Writes ``autoencoder.csv`` (loss curves), ``autoencoder_escape.csv`` (steps to escape) and
``autoencoder.png`` to ``--out`` (default ``outputs/bench/autoencoder/``).

Setup. d = 20; the model is x -> W2 W1 x with two square, bias-free layers, so W2 W1 ~ I is learned from
n = 100 fixed samples x ~ N(0, I); the loss of a mini-batch of 10 is the per-sample squared error
``||W2 W1 x - x||^2`` (summed over the 20 outputs) averaged over the batch. The origin is a saddle.
W1 and W2 start from N(0, 1e-4) entries (std 0.01); every optimizer is SGD with a constant lr of 1e-3
(no momentum), plain or as the base optimizer of the package's ``SSAMOptimizer`` (``sam`` = SAM*,
``usam`` = SAM, ``ssam`` = SSAM) with rho in {0.02, 0.05, 0.08}. Every optimizer sees the same
initialization and the same mini-batches for a given seed. 500 epochs = 5000 steps.

Escape: the first step (checked every 10) at which the full-data loss is below half its initial value
(which is ~ d = 20 at the origin). Runs that never get there within the budget did not escape.
The curvature at the saddle matters: SAM's ascent flips the sign of a negative-curvature direction once
rho * |curvature| > 1, so rescaling the loss (summing instead of averaging over the batch) traps SAM at far
smaller rho. The averaged loss used here is the usual mean-squared-error scaling.

Claims checked: SAM and SAM* need more steps than SGD to escape, more as rho grows (the paper: up to not
escaping at all); SSAM escapes faster than both.
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

from hf_ssam import SSAMOptimizer  # noqa: E402

OPTIMIZERS: dict[str, str] = {"sgd": "SGD", "sam": "SAM* (sam)", "usam": "SAM (usam)", "ssam": "SSAM (ssam)"}
RHOS: tuple[float, ...] = (0.02, 0.05, 0.08)
D, N_SAMPLES, BATCH, LR, INIT_STD = 20, 100, 10, 1e-3, 1e-2
CHECK_EVERY = 10


def run(optimizer: str, rho: float, seed: int, steps: int) -> tuple[list[tuple[int, float]], int | None]:
    """Train one autoencoder; returns the loss curve [(step, full-data loss)] and the escape step (or None)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(N_SAMPLES, D, generator=gen)
    encoder, decoder = nn.Linear(D, D, bias=False), nn.Linear(D, D, bias=False)
    with torch.no_grad():
        encoder.weight.copy_(torch.randn(D, D, generator=gen) * INIT_STD)
        decoder.weight.copy_(torch.randn(D, D, generator=gen) * INIT_STD)
    params = [encoder.weight, decoder.weight]
    if optimizer == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(params, lr=LR)
    else:
        opt = SSAMOptimizer(params, torch.optim.SGD, variant=optimizer, rho=rho, lr=LR)

    def loss_fn(batch: torch.Tensor) -> torch.Tensor:
        return (decoder(encoder(batch)) - batch).pow(2).sum(dim=1).mean()

    curve: list[tuple[int, float]] = []
    escaped = None
    initial = None
    per_epoch = N_SAMPLES // BATCH
    perm = torch.arange(N_SAMPLES)
    for step in range(steps + 1):
        if step % CHECK_EVERY == 0:
            with torch.no_grad():
                full = loss_fn(x).item()
            initial = full if initial is None else initial
            curve.append((step, full))
            if escaped is None and full < 0.5 * initial:
                escaped = step
        if step == steps:
            break
        if step % per_epoch == 0:
            perm = torch.randperm(N_SAMPLES, generator=gen)
        batch = x[perm[(step % per_epoch) * BATCH : (step % per_epoch + 1) * BATCH]]
        if optimizer == "sgd":
            opt.zero_grad()
            loss_fn(batch).backward()
            opt.step()
        else:
            loss_fn(batch).backward()
            opt.first_step(zero_grad=True)  # type: ignore[attr-defined]
            loss_fn(batch).backward()
            opt.second_step(zero_grad=True)  # type: ignore[attr-defined]
    return curve, escaped


def claims(summary: list[dict], steps: int) -> list[str]:
    med = {(r["optimizer"], r["rho"]): r["median_escape_step"] for r in summary}

    def m(opt: str, rho: float) -> float:
        return med[(opt, 0.0 if opt == "sgd" else rho)]

    lines = []
    for opt in ("usam", "sam"):
        values = [m(opt, rho) for rho in RHOS]
        detail = ", ".join(f"rho={rho:g}: {v:.0f}" for rho, v in zip(RHOS, values))
        lines.append(
            _common.verdict(
                all(v > m("sgd", 0) for v in values),
                f"{OPTIMIZERS[opt]} needs more steps than SGD ({m('sgd', 0):.0f}) to escape at every rho ({detail})",
            )
        )
        lines.append(
            _common.verdict(
                all(a < b for a, b in zip(values, values[1:])), f"{OPTIMIZERS[opt]} escapes more slowly as rho grows"
            )
        )
    stuck = [OPTIMIZERS[o] for o in ("usam", "sam") if m(o, RHOS[-1]) == float("inf")]
    lines.append(
        _common.verdict(
            bool(stuck),
            f"at rho={RHOS[-1]:g} SAM or SAM* no longer escapes within {steps} "
            f"steps ({', '.join(stuck) or 'both escape'})",
        )
    )
    ok = all(m("ssam", rho) < min(m("usam", rho), m("sam", rho)) for rho in RHOS)
    detail = ", ".join(f"rho={rho:g}: {m('ssam', rho):.0f}" for rho in RHOS)
    lines.append(_common.verdict(ok, f"SSAM escapes faster than SAM and SAM* at every rho ({detail})"))
    return lines


def plot(curves: list[dict], path: Path, seed: int) -> None:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(RHOS), figsize=(4.2 * len(RHOS), 3.3), sharey=True)
    styles = {"sgd": ("k", "-"), "sam": ("tab:orange", "--"), "usam": ("tab:blue", "-."), "ssam": ("tab:green", "-")}
    for ax, rho in zip(axes, RHOS):
        for opt, label in OPTIMIZERS.items():
            pts = [
                (r["step"], r["loss"])
                for r in curves
                if r["optimizer"] == opt and r["seed"] == seed and r["rho"] == (0.0 if opt == "sgd" else rho)
            ]
            color, ls = styles[opt]
            ax.plot([p[0] / (N_SAMPLES // BATCH) for p in pts], [p[1] for p in pts], ls, color=color, label=label)
        ax.set_yscale("log")
        ax.set_xlabel("epoch")
        ax.set_title(f"rho = {rho:g}")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("training loss")
    axes[0].legend(fontsize=8)
    _common.savefig(fig, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="smoke test: 1 seed, 200 steps")
    size.add_argument("--full", action="store_true", help="10 seeds")
    parser.add_argument("--seeds", type=int, default=None, help="number of seeds (default 3)")
    parser.add_argument("--steps", type=int, default=None, help="step budget (default 5000 = 500 epochs)")
    parser.add_argument("--out", type=Path, default=_common.default_out("autoencoder"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    seeds, steps = (1, 200) if args.quick else (10, 5000) if args.full else (3, 5000)
    seeds, steps = args.seeds or seeds, args.steps or steps
    started = time.perf_counter()
    curves, summary = [], []
    for opt in OPTIMIZERS:
        for rho in RHOS if opt != "sgd" else (0.0,):
            escapes = []
            for seed in range(seeds):
                curve, escaped = run(opt, rho, seed, steps)
                curves += [{"optimizer": opt, "rho": rho, "seed": seed, "step": s, "loss": v} for s, v in curve]
                escapes.append(float("inf") if escaped is None else float(escaped))
            row = {
                "optimizer": opt,
                "rho": rho,
                "median_escape_step": statistics.median(escapes),
                "escaped_runs": sum(e != float("inf") for e in escapes),
                "runs": seeds,
                "escape_steps": " ".join("never" if e == float("inf") else f"{e:.0f}" for e in escapes),
            }
            summary.append(row)
            print(f"  {opt:5s} rho={rho:<5g} escape steps {row['escape_steps']}", flush=True)
    _common.write_csv(args.out / "autoencoder.csv", curves)
    _common.write_csv(args.out / "autoencoder_escape.csv", summary)
    plot(curves, args.out / "autoencoder.png", seed=0)
    print()
    print(_common.format_table(summary, ["optimizer", "rho", "median_escape_step", "escaped_runs", "runs"], ".4g"))
    print()
    _common.print_lines(claims(summary, steps))
    print(
        f"\nwrote {args.out / 'autoencoder.csv'}, autoencoder_escape.csv and autoencoder.png "
        f"in {time.perf_counter() - started:.0f}s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
