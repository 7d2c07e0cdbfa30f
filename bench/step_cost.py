"""Cost of one optimizer step: plain Trainer vs SSAMTrainer (none/sam/usam/asam/ssam) vs hand-written loops.

Commands (from the repository root; every number in ``docs/benchmarks.md`` comes from the first one)::

    .venv/bin/python bench/step_cost.py                    # BERT + ViT, 80 timed steps per configuration
    .venv/bin/python bench/step_cost.py --model bert --steps 60
    .venv/bin/python bench/step_cost.py --quick            # tiny smoke configuration, seconds (used by the tests)

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
  alternates cheap and expensive steps, so it is compared over whole 5-step cycles.
* **Hand-written loops** (``loop:*``): the same model, batches and base optimizer (the Trainer's own
  optimizer class and arguments), the same gradient clipping, with (``loop:plain``) no SAM,
  (``loop:ssam``) the SSAM maths written directly with ``torch._foreach_*`` kernels (perturbation in
  place, gradients dropped between the passes, saved weights restored by copy, RNG replayed), and
  (``loop:SSAMOptimizer``) the package's ``SSAMOptimizer.first_step``/``second_step``.
  ``trainer:ssam / loop:ssam`` is the cost of the Trainer integration on top of the maths.
* **Bookkeeping alone**: ``hf_ssam.functional`` on the model's real parameters and gradients, in the
  order ``SSAMTrainer`` calls it (norm, scale, save, perturb, zero, restore, norm, γ, rescale), as a
  fraction of the ``trainer:ssam`` step.
* **Peak memory** over plain training, in units of the model's parameter bytes: every configuration runs
  a few steps in a fresh subprocess and reports its resident-set high-water mark (``VmHWM``; with CUDA,
  ``torch.cuda.max_memory_allocated``). ``tracemalloc`` cannot see torch's CPU allocations. The
  subprocesses run with ``MALLOC_MMAP_THRESHOLD_=131072`` so that glibc returns every freed tensor-sized
  block to the OS: the high-water mark then follows the live tensors, reproducibly, rather than heap
  fragmentation.

PASS/FAIL targets: ssam/plain <= 2.05 (two forward/backward passes make 2.0 the physical limit),
ssam/sam <= 1.02, trainer:ssam/loop:ssam <= 1.05, bookkeeping <= 3% of the step (BERT),
extra peak memory <= 1.1x parameter bytes (no accumulation), ssam@5/plain <= 1.25.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import _common  # noqa: I001  (first: pins the offline, single-threaded environment)
import torch
from torch import nn

# The configurations, in table order. `trainer:*` run through transformers.Trainer / SSAMTrainer.
TRAINER_CONFIGS: dict[str, dict[str, Any]] = {
    "trainer:plain": {},
    "trainer:none": {"sam_variant": "none"},
    "trainer:sam": {"sam_variant": "sam"},
    "trainer:usam": {"sam_variant": "usam"},
    "trainer:asam": {"sam_variant": "asam"},
    "trainer:ssam": {"sam_variant": "ssam"},
    "trainer:ssam@5": {"sam_variant": "ssam", "sam_interval": 5},
}
LOOP_CONFIGS: tuple[str, ...] = ("loop:plain", "loop:ssam", "loop:SSAMOptimizer")
ALL_CONFIGS: tuple[str, ...] = (*TRAINER_CONFIGS, *LOOP_CONFIGS)
# Memory-only configurations (gradient accumulation over 2 micro-batches), reported for information.
GA_CONFIGS: dict[str, dict[str, Any]] = {
    "trainer:plain+ga2": {"gradient_accumulation_steps": 2},
    "trainer:ssam+ga2": {"sam_variant": "ssam", "gradient_accumulation_steps": 2},
}
RHO = 0.05
LR = 1e-4
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


# ------------------------------------------------------------------------------------------------- models


class ImageClassifier(nn.Module):
    """A timm backbone with the Trainer's calling convention: ``forward(pixel_values, labels) -> {loss, logits}``."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        logits = self.backbone(pixel_values)
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = nn.functional.cross_entropy(logits, labels)
        return out


