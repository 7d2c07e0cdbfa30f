"""Cost of one optimizer step: plain Trainer vs SSAMTrainer (none/sam/usam/asam/ssam) vs hand-written loops.

Commands (from the repository root; every number in ``docs/benchmarks.md`` comes from the first one)::

    .venv/bin/python bench/step_cost.py                    # BERT + ViT, 80 timed steps per configuration
    .venv/bin/python bench/step_cost.py --model bert --steps 60
    .venv/bin/python bench/step_cost.py --model vit --configs amp --steps 30 --no-memory   # the AMP loops only
    .venv/bin/python bench/step_cost.py --quick            # tiny smoke configuration, seconds (used by the tests)
    .venv/bin/python bench/step_cost.py --device cuda --steps 20   # one GPU: CUDA events, + ViT-S/16 (gpu-check)

Outputs (``--out``, default ``outputs/bench/step_cost/``): ``step_cost.csv`` (time per step, one row per
configuration), ``steps.csv`` (every timed step), ``memory.csv`` (peak memory), ``checks.csv`` (the
PASS/FAIL lines) and ``step_cost.png``.

What is measured, per model (a small BERT built from a ``BertConfig`` and a small timm ViT, no download):

* **Time per optimizer step.** Every configuration trains its own copy of the same initial model in this
  one process, each in its own thread; a baton lets exactly one thread run at a time and passes on after
  every optimizer step (the turn order is reshuffled every cycle), so the configurations advance step by
  step, interleaved, and a slow period of a shared machine hits them all alike. Trainer configurations
  are timed by a ``TrainerCallback``: ``on_step_begin`` to ``on_step_end`` covers the Trainer's whole step
  (``training_step`` for both passes, gradient clipping, ``optimizer.step()``, scheduler, ``zero_grad``)
  but not data loading, logging or checkpointing. Hand-written loops are timed around the same work. On
  CPU the clock is the thread's CPU time (``time.thread_time``; torch runs single-threaded here), which
  other processes on a shared machine do not inflate; wall time is reported next to it. With CUDA the
  clock is wall time after a synchronize. The first ``--warmup`` steps are dropped. The table reports
  medians per configuration; the checks use *paired* ratios, the median over cycles of (step of A) /
  (step of B) from the same cycle, with a 95% bootstrap interval. ``ssam@5`` (``sam_interval=5``)
  alternates cheap and expensive steps, so it is compared over whole 5-step cycles. All the threads
  allocate from one glibc malloc arena (``mallopt(M_ARENA_MAX, 1)``), as a one-thread training script
  does; with glibc's default of one arena per thread the configurations' allocations are not alike.
* **Hand-written loops** (``loop:*``): the same model, batches and base optimizer (the Trainer's own
  optimizer class and arguments), the same gradient clipping, with (``loop:plain``) no SAM,
  (``loop:ssam``) the SSAM maths written directly with ``torch._foreach_*`` kernels (perturbation in
  place, gradients dropped between the passes, saved weights restored by copy, RNG replayed), and
  (``loop:SSAMOptimizer``) the package's ``SSAMOptimizer.first_step``/``second_step``.
  ``trainer:ssam / loop:ssam`` is the cost of the Trainer integration on top of the maths.
* **Plain-loop AMP** (``amp:*``, ``--configs amp``): the same three loops under mixed precision — bf16
  autocast on CPU, fp16 autocast + ``GradScaler`` on CUDA — with (``amp:SSAMOptimizer``) the torch idiom
  ``first_step(grad_scaler=scaler)`` … ``scaler.step(optimizer)`` and ``max_grad_norm``. Checked side by side:
  ``amp:SSAMOptimizer / amp:plain`` (SSAMOptimizer loop / plain loop) and ``amp:SSAMOptimizer / amp:ssam``
  (SSAMOptimizer loop / hand-written loop).
* **Bookkeeping alone**: ``hf_ssam.functional`` on the model's real parameters and gradients, in the
  order ``SSAMTrainer`` calls it (norm, scale, save, perturb, zero, restore, norm, γ, rescale), as a
  fraction of the ``trainer:ssam`` step.
* **Peak memory** over plain training, in units of the model's parameter bytes: every configuration runs
  a few steps in a fresh subprocess and reports its resident-set high-water mark (``VmHWM``) less the
  file-backed pages resident at the end (the libraries' code, whose count varies with the page cache;
  with CUDA, ``torch.cuda.max_memory_allocated``). ``tracemalloc`` cannot see torch's CPU allocations. The
  subprocesses run with ``MALLOC_MMAP_THRESHOLD_=131072`` so that glibc returns every freed tensor-sized
  block to the OS: the high-water mark then follows the live tensors, reproducibly, rather than heap
  fragmentation.

PASS/FAIL targets: ssam/plain <= 2.05 (two forward/backward passes make 2.0 the physical limit),
ssam/sam <= 1.02, trainer:ssam/loop:ssam <= 1.05, bookkeeping <= 3% of the step (BERT),
extra peak memory <= 1.1x parameter bytes (no accumulation), ssam@5/plain <= 1.25; plain-loop AMP:
SSAMOptimizer loop / plain loop <= 2.05, SSAMOptimizer loop / hand-written loop <= 1.03.

``--device cuda`` (``bench/stepcost/cuda.py``) times five configurations (plain, sam, ssam, ssam@5 Trainers and
the hand-written SSAM loop) with CUDA events on the small BERT and ViT and a compute-bound ViT-S/16 (batch 256,
bf16), measures ``torch.cuda.max_memory_allocated``, and exits with a message (status 2) where there is no CUDA.

The parts live in ``bench/stepcost/``: ``workloads`` (models), ``timing`` (baton, clock, paired ratios),
``trainer_runs``, ``loop_runs`` and ``amp_loops`` (the configurations), ``bookkeeping``, ``memory`` and
``report`` (checks, summary, plot).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import _common  # noqa: I001  (first: pins the offline, single-threaded environment)
import torch
from stepcost import cuda, timing
from stepcost.bookkeeping import bookkeeping_seconds
from stepcost.configs import ALL_CONFIGS, GA_CONFIGS, GROUPS, make_runner
from stepcost.memory import measure_memory, memory_child
from stepcost.report import amp_summary, checks_for, plot
from stepcost.timing import PRIMARY, Baton, one_malloc_arena, paired_ratio
from stepcost.workloads import WORKLOADS


def reference(config: str, configs: tuple[str, ...]) -> str:
    """What a configuration's ``vs_plain`` is measured against: the plain Trainer, else its group's plain loop."""
    return "trainer:plain" if "trainer:plain" in configs else config.split(":")[0] + ":plain"


def time_model(
    model_name: str,
    quick: bool,
    steps: int,
    warmup: int,
    configs: tuple[str, ...] = ALL_CONFIGS,
    bookkeeping: bool = True,
) -> tuple[list[dict[str, Any]], dict]:
    """Time the configurations on one workload, interleaved step by step; returns the table rows and extras."""
    torch.set_num_threads(1)
    one_malloc_arena()  # the configurations' threads share one allocator arena, as one training thread would
    workload = WORKLOADS[model_name](quick)
    print(f"[{model_name}] {workload.description}", flush=True)
    base = workload.build()
    n_tensors = sum(1 for p in base.parameters() if p.requires_grad)
    n_params = sum(p.numel() for p in base.parameters() if p.requires_grad)
    print(
        f"[{model_name}] {n_tensors} parameter tensors, {n_params / 1e6:.2f}M parameters; "
        f"{warmup} warm-up + {steps} timed steps per configuration",
        flush=True,
    )
    dataset = workload.samples(workload.batch_size * 8)
    started = time.perf_counter()
    book = None
    with tempfile.TemporaryDirectory() as tmp:
        baton = Baton(list(configs))
        # Loops first: a TrainingArguments' device setup resets accelerate's process-wide state, which every
        # Trainer built afterwards re-creates (and the earlier Trainers share).
        build_order = sorted(configs, key=lambda c: c.startswith("trainer:"))
        runners = {
            c: make_runner(c, workload, copy.deepcopy(base), dataset, warmup + steps, tmp, baton) for c in build_order
        }
        threads = [threading.Thread(target=runners[c].run, name=c, daemon=True) for c in configs]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        print(f"[{model_name}] timed in {time.perf_counter() - started:.0f}s", flush=True)
        if bookkeeping and "loop:ssam" in runners:
            batch = runners["loop:ssam"].batches[0]
            book = bookkeeping_seconds(runners["loop:ssam"].model, batch, repeats=5 if quick else 30)
    for c in configs:
        if len(runners[c].times) != warmup + steps:
            raise RuntimeError(f"{c}: {len(runners[c].times)} steps instead of {warmup + steps}")
    times = {c: [t[PRIMARY] for t in runners[c].times[warmup:]] for c in configs}
    walls = {c: [t[0] for t in runners[c].times[warmup:]] for c in configs}
    rows = []
    for config in configs:
        t = sorted(times[config])
        group = 5 if config == "trainer:ssam@5" else 1  # whole sam_interval cycles
        plain = reference(config, configs)
        ratio, low, high = paired_ratio(times[config], times[plain], group)
        rows.append(
            {
                "model": model_name,
                "config": config,
                "median_ms": 1e3 * statistics.median(t),
                "p10_ms": 1e3 * t[len(t) // 10],
                "p90_ms": 1e3 * t[(9 * len(t)) // 10],
                "wall_median_ms": 1e3 * statistics.median(walls[config]),
                "steps": len(t),
                "plain": plain,
                "vs_plain": ratio,
                "vs_plain_ci95": f"[{low:.3f}, {high:.3f}]",
            }
        )
    steps_rows = [
        {"model": model_name, "config": c, "step": i, "cpu_ms": 1e3 * cpu, "wall_ms": 1e3 * wall}
        for c in configs
        for i, (wall, cpu) in enumerate(runners[c].times[warmup:])
    ]

    extra = {"book": book, "times": times, "steps": steps_rows, "n_tensors": n_tensors, "n_params": n_params}
    return rows, extra


def memory_configs(configs: tuple[str, ...], quick: bool) -> list[str]:
    """The configurations whose peak memory is measured: a pair with --quick, else all but ``ssam@5`` (+ GA)."""
    if quick:
        group = configs[0].split(":")[0]
        return (
            ["trainer:plain", "trainer:ssam"] if group == "trainer" else [f"{group}:plain", f"{group}:SSAMOptimizer"]
        )
    chosen = [c for c in configs if c != "trainer:ssam@5"]
    return chosen + (list(GA_CONFIGS) if "trainer:plain" in configs else [])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--model",
        choices=["bert", "vit", "vit_s16", "all"],
        default="all",
        help="all: bert and vit (with --device cuda: bert, vit and vit_s16, a ViT-S/16 at batch 256 in bf16)",
    )
    parser.add_argument(
        "--device",
        choices=["auto", "cuda"],
        default="auto",
        help="auto (default): CUDA if available, else CPU thread time; cuda: one GPU, CUDA-event timing and "
        "max_memory_allocated on plain/sam/ssam/ssam@5 Trainers and the hand-written SSAM loop (exits 2 without "
        "CUDA)",
    )
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help="timed steps per configuration, a multiple of 5 (default 80; 5 with --quick)",
    )
    parser.add_argument("--warmup", type=int, default=5, help="untimed first steps, a multiple of 5 (default 5)")
    parser.add_argument("--quick", action="store_true", help="tiny models, few steps: a smoke test in seconds")
    parser.add_argument(
        "--configs",
        nargs="+",
        choices=list(GROUPS),
        default=list(GROUPS),
        help="which groups of configurations to time (default: all of trainer, loop, amp)",
    )
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--out", type=Path, default=_common.default_out("step_cost"))
    parser.add_argument("--memory-steps", type=int, default=4, help="steps per memory subprocess (default 4)")
    parser.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    steps = args.steps or (5 if args.quick else 80)
    if steps % 5 or args.warmup % 5:
        parser.error("--steps and --warmup must be multiples of 5 (sam_interval=5 is timed over whole cycles)")

    on_cuda = args.device == "cuda"
    if on_cuda and not torch.cuda.is_available():
        print(f"step_cost.py --device cuda: {cuda.NO_CUDA}; nothing measured.", file=sys.stderr, flush=True)
        return 2

    if args.memory_child:
        print(json.dumps(memory_child(args.model, args.memory_child, args.quick, args.memory_steps)), flush=True)
        return 0

    configs = tuple(c for group in GROUPS if group in args.configs for c in GROUPS[group])
    models = ["bert", "vit"] if args.model == "all" else [args.model]
    if args.quick and args.model == "all":
        models = ["bert"]
    if on_cuda:
        timing.use_events()
        configs = cuda.CUDA_CONFIGS
        models = list(cuda.CUDA_MODELS) if args.model == "all" else [args.model]
        for line in cuda.device_lines():
            print(line, flush=True)
    started = time.perf_counter()
    all_rows, all_checks, all_memory, all_steps = [], [], [], []
    for model_name in models:
        rows, extra = time_model(model_name, args.quick, steps, args.warmup, configs, bookkeeping=not on_cuda)
        memory = None
        if not args.no_memory:
            chosen = cuda.CUDA_MEMORY_CONFIGS if on_cuda else memory_configs(configs, args.quick)
            memory = measure_memory(Path(__file__), model_name, chosen, args.quick, args.memory_steps)
            pbytes = memory[0]["param_bytes"]
            ref = {m["config"]: m["peak_bytes"] for m in memory}
            for m in memory:
                kind = m["config"].split(":")[0]
                base_cfg = "trainer:plain+ga2" if m["config"].endswith("+ga2") else f"{kind}:plain"
                m["extra_mib"] = (m["peak_bytes"] - ref.get(base_cfg, m["peak_bytes"])) / 2**20
                m["extra_x_param_bytes"] = (m["peak_bytes"] - ref.get(base_cfg, m["peak_bytes"])) / pbytes
                m["peak_mib"] = m["peak_bytes"] / 2**20
                m["reference"] = base_cfg
            all_memory += memory
        all_rows += rows
        all_steps += extra["steps"]
        if on_cuda:
            all_checks += cuda.cuda_checks(model_name, extra["times"], memory)
        else:
            all_checks += checks_for(model_name, rows, extra, memory)

    env = _common.environment()
    print("\n" + " ".join(f"{k}={v}" for k, v in env.items()))
    if on_cuda:
        print("\n".join(cuda.device_lines()))
    print(
        "\n"
        + _common.format_table(
            all_rows,
            [
                "model",
                "config",
                "median_ms",
                "p10_ms",
                "p90_ms",
                "wall_median_ms",
                "steps",
                "plain",
                "vs_plain",
                "vs_plain_ci95",
            ],
        )
    )
    if all_memory:
        print(
            "\n"
            + _common.format_table(
                all_memory, ["model", "config", "peak_mib", "reference", "extra_mib", "extra_x_param_bytes"]
            )
        )
    print()
    for line in amp_summary(all_checks):
        print(line)
    if any(c.startswith("amp:") for c in configs):
        print()
    for c in all_checks:
        note = f"  ({c['note']})" if c["note"] else ""
        target = f" (target {c['target']})" if c["target"] else ""
        ci = f" 95% CI {c['ci95']}" if c["ci95"] else ""
        print(f"{c['status']} [{c['model']}] {c['check']} = {c['value']:.3f}{ci}{target}{note}")
    out = args.out
    _common.write_csv(out / "step_cost.csv", all_rows)
    _common.write_csv(out / "checks.csv", all_checks)
    _common.write_csv(out / "steps.csv", all_steps)
    if all_memory:
        _common.write_csv(
            out / "memory.csv",
            all_memory,
            ["model", "config", "peak_mib", "reference", "extra_mib", "extra_x_param_bytes", "param_bytes"],
        )
    plot(all_rows, out / "step_cost.png")
    written = ", ".join(sorted(p.name for p in out.iterdir() if p.suffix in (".csv", ".png")))
    print(f"\nwrote {written} to {out} in {time.perf_counter() - started:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
