"""Trainer configurations: `transformers.Trainer` and `SSAMTrainer`, timed by a callback."""

from __future__ import annotations

import os
from typing import Any

from torch import nn

from .timing import DEVICE, Baton, clock, elapsed, sync
from .workloads import LR, RHO, Workload

__all__ = ["GA_CONFIGS", "TRAINER_CONFIGS", "TrainerRunner", "base_optimizer", "make_args"]

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
# Memory-only configurations (gradient accumulation over 2 micro-batches), reported for information.
GA_CONFIGS: dict[str, dict[str, Any]] = {
    "trainer:plain+ga2": {"gradient_accumulation_steps": 2},
    "trainer:ssam+ga2": {"sam_variant": "ssam", "gradient_accumulation_steps": 2},
}


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
    if workload.bf16:
        common["bf16"] = True
    sam = dict(extra)
    common["gradient_accumulation_steps"] = sam.pop("gradient_accumulation_steps", 1)
    if config.startswith("trainer:plain"):
        return TrainingArguments(**common)
    return SSAMTrainingArguments(**common, sam_rho=RHO, **sam)


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
                sync()
                runner._start = clock()

            def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
                sync()
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