@dataclass
class Workload:
    """A model built from a config, a synthetic dataset and a batch size."""

    name: str
    build: Callable[[], nn.Module]
    samples: Callable[[int], list[dict[str, torch.Tensor]]]
    batch_size: int
    description: str


def bert_workload(quick: bool) -> Workload:
    from transformers import BertConfig, BertForSequenceClassification

    if quick:
        cfg = BertConfig(
            vocab_size=128,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=16,
            num_labels=2,
        )
        seq, batch = 16, 4
    else:
        cfg = BertConfig(
            vocab_size=4096,
            hidden_size=192,
            num_hidden_layers=6,
            num_attention_heads=4,
            intermediate_size=768,
            max_position_embeddings=64,
            num_labels=2,
        )
        seq, batch = 64, 16

    def samples(n: int) -> list[dict[str, torch.Tensor]]:
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, cfg.vocab_size, (n, seq), generator=g)
        labels = torch.randint(0, 2, (n,), generator=g)
        mask = torch.ones(seq, dtype=torch.long)
        return [{"input_ids": ids[i], "attention_mask": mask, "labels": labels[i]} for i in range(n)]

    def build() -> nn.Module:
        torch.manual_seed(0)
        return BertForSequenceClassification(cfg)

    desc = (
        f"BertForSequenceClassification hidden={cfg.hidden_size} layers={cfg.num_hidden_layers} "
        f"vocab={cfg.vocab_size}, batch {batch} x seq {seq}"
    )
    return Workload("bert", build, samples, batch, desc)


def vit_workload(quick: bool) -> Workload:
    from timm.models.vision_transformer import VisionTransformer

    if quick:
        kw = dict(img_size=16, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=10)
        batch = 4
    else:
        kw = dict(img_size=32, patch_size=4, embed_dim=192, depth=6, num_heads=3, num_classes=10)
        batch = 16

    def samples(n: int) -> list[dict[str, torch.Tensor]]:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(n, 3, kw["img_size"], kw["img_size"], generator=g)
        labels = torch.randint(0, 10, (n,), generator=g)
        return [{"pixel_values": x[i], "labels": labels[i]} for i in range(n)]

    def build() -> nn.Module:
        torch.manual_seed(0)
        return ImageClassifier(VisionTransformer(**kw))

    desc = (
        f"timm VisionTransformer embed={kw['embed_dim']} depth={kw['depth']} "
        f"img={kw['img_size']} patch={kw['patch_size']}, batch {batch}"
    )
    return Workload("vit", build, samples, batch, desc)


WORKLOADS: dict[str, Callable[[bool], Workload]] = {"bert": bert_workload, "vit": vit_workload}


# ------------------------------------------------------------------------------------------------ runners


def make_args(config: str, workload: Workload, max_steps: int, output_dir: str, extra: dict[str, Any]) -> Any:
    from transformers import TrainingArguments

    from hf_ssam import SSAMTrainingArguments

    common = dict(
        output_dir=output_dir,
        per_device_train_batch_size=workload.batch_size,
        max_steps=max_steps,
        learning_rate=LR,
        lr_scheduler_type="constant",
        logging_strategy="no",
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        use_cpu=DEVICE.type == "cpu",
        dataloader_num_workers=0,
        seed=0,
    )
    sam = dict(extra)
    common["gradient_accumulation_steps"] = sam.pop("gradient_accumulation_steps", 1)
    if config.startswith("trainer:plain"):
        return TrainingArguments(**common)
    return SSAMTrainingArguments(**common, sam_rho=RHO, **sam)


