"""Training through ``SSAMTrainer``: every schedule of one (task, seed) on its own copy of the same initial model,
interleaved step by step (one thread each, a baton between them), each optimizer step timed in thread CPU time,
forward and backward passes counted; then the clean validation accuracy and the top Hessian eigenvalue."""

from __future__ import annotations

import copy
import tempfile
import threading
import time
from typing import Any

import torch
from stepcost.timing import Baton, clock, elapsed, one_malloc_arena
from torch import nn

from hf_ssam import SSAMTrainer, SSAMTrainingArguments
from hf_ssam.sharpness import top_hessian_eigenvalues

from .tasks import SCHEDULES, Task, expected_passes, schedule_settings

__all__ = ["PassCounter", "run_seed"]


class PassCounter:
    """Counts the model's forward calls and the backward passes through its logits while ``active``."""

    def __init__(self, model: nn.Module) -> None:
        self.forwards = self.backwards = 0
        self.active = True
        self._handle = model.register_forward_hook(self._forward)

    def _forward(self, module: nn.Module, args: Any, output: Any) -> None:
        if not self.active:
            return
        self.forwards += 1
        logits = output["logits"] if isinstance(output, dict) else output
        if isinstance(logits, torch.Tensor) and logits.requires_grad:
            logits.register_hook(self._backward)

    def _backward(self, grad: torch.Tensor) -> None:
        self.backwards += 1

    def remove(self) -> None:
        self._handle.remove()


class _Run:
    """One schedule's Trainer, its step timer (a callback, as in bench/stepcost/trainer_runs.py) and pass counter."""

    def __init__(self, name: str, settings: dict[str, Any], task: Task, model: nn.Module, data: dict, seed: int,
                 steps: int, tmp: str, baton: Baton) -> None:  # fmt: skip
        from transformers import PrinterCallback, ProgressCallback, TrainerCallback

        from recipes.demo import Examples

        self.name, self.settings, self.model, self.baton = name, settings, model, baton
        self.times: list[float] = []  # thread CPU seconds per optimizer step
        self.counter = PassCounter(model)
        run = self

        class StepTimer(TrainerCallback):
            def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
                run._start = clock()

            def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
                run.times.append(elapsed(run._start)[1])
                run.baton.pass_on(run.name)  # hand over; resume (data loading first) on the next turn
                run.baton.wait(run.name)

        args = SSAMTrainingArguments(
            output_dir=f"{tmp}/{len(name)}_{abs(hash(name))}",
            learning_rate=task.lr,
            lr_scheduler_type="constant",
            max_steps=steps,
            per_device_train_batch_size=task.batch_size,
            logging_strategy="no",
            eval_strategy="no",
            save_strategy="no",
            report_to="none",
            use_cpu=True,
            seed=seed,
            disable_tqdm=True,
            dataloader_num_workers=0,
            **settings,
        )
        optimizer = torch.optim.SGD(model.parameters(), lr=task.lr, momentum=0.9)
        self.trainer = SSAMTrainer(
            model=model, args=args, train_dataset=Examples(data["train_x"], data["train_y"]),
            optimizers=(optimizer, None), callbacks=[StepTimer()],
        )  # fmt: skip
        for quiet in (PrinterCallback, ProgressCallback):
            self.trainer.remove_callback(quiet)
        self._start: Any = None

    def run(self) -> None:
        self.baton.wait(self.name)
        try:
            self.trainer.train()
        finally:
            self.baton.finish(self.name)


def _evaluate(model: nn.Module, task: Task, data: dict) -> tuple[float, float]:
    """Clean validation accuracy, and the top Hessian eigenvalue of the (noisy-label) training loss on the first
    ``task.hessian_samples`` training examples (`hf_ssam.sharpness.top_hessian_eigenvalues`, in evaluation mode)."""
    model.eval()
    with torch.no_grad():
        accuracy = (model(data["val_x"])["logits"].argmax(-1) == data["val_y"]).float().mean().item()
    n = task.hessian_samples
    batch = {"x": data["train_x"][:n], "labels": data["train_y"][:n]}
    eigen = top_hessian_eigenvalues(model, lambda m, b: m(**b)["loss"], [batch], k=1,
                                    max_iter=task.hessian_max_iter)[0]  # fmt: skip
    return accuracy, eigen


def run_seed(task: Task, seed: int, data: dict, schedules: list[str], scaling: str) -> list[dict[str, Any]]:
    """Train every schedule once from the same initial weights (seed), interleaved; one result row each."""
    torch.set_num_threads(1)
    one_malloc_arena()
    steps = task.steps(len(data["train_y"]))
    torch.manual_seed(seed)
    initial = task.make_model()
    baton = Baton(list(schedules), seed=seed)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        runs = {}
        for name in schedules:
            settings = schedule_settings(SCHEDULES[name], task.rho, scaling)
            runs[name] = _Run(name, settings, task, copy.deepcopy(initial), data, seed, steps, tmp, baton)
        threads = [threading.Thread(target=runs[n].run, name=n, daemon=True) for n in schedules]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    wall = time.perf_counter() - started
    rows = []
    for name, run in runs.items():
        if len(run.times) != steps:
            raise RuntimeError(f"{task.name} {name} seed {seed}: {len(run.times)} timed steps instead of {steps}")
        run.counter.active = False
        run.counter.remove()
        accuracy, eigen = _evaluate(run.model, task, data)
        rows.append({
            "task": task.name, "schedule": name, "seed": seed, "steps": steps,
            "rho": run.settings.get("sam_rho") if run.settings.get("sam_variant") != "none" else 0.0,
            "accuracy": accuracy, "hessian_top": eigen,
            "forwards_per_step": run.counter.forwards / steps, "backwards_per_step": run.counter.backwards / steps,
            "expected_passes": expected_passes(run.settings, steps),
            "cpu_s": sum(run.times), "step_times": run.times, "group_wall_s": wall,
        })  # fmt: skip
    return rows
