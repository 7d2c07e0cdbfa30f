"""The cost frontier: what each SAM schedule keeps of full SSAM's accuracy gain over SGD, and what it costs.

Commands (from the repository root; the numbers in ``docs/benchmarks.md`` come from the first two)::

    .venv/bin/python bench/frontier.py            # 2 tasks x 10 schedules x 5 seeds (0-4), the full budget
    .venv/bin/python bench/frontier.py --sweep    # rho of the sparse schedules x 1, sqrt(k), k (seeds 100-102)
    .venv/bin/python bench/frontier.py --quick    # mlp, 2 seeds, 20 steps: a smoke run (used by the tests)
    .venv/bin/python bench/frontier.py --tasks mlp --schedules none ssam --seeds 100 101 102   # one comparison

Outputs (``--out``, default ``outputs/bench/frontier/``): ``frontier.md`` (the table and the verdict),
``frontier.csv`` (the table's numbers), ``frontier_runs.csv`` (one row per run) and ``frontier.png``;
``--sweep`` writes ``frontier_sweep.md`` and ``frontier_sweep.csv``.

Every run trains through ``SSAMTrainer`` (SGD, momentum 0.9, constant lr 0.05, batch 32, 20 epochs = 900
optimizer steps, base rho 0.05, ``sam_variant="ssam"`` unless the schedule is ``none``) on scikit-learn's digits
with flipped training labels (``recipes/demo.py``'s data), and is scored on the clean validation labels. Tasks:
``mlp`` (the demo: 20 % flipped, its MLP 64-256-256-10) and ``mlp40`` (40 % flipped, the same MLP); ``cnn``
(20 % flipped, ``_common.small_cnn``, a BatchNorm CNN) with ``--tasks``. ``--quick`` runs ``mlp`` only.
Schedules (``frontier/tasks.py``): ``none``; ``ssam`` (two passes every step); ``ssam@k`` (``sam_interval=k``,
k = 2, 5) at the same rho and, ``ρ↑``, with rho scaled by the factor ``--rho_scaling`` picks; ``ssam@5+reuse``
(``sam_reuse=True``, LookSAM-style); ``start 0.5`` / ``start 0.75`` (``sam_start``: SAM in the last half /
quarter); ``start 0.5 @2+reuse``.

How it is measured. For each (task, seed) all the schedules train their own copy of the same initial weights
(``torch.manual_seed(seed)``) on the same batch order (``seed``), in one process, one thread each, advancing
one optimizer step per turn (``stepcost.timing.Baton``, as ``bench/step_cost.py`` does); a callback times every
step in thread CPU time (``on_step_begin`` to ``on_step_end``). The cost of a schedule is its total step time
over ``none``'s, paired by seed and step, with a 95 % bootstrap interval over blocks of 10 steps. A forward hook
counts the model's forward calls, and a hook on the logits the backward passes through them. At the end: the
accuracy on the 360 clean validation images and the top Hessian eigenvalue of the training loss on 512
training examples (``hf_ssam.sharpness.top_hessian_eigenvalues``). Statistics over seeds use
``recipes/demo.py``'s helpers (t intervals, paired differences).

The verdict: a schedule meets the target on a task when the mean paired gain over ``none`` is at least 80 % of
``ssam``'s and the cost at most 1.3x (point estimates; the table gives the intervals); the VERDICT line lists
those that meet it on every task.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import _common  # noqa: I001  (first: pins the offline, single-threaded environment)
import torch
from frontier.report import KEEP, MAX_COST, plot, summarize, table, verdict_lines
from frontier.runs import run_seed
from frontier.tasks import RHO_SCALINGS, SCHEDULES, TASKS

#: The rho scaling of the ``ρ↑`` schedules, picked by ``--sweep`` (docs/benchmarks.md, "Cost frontier").
DEFAULT_SCALING = "linear"
#: The tasks of the full run: the demo's and the second one (docs/benchmarks.md says why that one).
DEFAULT_TASKS = ("mlp", "mlp40")
SEEDS, SWEEP_SEEDS = [0, 1, 2, 3, 4], [100, 101, 102]
QUICK_STEPS = 20


def _group(job: tuple[str, int, list[str], str, bool, int | None]) -> list[dict[str, Any]]:
    """One (task, seed): every schedule, interleaved (a worker process, or this one)."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    name, seed, schedules, scaling, quick, epochs = job
    task = TASKS[name].quick(QUICK_STEPS) if quick else TASKS[name]
    if epochs is not None and not quick:
        task = replace(task, epochs=epochs)
    started = time.perf_counter()
    rows = run_seed(task, seed, task.data(), schedules, scaling)
    print(
        f"[{name} seed {seed}] {time.perf_counter() - started:.0f} s: "
        + ", ".join(f"{r['schedule']} {100 * r['accuracy']:.1f}" for r in rows),
        flush=True,
    )
    return rows