class Baton:
    """Round-robin turns between threads: exactly one configuration runs at a time, one step per turn.

    Every configuration trains in its own thread; a thread runs one optimizer step when it holds the baton
    and hands it on at the end of the step, so all the configurations advance step by step, interleaved,
    and a slow period of a shared machine hits them all alike. The turn order is reshuffled every cycle.
    """

    def __init__(self, names: list[str], seed: int = 0) -> None:
        import random

        self._cond = threading.Condition()
        self._order = list(names)
        self._pos = 0
        self._done: set[str] = set()
        self._rng = random.Random(seed)

    def wait(self, name: str) -> None:
        with self._cond:
            self._cond.wait_for(lambda: self._order[self._pos] == name)

    def _advance(self) -> None:
        if len(self._done) == len(self._order):
            return
        while True:
            self._pos += 1
            if self._pos == len(self._order):
                self._pos = 0
                self._rng.shuffle(self._order)
            if self._order[self._pos] not in self._done:
                return

    def pass_on(self, name: str) -> None:
        with self._cond:
            if self._order[self._pos] == name:
                self._advance()
            self._cond.notify_all()

    def finish(self, name: str) -> None:
        with self._cond:
            self._done.add(name)
            if self._order[self._pos] == name:
                self._advance()
            self._cond.notify_all()


def _sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


#: Which clock the ratios use: on CPU the thread's CPU time (``time.thread_time``: a shared machine's other
#: processes do not count, the work done in this thread does, and torch runs single-threaded here), on CUDA
#: wall time (kernels run asynchronously; every step ends with a synchronize).
PRIMARY = 1 if DEVICE.type == "cpu" else 0


def clock() -> tuple[float, float]:
    """(wall, this thread's CPU time) now."""
    return time.perf_counter(), time.thread_time()


def elapsed(start: tuple[float, float]) -> tuple[float, float]:
    """(wall, CPU) seconds since ``start``."""
    wall, cpu = clock()
    return wall - start[0], cpu - start[1]


class TrainerRunner:
    """One Trainer configuration, timed by a callback from ``on_step_begin`` to ``on_step_end``."""

    def __init__(
        self,
        config: str,
        workload: Workload,
        model: nn.Module,
        dataset: list,
        steps: int,
        tmp: str,
        baton: Baton | None = None,
    ):
        from transformers import PrinterCallback, Trainer, TrainerCallback

        from hf_ssam import SSAMTrainer

        self.config, self.baton = config, baton
        self.times: list[tuple[float, float]] = []  # (wall, CPU) seconds per optimizer step
        runner = self

        class StepTimer(TrainerCallback):
            def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
                _sync()
                runner._start = clock()

            def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
                _sync()
                runner.times.append(elapsed(runner._start))
                if runner.baton is not None:  # hand over; resume (data loading first) on the next turn
                    runner.baton.pass_on(runner.config)
                    runner.baton.wait(runner.config)

        extra = TRAINER_CONFIGS.get(config, GA_CONFIGS.get(config, {}))
        args = make_args(config, workload, steps, os.path.join(tmp, config.replace(":", "_")), extra)
        cls = Trainer if config.startswith("trainer:plain") else SSAMTrainer
        self.trainer = cls(model=model, args=args, train_dataset=dataset, callbacks=[StepTimer()])
        self.trainer.remove_callback(PrinterCallback)
        self._start = (0.0, 0.0)

    def run(self) -> None:
        """Train ``steps`` optimizer steps (taking turns if there is a baton)."""
        if self.baton is not None:
            self.baton.wait(self.config)
        try:
            self.trainer.train()
        finally:
            if self.baton is not None:
                self.baton.finish(self.config)


def base_optimizer(tmp: str, workload: Workload) -> tuple[type, dict[str, Any]]:
    """The Trainer's default optimizer class and keyword arguments (for the hand-written loops)."""
    from transformers import Trainer

    args = make_args("trainer:plain", workload, 1, os.path.join(tmp, "opt"), {})
    cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args)
    return cls, dict(kwargs)


