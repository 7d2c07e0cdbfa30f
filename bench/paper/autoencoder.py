"""Figure 1 of the SSAM paper: escaping the saddle of a linear autoencoder at the origin.

Commands (from the repository root)::

    .venv/bin/python bench/paper/autoencoder.py            # 3 seeds x 5000 steps, ~1-2 minutes
    .venv/bin/python bench/paper/autoencoder.py --quick    # smoke test, seconds
    .venv/bin/python bench/paper/autoencoder.py --full     # 10 seeds
    .venv/bin/python bench/paper/autoencoder.py --sweep    # rho = 0.08 over the unstated settings, ~3-5 minutes
    .venv/bin/python bench/paper/autoencoder.py --init-std 1e-4   # N(0, 1e-4) read as a standard deviation

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

``--sweep`` looks for the settings where "at rho = 0.08 SAM and SAM* no longer escape" holds. The paper
gives the init (N(0, 1e-4)), the lr and 500 epochs, but not the loss scaling, the batch size or the data;
the sweep varies the init std (1e-3, 1e-2, 1e-1; and 1e-4, in case the paper's 1e-4 is a std), a factor
on the loss (1 = mean over the batch, 10 = sum over a batch of 10) and the batch size (10, or 100 = full
batch, no sampling noise) with one seed and a 5000-step budget (``--steps``), and writes
``autoencoder_sweep.csv`` (escape step per optimizer; inf = never). It prints, for the budget and half of
it, the settings where SGD escapes and SAM and SAM* do not, and among those the ones where SSAM escapes.
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
#: --sweep: (init std, loss scale, batch size) at rho = 0.08; loss scale 10 = summing over a batch of 10;
#: batch 100 = full-batch gradient descent (no sampling noise)
SWEEP: tuple[tuple[float, float, int], ...] = ((1e-4, 1.0, BATCH),) + tuple(
    (std, scale, batch)
    for batch in (BATCH, N_SAMPLES)
    for scale in (1.0, 5.0, 10.0)
    for std in (1e-3, 1e-2, 1e-1)
    if batch == BATCH or std == INIT_STD
)
SWEEP_QUICK: tuple[tuple[float, float, int], ...] = ((INIT_STD, 1.0, BATCH), (INIT_STD, 10.0, BATCH))


def run(
    optimizer: str,
    rho: float,
    seed: int,
    steps: int,
    *,
    init_std: float = INIT_STD,
    loss_scale: float = 1.0,
    batch_size: int = BATCH,
    stop_at_escape: bool = False,
) -> tuple[list[tuple[int, float]], int | None]:
    """Train one autoencoder; returns the loss curve [(step, full-data loss)] and the escape step (or None).

    ``loss_scale`` multiplies the training loss (10 = summing over a batch of 10 instead of averaging),
    ``batch_size`` = ``N_SAMPLES`` is full-batch gradient descent (no sampling noise). The loss curve and the
    escape test use the unscaled full-data loss.
    """
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(N_SAMPLES, D, generator=gen)
    encoder, decoder = nn.Linear(D, D, bias=False), nn.Linear(D, D, bias=False)
    with torch.no_grad():
        encoder.weight.copy_(torch.randn(D, D, generator=gen) * init_std)
        decoder.weight.copy_(torch.randn(D, D, generator=gen) * init_std)
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
    per_epoch = N_SAMPLES // batch_size
    perm = torch.arange(N_SAMPLES)
    for step in range(steps + 1):
        if step % CHECK_EVERY == 0:
            with torch.no_grad():
                full = loss_fn(x).item()
            initial = full if initial is None else initial
            curve.append((step, full))
            if escaped is None and full < 0.5 * initial:
                escaped = step
        if step == steps or (stop_at_escape and escaped is not None):
            break
        if step % per_epoch == 0:
            perm = torch.randperm(N_SAMPLES, generator=gen)
        batch = x[perm[(step % per_epoch) * batch_size : (step % per_epoch + 1) * batch_size]]
        if optimizer == "sgd":
            opt.zero_grad()
            (loss_scale * loss_fn(batch)).backward()
            opt.step()
        else:
            (loss_scale * loss_fn(batch)).backward()
            opt.first_step(zero_grad=True)  # type: ignore[attr-defined]
            (loss_scale * loss_fn(batch)).backward()
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


def sweep(steps: int, seed: int, quick: bool) -> list[dict]:
    """Escape steps at the largest rho over the settings the paper leaves open (``SWEEP``); one seed."""
    rho = RHOS[-1]
    cells = SWEEP_QUICK if quick else SWEEP
    rows = []
    for init_std, loss_scale, batch_size in cells:
        row: dict = {"init_std": init_std, "loss_scale": loss_scale, "batch": batch_size, "rho": rho}
        for opt in OPTIMIZERS:
            _, escaped = run(
                opt,
                rho,
                seed,
                steps,
                init_std=init_std,
                loss_scale=loss_scale,
                batch_size=batch_size,
                stop_at_escape=True,
            )
            row[opt] = float("inf") if escaped is None else float(escaped)
        rows.append(row)
        print(
            f"  init std {init_std:g} loss x{loss_scale:g} batch {batch_size:3d}: "
            + " ".join(f"{o}={'never' if row[o] == float('inf') else int(row[o])}" for o in OPTIMIZERS),
            flush=True,
        )
    return rows


def sweep_claims(rows: list[dict], steps: int) -> list[str]:
    """Where, in the sweep, SAM and SAM* stop escaping at the largest rho while SGD escapes (and SSAM?)."""
    lines = []
    for budget in sorted({steps // 2, steps}):
        held = [r for r in rows if r["sgd"] <= budget and r["usam"] > budget and r["sam"] > budget]
        full = [r for r in held if r["ssam"] <= budget]

        def cells(rs: list[dict]) -> str:
            return "; ".join(f"init {r['init_std']:g}, loss x{r['loss_scale']:g}, batch {r['batch']}" for r in rs)

        lines.append(
            _common.verdict(
                bool(held),
                f"[sweep, {budget} steps] at rho={RHOS[-1]:g} SAM and SAM* no longer escape while SGD does: "
                f"{len(held)} of {len(rows)} settings ({cells(held) or 'none'})",
            )
        )
        lines.append(
            _common.verdict(
                bool(full),
                f"[sweep, {budget} steps] ... and SSAM still escapes there: {len(full)} of {len(rows)} settings "
                f"({cells(full) or 'none'})",
            )
        )
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
    parser.add_argument("--init-std", type=float, default=INIT_STD, help=f"std of the initial weights ({INIT_STD})")
    parser.add_argument("--loss-scale", type=float, default=1.0, help="factor on the training loss (default 1)")
    parser.add_argument(
        "--sweep",
        action="store_true",
        help="instead: escape steps at the largest rho over init scale, loss scale and batch size",
    )
    parser.add_argument("--out", type=Path, default=_common.default_out("autoencoder"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.sweep:
        steps = args.steps or (200 if args.quick else 5000)
        started = time.perf_counter()
        print(f"sweep at rho={RHOS[-1]:g}, one seed, budget {steps} steps (runs stop at escape)", flush=True)
        rows = sweep(steps, 0, args.quick)
        _common.write_csv(args.out / "autoencoder_sweep.csv", rows)
        print()
        print(_common.format_table(rows, ["init_std", "loss_scale", "batch", *OPTIMIZERS], ".4g"))
        print()
        _common.print_lines(sweep_claims(rows, steps))
        print(f"\nwrote {args.out / 'autoencoder_sweep.csv'} in {time.perf_counter() - started:.0f}s")
        return 0
    seeds, steps = (1, 200) if args.quick else (10, 5000) if args.full else (3, 5000)
    seeds, steps = args.seeds or seeds, args.steps or steps
    started = time.perf_counter()
    print(f"{seeds} seeds x {steps} steps, init std {args.init_std:g}, loss x{args.loss_scale:g}", flush=True)
    curves, summary = [], []
    for opt in OPTIMIZERS:
        for rho in RHOS if opt != "sgd" else (0.0,):
            escapes = []
            for seed in range(seeds):
                curve, escaped = run(opt, rho, seed, steps, init_std=args.init_std, loss_scale=args.loss_scale)
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