def run_all(jobs: list[tuple], workers: int, log: Path | None = None) -> list[dict[str, Any]]:
    """Every job's rows, in job order; each finished (task, seed) is appended to ``log`` (JSON lines) as it ends."""

    def keep(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        if log is not None:
            with log.open("a", encoding="utf-8") as fh:
                fh.write(json.dumps(rows) + "\n")
        return rows

    if workers <= 1:
        return [row for job in jobs for row in keep(_group(job))]
    import multiprocessing

    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        return [row for rows in pool.map(_group, jobs) for row in keep(rows)]


RUN_FIELDS = ["task", "schedule", "seed", "steps", "rho", "accuracy", "hessian_top", "forwards_per_step",
              "backwards_per_step", "expected_passes", "cpu_s"]  # fmt: skip


def sweep(args: argparse.Namespace, out: Path) -> None:
    """Sparse SSAM at rho x 1, x sqrt(k), x k on the mlp task, seeds 100-102 (none of the frontier's seeds)."""
    seeds = args.seeds or SWEEP_SEEDS
    base = ["none", "ssam", "ssam@2", "ssam@5"]
    jobs = [(t, s, base, "1", args.quick, args.epochs) for t in args.tasks for s in seeds]
    jobs += [(t, s, ["ssam@2 ρ↑", "ssam@5 ρ↑"], sc, args.quick, args.epochs) for sc in ("sqrt", "linear")
             for t in args.tasks for s in seeds]  # fmt: skip
    started = time.perf_counter()
    rows = run_all(jobs, args.jobs)
    wall = time.perf_counter() - started
    for row in rows:  # name the scaled rows by their scaling
        if "ρ↑" in row["schedule"]:
            k = int(row["schedule"].split("@")[1][0])
            row["schedule"] = row["schedule"].replace("ρ↑", "ρ·√k" if abs(row["rho"] / 0.05 - k) > 1e-9 else "ρ·k")
    summary = summarize(rows)
    lines = [
        f"rho sweep: {len(rows)} runs, seeds {seeds}, {rows[0]['steps']} steps, {wall:.0f} s",
        "",
        "| task | schedule | ρ | accuracy % (mean ± std) | Δ vs none (paired, 95 % CI) | kept of ssam's gain |",
        "|---|---|---|---|---|---|",
    ]
    for s in summary:
        lines.append(f"| {s['task']} | `{s['schedule']}` | {s['rho']:.3g} | {s['acc_mean']:.1f} ± {s['acc_std']:.1f} "
                     f"| {s['gain']:+.1f} ± {s['gain_ci']:.1f} | {100 * s['kept']:.0f} % |")  # fmt: skip
    picks = {}
    for scaling, label in (("1", ""), ("sqrt", " ρ·√k"), ("linear", " ρ·k")):
        kept = [s["kept"] for s in summary if s["schedule"] in (f"ssam@2{label}", f"ssam@5{label}")]
        picks[scaling] = statistics.fmean(kept)
    best = max(picks, key=lambda sc: picks[sc])
    lines.append("")
    lines.append("mean kept fraction of ssam's gain over k = 2 and 5, by rho scaling: "
                 + ", ".join(f"{sc}: {100 * v:.0f} %" for sc, v in picks.items()))  # fmt: skip
    lines.append(f"SWEEP PICKS: rho scaling '{best}' (the largest mean kept fraction)")
    _common.write_csv(out / "frontier_sweep.csv", rows, RUN_FIELDS)
    (out / "frontier_sweep.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    _common.print_lines(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", nargs="+", choices=list(TASKS), default=None,
                        help=f"default: {' '.join(DEFAULT_TASKS)} (quick: mlp)")  # fmt: skip
    parser.add_argument("--schedules", nargs="+", choices=list(SCHEDULES), default=list(SCHEDULES))
    parser.add_argument("--seeds", nargs="+", type=int, default=None, help=f"default {SEEDS} (quick: 0 1)")
    parser.add_argument("--rho_scaling", choices=list(RHO_SCALINGS), default=DEFAULT_SCALING,
                        help="rho of the ρ↑ schedules: x 1, x sqrt(interval), x interval")  # fmt: skip
    parser.add_argument("--sweep", action="store_true", help="compare the rho scalings (mlp, seeds 100-102)")
    parser.add_argument("--epochs", type=int, default=None, help="epochs per run (default 20: 900 steps)")
    parser.add_argument("--from_runs", type=Path, default=None,
                        help="summarize an earlier run's frontier_runs.jsonl (its finished seeds)")  # fmt: skip
    parser.add_argument("--quick", action="store_true", help=f"2 seeds, {QUICK_STEPS} steps: a smoke run")
    parser.add_argument("--jobs", type=int, default=None, help="worker processes, one (task, seed) each "
                        "(default 2; quick: 1, in this process)")  # fmt: skip
    parser.add_argument("--out", type=Path, default=_common.default_out("frontier"))
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    args.jobs = args.jobs or (1 if args.quick else 2)
    if args.sweep:
        args.tasks = args.tasks or ["mlp"]
        sweep(args, args.out)
        return 0
    args.tasks = args.tasks or (["mlp"] if args.quick else list(DEFAULT_TASKS))
    seeds = args.seeds or ([0, 1] if args.quick else SEEDS)
    schedules = list(dict.fromkeys(["none", "ssam", *args.schedules]))
    print(f"environment: {_common.environment()}", flush=True)
    for name in args.tasks:
        print(f"task {name}: {TASKS[name].description}", flush=True)
    started = time.perf_counter()
    if args.from_runs:  # the (task, seed) groups an earlier run finished; the seeds all tasks have
        groups = [json.loads(line) for line in args.from_runs.read_text(encoding="utf-8").splitlines() if line]
        done = [{g[0]["seed"] for g in groups if g[0]["task"] == t} for t in args.tasks]
        seeds = sorted(set.intersection(*done))
        rows = [r for g in groups for r in g if r["seed"] in seeds and r["task"] in args.tasks]
        rows.sort(key=lambda r: (args.tasks.index(r["task"]), r["seed"]))
        wall = math.nan
    else:
        jobs = [(t, s, schedules, args.rho_scaling, args.quick, args.epochs) for s in seeds for t in args.tasks]
        log = args.out / "frontier_runs.jsonl"
        log.unlink(missing_ok=True)
        rows = run_all(jobs, args.jobs, log)
        rows.sort(key=lambda r: (args.tasks.index(r["task"]), r["seed"]))
        wall = time.perf_counter() - started
    summary = summarize(rows)
    steps = rows[0]["steps"]
    header = (
        f"{len(rows)} runs ({len(args.tasks)} tasks x {len(schedules)} schedules x seeds {seeds}), {steps} optimizer "
        f"steps each, rho scaling '{args.rho_scaling}', {args.jobs} worker process(es); "
        + (f"summarized from {args.from_runs}" if args.from_runs else f"wall time {wall:.0f} s")
    )
    text = table(summary)
    verdicts = verdict_lines(summary)
    _common.write_csv(args.out / "frontier_runs.csv", rows, RUN_FIELDS)
    _common.write_csv(args.out / "frontier.csv", summary)
    title = (
        "SSAM schedules on digits with flipped training labels ("
        + ", ".join(f"{t}: {100 * TASKS[t].label_noise:.0f} %" for t in args.tasks)
        + f"), {steps} steps, seeds {seeds}: accuracy (mean ± std) vs "
        f"cost (paired CPU time, 95 % CI); target >= {100 * KEEP:.0f} % of ssam's gain at <= {MAX_COST}x"
    )
    plot(summary, args.out / "frontier.png", title)
    report = "\n".join([header, "", text, "", *verdicts])
    (args.out / "frontier.md").write_text(report + "\n", encoding="utf-8")
    print("\n" + report, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