class LoopRunner:
    """A hand-written training loop on the same model, batches and base optimizer as the Trainer's."""

    def __init__(
        self,
        config: str,
        workload: Workload,
        model: nn.Module,
        dataset: list,
        steps: int,
        tmp: str,
        baton: Baton | None = None,
    ):
        from transformers import default_data_collator

        from hf_ssam import SSAMOptimizer

        self.config, self.model, self.steps, self.baton = config, model.to(DEVICE), steps, baton
        self.params = [p for p in model.parameters() if p.requires_grad]
        cls, kwargs = base_optimizer(tmp, workload)
        if config == "loop:SSAMOptimizer":
            self.opt: torch.optim.Optimizer = SSAMOptimizer(self.params, cls, variant="ssam", rho=RHO, **kwargs)
        else:
            self.opt = cls(self.params, **kwargs)
        b = workload.batch_size
        self.batches = [
            {k: v.to(DEVICE) for k, v in default_data_collator(dataset[i : i + b]).items()}
            for i in range(0, len(dataset) - b + 1, b)
        ]
        self.backup = [torch.empty_like(p) for p in self.params]
        self.times: list[tuple[float, float]] = []
        self.step = {
            "loop:plain": self.step_plain,
            "loop:ssam": self.step_ssam,
            "loop:SSAMOptimizer": self.step_ssam_optimizer,
        }[config]

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.model(**batch)["loss"]

    def step_plain(self, batch: dict[str, torch.Tensor]) -> None:
        self.loss(batch).backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def step_ssam(self, batch: dict[str, torch.Tensor]) -> None:
        """SSAM written out: g, w+ρg (in place, weights saved), g_asc with the same RNG, restore, γ·g_asc.

        The first gradients are dropped before the second pass (``p.grad = None``): the second backward
        then writes fresh gradients instead of accumulating into zeroed buffers, and no gradient buffer
        is alive during the second forward.
        """
        rng = torch.get_rng_state()
        self.loss(batch).backward()  # g
        params = self.params
        with torch.no_grad():
            grads = [p.grad for p in params]
            gnorm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
            perturb = bool(torch.isfinite(gnorm) & (gnorm > 0))
            if perturb:
                torch._foreach_copy_(self.backup, params)
                torch._foreach_mul_(grads, RHO)  # e = ρ·g, in the gradient buffers (dropped next)
                torch._foreach_add_(params, grads)  # w + e
            del grads
            for p in params:
                p.grad = None
        torch.set_rng_state(rng)
        self.loss(batch).backward()  # g_asc
        with torch.no_grad():
            if perturb:
                torch._foreach_copy_(params, self.backup)
            grads = [p.grad for p in params]
            anorm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
            ok = torch.isfinite(anorm) & (anorm > 0) & (gnorm > 0)
            torch._foreach_mul_(grads, torch.where(ok, gnorm / torch.where(ok, anorm, 1.0), 1.0))
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def step_ssam_optimizer(self, batch: dict[str, torch.Tensor]) -> None:
        from hf_ssam import RNGState

        opt = self.opt
        rng = RNGState.capture()
        self.loss(batch).backward()
        opt.first_step(zero_grad=True)  # type: ignore[attr-defined]
        rng.restore()
        self.loss(batch).backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        opt.second_step(zero_grad=True)  # type: ignore[attr-defined]

    def run(self) -> None:
        """Train ``steps`` steps (taking turns if there is a baton)."""
        self.model.train()
        try:
            for i in range(self.steps):
                batch = self.batches[i % len(self.batches)]
                if self.baton is not None:
                    self.baton.wait(self.config)
                _sync()
                start = clock()
                self.step(batch)
                _sync()
                self.times.append(elapsed(start))
                if self.baton is not None:
                    self.baton.pass_on(self.config)
        finally:
            if self.baton is not None:
                self.baton.finish(self.config)


def make_runner(
    config: str, workload: Workload, model: nn.Module, dataset: list, steps: int, tmp: str, baton: Baton | None = None
) -> Any:
    cls = LoopRunner if config.startswith("loop:") else TrainerRunner
    return cls(config, workload, model, dataset, steps, tmp, baton)


# ------------------------------------------------------------------------------------------- bookkeeping


def bookkeeping_seconds(model: nn.Module, batch: dict[str, torch.Tensor], repeats: int) -> dict[str, float]:
    """Median time of the SSAM bookkeeping on the model's real parameters and gradients.

    ``functional``: the ``hf_ssam.functional`` calls in SSAMTrainer's order (plus its one host sync and the
    gradient zeroing between the passes). ``inplace``: the same maths as ``loop:ssam`` writes it (perturbation
    in the gradient buffers, gradients dropped rather than zeroed) — the floor for this memory traffic.
    """
    from hf_ssam import functional as F

    model.train()
    model.zero_grad(set_to_none=True)
    model(**batch)["loss"].backward()
    params = [p for p in model.parameters() if p.grad is not None]
    grads = [p.grad for p in params]
    backup = [torch.empty_like(p) for p in params]

    @torch.no_grad()
    def functional() -> None:
        grad_norm = F.global_norm(grads)
        scale = F.perturbation_scale("ssam", RHO, grad_norm, params=params, grads=grads)
        bool(torch.isfinite(scale) & (grad_norm > 0) & torch.isfinite(grad_norm))
        torch._foreach_copy_(backup, params)
        F.ascend(params, grads, scale, variant="ssam", overwrite_grads=True)  # as SSAMTrainer calls it
        torch._foreach_zero_(grads)
        F.restore_(params, backup)
        ascent_norm = F.global_norm(grads)
        gamma, _ = F.renormalization_factor(grad_norm, ascent_norm)
        F.rescale_(grads, gamma)

    saved = [g.clone() for g in grads]

    @torch.no_grad()
    def inplace() -> None:
        gnorm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
        bool(torch.isfinite(gnorm) & (gnorm > 0))
        torch._foreach_copy_(backup, params)
        torch._foreach_mul_(grads, RHO)
        torch._foreach_add_(params, grads)
        torch._foreach_copy_(params, backup)
        anorm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
        ok = torch.isfinite(anorm) & (anorm > 0)
        torch._foreach_mul_(grads, torch.where(ok, gnorm / torch.where(ok, anorm, 1.0), 1.0))

    out = {}
    for name, fn in (("functional", functional), ("inplace", inplace)):
        times = []
        for _ in range(repeats + 2):
            torch._foreach_copy_(grads, saved)  # real gradients every time (the zeroing wiped them)
            _sync()
            start = clock()
            fn()
            _sync()
            times.append(elapsed(start)[PRIMARY])
        out[name] = statistics.median(times[2:])
    out["n_tensors"] = float(len(params))
    out["n_params"] = float(sum(p.numel() for p in params))
    return out


# ------------------------------------------------------------------------------------------------ memory


def peak_memory_bytes() -> int:
    """Resident-set high-water mark of this process (``VmHWM``), or the CUDA allocator's peak."""
    if DEVICE.type == "cuda":
        return int(torch.cuda.max_memory_allocated())
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def memory_child(model_name: str, config: str, quick: bool, steps: int) -> dict[str, Any]:
    """Run ``steps`` steps of one configuration in this (fresh) process and report its peak memory."""
    torch.set_num_threads(1)
    workload = WORKLOADS[model_name](quick)
    model = workload.build().to(DEVICE)
    dataset = workload.samples(workload.batch_size * 4)
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    with tempfile.TemporaryDirectory() as tmp:
        make_runner(config, workload, model, dataset, steps, tmp).run()
    return {"model": model_name, "config": config, "peak_bytes": peak_memory_bytes(), "param_bytes": param_bytes}


def measure_memory(model_name: str, configs: list[str], quick: bool, steps: int, jobs: int = 2) -> list[dict]:
    """One fresh subprocess per configuration (``jobs`` at a time: each has its own high-water mark)."""

    def command(config: str) -> list[str]:
        cmd = [sys.executable, __file__, "--memory-child", config, "--model", model_name, "--memory-steps", str(steps)]
        return cmd + (["--quick"] if quick else [])

    # glibc keeps freed heap blocks and only returns mmap-ed ones; with a fixed 128 KiB mmap threshold every
    # tensor-sized block goes back to the OS when freed, so the high-water mark follows the live tensors
    # (reproducible to ~0.1 MiB) instead of the heap's fragmentation (tens of MiB of run-to-run noise).
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(128 * 1024))
    results: dict[str, dict[str, Any]] = {}
    pending = list(configs)
    running: list[tuple[str, subprocess.Popen]] = []
    while pending or running:
        while pending and len(running) < jobs:
            config = pending.pop(0)
            running.append(
                (
                    config,
                    subprocess.Popen(
                        command(config), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
                    ),
                )
            )
        config, proc = running.pop(0)
        stdout, stderr = proc.communicate()
        lines = [line for line in stdout.splitlines() if line.startswith("{")]
        if proc.returncode != 0 or not lines:
            raise RuntimeError(f"memory child {config} failed:\n{stdout}\n{stderr}")
        results[config] = json.loads(lines[-1])
        print(f"  memory {model_name} {config}: peak {results[config]['peak_bytes'] / 2**20:.1f} MiB", flush=True)
    return [results[c] for c in configs]


# --------------------------------------------------------------------------------------------------- main


def time_model(model_name: str, quick: bool, steps: int, warmup: int) -> tuple[list[dict[str, Any]], dict]:
    """Time every configuration on one workload, interleaved step by step; returns the table rows and extras."""
    torch.set_num_threads(1)
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
    with tempfile.TemporaryDirectory() as tmp:
        baton = Baton(list(ALL_CONFIGS))
        # Loops first: a TrainingArguments' device setup resets accelerate's process-wide state, which every
        # Trainer built afterwards re-creates (and the earlier Trainers share).
        build_order = [*LOOP_CONFIGS, *TRAINER_CONFIGS]
        runners = {
            c: make_runner(c, workload, copy.deepcopy(base), dataset, warmup + steps, tmp, baton) for c in build_order
        }
        threads = [threading.Thread(target=runners[c].run, name=c, daemon=True) for c in ALL_CONFIGS]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        print(f"[{model_name}] timed in {time.perf_counter() - started:.0f}s", flush=True)
        batch = runners["loop:ssam"].batches[0]
        book = bookkeeping_seconds(runners["loop:ssam"].model, batch, repeats=5 if quick else 30)
    for c in ALL_CONFIGS:
        if len(runners[c].times) != warmup + steps:
            raise RuntimeError(f"{c}: {len(runners[c].times)} steps instead of {warmup + steps}")
    times = {c: [t[PRIMARY] for t in runners[c].times[warmup:]] for c in ALL_CONFIGS}
    walls = {c: [t[0] for t in runners[c].times[warmup:]] for c in ALL_CONFIGS}
    rows = []
    for config in ALL_CONFIGS:
        t = sorted(times[config])
        group = 5 if config == "trainer:ssam@5" else 1  # whole sam_interval cycles
        ratio, low, high = paired_ratio(times[config], times["trainer:plain"], group)
        rows.append(
            {
                "model": model_name,
                "config": config,
                "median_ms": 1e3 * statistics.median(t),
                "p10_ms": 1e3 * t[len(t) // 10],
                "p90_ms": 1e3 * t[(9 * len(t)) // 10],
                "wall_median_ms": 1e3 * statistics.median(walls[config]),
                "steps": len(t),
                "vs_plain": ratio,
                "vs_plain_ci95": f"[{low:.3f}, {high:.3f}]",
            }
        )
    steps_rows = [
        {"model": model_name, "config": c, "step": i, "cpu_ms": 1e3 * cpu, "wall_ms": 1e3 * wall}
        for c in ALL_CONFIGS
        for i, (wall, cpu) in enumerate(runners[c].times[warmup:])
    ]

    extra = {"book": book, "times": times, "steps": steps_rows, "n_tensors": n_tensors, "n_params": n_params}
    return rows, extra


def paired_ratio(a: list[float], b: list[float], group: int = 1, resamples: int = 2000) -> tuple[float, float, float]:
    """Median over cycles of ``sum(a) / sum(b)`` for the same cycle, with a 95% bootstrap interval.

    The configurations advance in lockstep (one step each per cycle), so pairing a's i-th step with b's
    i-th step cancels the machine's drift; ``group`` sums that many consecutive steps first (5 for
    ``sam_interval=5``: one whole interval).
    """
    import random

    ratios = [sum(a[i : i + group]) / sum(b[i : i + group]) for i in range(0, len(a) - group + 1, group)]
    rng = random.Random(0)
    boot = sorted(statistics.median(rng.choices(ratios, k=len(ratios))) for _ in range(resamples))
    return statistics.median(ratios), boot[int(0.025 * resamples)], boot[int(0.975 * resamples) - 1]


def checks_for(model_name: str, rows: list[dict[str, Any]], extra: dict, memory: list[dict[str, Any]] | None):
    """The PASS/FAIL lines (target applies) and INFO lines (reported only)."""
    med = {r["config"]: r["median_ms"] for r in rows}
    times = extra["times"]
    book = extra["book"]
    out = []

    def add(name: str, value: float, target: float | None, note: str = "", ci: tuple[float, float] | None = None):
        status = "INFO" if target is None else ("PASS" if value <= target else "FAIL")
        out.append(
            {
                "model": model_name,
                "check": name,
                "value": value,
                "ci95": "" if ci is None else f"[{ci[0]:.3f}, {ci[1]:.3f}]",
                "target": "" if target is None else f"<= {target:g}",
                "status": status,
                "note": note,
            }
        )

    def ratio(a: str, b: str, target: float | None, note: str = "", group: int = 1) -> None:
        value, low, high = paired_ratio(times[a], times[b], group)
        add(f"{a} / {b}", value, target, note, (low, high))

    ratio("trainer:ssam", "trainer:plain", 2.05, "two passes: 2.0 is the physical limit")
    ratio("trainer:ssam", "trainer:sam", 1.02)
    ratio("trainer:ssam", "loop:ssam", 1.05, "Trainer integration over hand-written SSAM maths")
    ratio("loop:ssam", "loop:plain", None, "the two-pass cost without the Trainer")
    ratio("trainer:plain", "loop:plain", None, "the Trainer's own overhead, no SAM")
    ratio("loop:SSAMOptimizer", "loop:ssam", None)
    ratio("trainer:none", "trainer:plain", None, "identical work: shows the noise")
    ratio("trainer:usam", "trainer:plain", None)
    ratio("trainer:asam", "trainer:plain", None)
    add(
        "bookkeeping (hf_ssam.functional) / trainer:ssam step",
        book["functional"] / (med["trainer:ssam"] / 1e3),
        0.03 if model_name == "bert" else None,
        f"{1e3 * book['functional']:.2f} ms for {int(book['n_tensors'])} tensors",
    )
    add(
        "bookkeeping (in place, loop:ssam) / trainer:ssam step",
        book["inplace"] / (med["trainer:ssam"] / 1e3),
        None,
        f"{1e3 * book['inplace']:.2f} ms",
    )
    ratio("trainer:ssam@5", "trainer:plain", 1.25, "whole 5-step cycles (one two-pass step in five)", group=5)
    if memory:
        peak = {m["config"]: m["peak_bytes"] for m in memory}
        pbytes = memory[0]["param_bytes"]

        def extra_mem(config: str, ref: str) -> float:
            return (peak[config] - peak[ref]) / pbytes

        add(
            "extra peak memory trainer:ssam vs trainer:plain (x param bytes)",
            extra_mem("trainer:ssam", "trainer:plain"),
            1.1,
            f"param bytes {pbytes / 2**20:.1f} MiB",
        )
        for config, ref in (
            ("trainer:sam", "trainer:plain"),
            ("trainer:usam", "trainer:plain"),
            ("trainer:asam", "trainer:plain"),
            ("trainer:none", "trainer:plain"),
            ("loop:ssam", "loop:plain"),
            ("loop:SSAMOptimizer", "loop:plain"),
            ("trainer:ssam+ga2", "trainer:plain+ga2"),
        ):
            if config in peak and ref in peak:
                add(f"extra peak memory {config} vs {ref} (x param bytes)", extra_mem(config, ref), None)
    return out


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, len(models), figsize=(4.2 * len(models) + 1.2, 3.6), squeeze=False, sharey=True)
    for ax, model_name in zip(axes[0], models):
        sub = [r for r in rows if r["model"] == model_name]
        names = [r["config"] for r in sub]
        values = [r["vs_plain"] for r in sub]
        bounds = [[float(x) for x in r["vs_plain_ci95"].strip("[]").split(",")] for r in sub]
        err = [
            [max(0.0, v - lo) for v, (lo, _) in zip(values, bounds)],
            [max(0.0, hi - v) for v, (_, hi) in zip(values, bounds)],
        ]
        colors = ["tab:gray" if n.endswith(("plain", "none")) else "tab:blue" for n in names]
        ax.barh(names, values, xerr=err, color=colors, ecolor="k", capsize=2)
        ax.axvline(2.0, color="tab:red", lw=1, ls="--", label="2x (two passes)")
        ax.set_xlabel("step time / trainer:plain (paired, 95% CI)")
        ax.set_title(model_name)
        ax.legend(loc="lower right", fontsize=8)
    axes[0][0].invert_yaxis()
    _common.savefig(fig, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=["bert", "vit", "all"], default="all")
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help="timed steps per configuration, a multiple of 5 (default 80; 5 with --quick)",
    )
    parser.add_argument("--warmup", type=int, default=5, help="untimed first steps, a multiple of 5 (default 5)")
    parser.add_argument("--quick", action="store_true", help="tiny models, few steps: a smoke test in seconds")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--out", type=Path, default=_common.default_out("step_cost"))
    parser.add_argument("--memory-steps", type=int, default=4, help="steps per memory subprocess (default 4)")
    parser.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    steps = args.steps or (5 if args.quick else 80)
    if steps % 5 or args.warmup % 5:
        parser.error("--steps and --warmup must be multiples of 5 (sam_interval=5 is timed over whole cycles)")

    if args.memory_child:
        print(json.dumps(memory_child(args.model, args.memory_child, args.quick, args.memory_steps)), flush=True)
        return 0

    models = ["bert", "vit"] if args.model == "all" else [args.model]
    if args.quick and args.model == "all":
        models = ["bert"]
    started = time.perf_counter()
    all_rows, all_checks, all_memory, all_steps = [], [], [], []
    for model_name in models:
        rows, extra = time_model(model_name, args.quick, steps, args.warmup)
        memory = None
        if not args.no_memory:
            configs = (
                ["trainer:plain", "trainer:ssam"]
                if args.quick
                else [*TRAINER_CONFIGS.keys() - {"trainer:ssam@5"}, *LOOP_CONFIGS, *GA_CONFIGS]
            )
            configs = sorted(configs, key=lambda c: (list(ALL_CONFIGS) + list(GA_CONFIGS)).index(c))
            memory = measure_memory(model_name, configs, args.quick, args.memory_steps)
            pbytes = memory[0]["param_bytes"]
            ref = {m["config"]: m["peak_bytes"] for m in memory}
            for m in memory:
                base_cfg = (
                    "trainer:plain+ga2"
                    if m["config"].endswith("+ga2")
                    else ("loop:plain" if m["config"].startswith("loop:") else "trainer:plain")
                )
                m["extra_mib"] = (m["peak_bytes"] - ref.get(base_cfg, m["peak_bytes"])) / 2**20
                m["extra_x_param_bytes"] = (m["peak_bytes"] - ref.get(base_cfg, m["peak_bytes"])) / pbytes
                m["peak_mib"] = m["peak_bytes"] / 2**20
                m["reference"] = base_cfg
            all_memory += memory
        all_rows += rows
        all_steps += extra["steps"]
        all_checks += checks_for(model_name, rows, extra, memory)

    env = _common.environment()
    print("\n" + " ".join(f"{k}={v}" for k, v in env.items()))
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
