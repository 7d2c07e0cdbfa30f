"""Worker for tests/test_distributed.py: trains small SSAMTrainer runs under DDP and saves what each rank saw.

Launched by the tests, as users launch training on CPU machines:

    torchrun --standalone --nproc_per_node 2 tests/dist_worker.py --out /tmp/d --runs '[{"name": "a", ...}]'

Each run writes <out>/<name>.rank<r>.pt with the flat weights, the SAM logs and the number of gradient
all-reduces per optimizer step (DDP buckets, counted by a comm hook, and explicit all-reduces by size); with
``sam_reuse``, also the kept SAM direction (flat) and the inputs of every forward pass.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import torch.distributed as dist
from _teardown import leave  # tests/, the script's own folder
from torch import nn
from torch.utils.data import Dataset, SequentialSampler
from transformers import Trainer, TrainerCallback

from hf_ssam import SSAMMixin, SSAMTrainer, SSAMTrainingArguments


class Regression(Dataset):
    def __init__(self, n: int = 128):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 8, generator=g)
        self.y = (self.x[:, :1] * 2 - self.x[:, 1:2]).squeeze(-1) + 0.1 * torch.randn(n, generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[i], "labels": self.y[i]}


class MLP(nn.Module):
    def __init__(self, dropout: float):
        super().__init__()
        torch.manual_seed(1)
        self.net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Dropout(dropout), nn.Linear(16, 1))

    def forward(self, x, labels=None):
        return {"loss": ((self.net(x).squeeze(-1) - labels) ** 2).mean()}


class InOrder(SSAMTrainer):
    def _get_train_sampler(self, *args, **kwargs):
        return SequentialSampler(self.train_dataset)


class Guarded(InOrder):
    """Fails the run if the SAM step calls bool()/.item()/.cpu() on a tensor (a host synchronisation)."""

    def training_step(self, *args, **kwargs):
        saved = {name: getattr(torch.Tensor, name) for name in ("__bool__", "item", "cpu", "tolist")}

        def refuse(self, *a, **k):
            raise RuntimeError("host synchronisation inside the SAM step")

        for name in saved:
            setattr(torch.Tensor, name, refuse)
        try:
            return super().training_step(*args, **kwargs)
        finally:
            for name, method in saved.items():
                setattr(torch.Tensor, name, method)


class UserTrainer(Trainer):
    """A Trainer subclass wrapping training_step, as TRL's do."""

    def training_step(self, *args, **kwargs):
        return super().training_step(*args, **kwargs)


class MixinInOrder(SSAMMixin, UserTrainer):
    _get_train_sampler = InOrder._get_train_sampler


#: An explicit all-reduce of at most this many elements is the logged metrics' (9 sums with `sam/reused`), not a
#: gradient's (the MLP has 161 weights).
SMALL = 32


class CountAllReduce(TrainerCallback):
    """DDP bucket all-reduces (comm hook) and explicit all-reduces (by size) per optimizer step."""

    def __init__(self, trainer: SSAMTrainer):
        self.trainer = trainer
        self.current = {"ddp_buckets": 0, "explicit_tensor": 0, "explicit_scalar": 0}
        self.per_step: list[dict[str, int]] = []
        self._original = dist.all_reduce

        def counting_all_reduce(tensor, *args, **kwargs):
            self.current["explicit_scalar" if tensor.numel() <= SMALL else "explicit_tensor"] += 1
            return self._original(tensor, *args, **kwargs)

        dist.all_reduce = counting_all_reduce

    def on_train_begin(self, args, state, control, **kwargs):
        model = self.trainer.model_wrapped
        if isinstance(model, nn.parallel.DistributedDataParallel):
            world = dist.get_world_size()

            def hook(process_group, bucket):  # DDP's default averaging all-reduce, counted (not as "explicit")
                self.current["ddp_buckets"] += 1
                work = self._original(bucket.buffer().div_(world), async_op=True)
                return work.get_future().then(lambda fut: fut.value()[0])

            model.register_comm_hook(None, hook)

    def on_step_end(self, args, state, control, **kwargs):
        self.per_step.append(dict(self.current))
        self.current = dict.fromkeys(self.current, 0)

    def on_train_end(self, args, state, control, **kwargs):
        dist.all_reduce = self._original


def run(out: str, spec: dict) -> None:
    args = SSAMTrainingArguments(
        output_dir=os.path.join(out, spec["name"]),
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
        logging_steps=1,
        max_steps=spec.get("steps", 20),
        per_device_train_batch_size=spec["batch"],
        gradient_accumulation_steps=spec.get("accumulation", 1),
        learning_rate=spec.get("lr", 0.05),
        lr_scheduler_type="constant",
        max_grad_norm=spec.get("max_grad_norm", 0.0),
        sam_variant=spec["variant"],
        sam_rho=spec.get("rho", 0.1),
        sam_sync_ascent=spec.get("sync", False),
        sam_interval=spec.get("interval", 1),
        sam_start=spec.get("start", 0),
        sam_reuse=spec.get("reuse", False),
        sam_reuse_alpha=spec.get("alpha", 0.7),
        seed=0,
        dataloader_num_workers=0,
    )
    model = MLP(spec.get("dropout", 0.0))
    opt = torch.optim.SGD(model.parameters(), lr=args.learning_rate, momentum=0.9)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    cls = MixinInOrder if spec.get("mixin") else Guarded if spec.get("guard_host_sync") else InOrder
    seen: list = []  # the inputs of every forward pass (reuse runs: the float64 reference replays them)
    if spec.get("reuse"):
        model.register_forward_pre_hook(
            lambda m, a, kw: seen.append((kw["x"].detach().clone(), kw["labels"].detach().clone())), with_kwargs=True
        )
    start = torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])
    trainer = cls(model=model, args=args, train_dataset=Regression(), optimizers=(opt, sched))
    counter = CountAllReduce(trainer)
    trainer.add_callback(counter)
    trainer.train()
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    logs = [{k: v for k, v in h.items() if k.startswith("sam/") or k == "loss"} for h in trainer.state.log_history]
    kept = getattr(trainer, "_sam_direction", None)  # v of the last SAM step (sam_reuse)
    if kept is not None:  # in the SAM set's (the optimizer's) order: back to `parameters()`
        by_id = dict(zip(kept[0], kept[1]))
        direction = torch.cat([by_id[id(p)].detach().reshape(-1) for p in model.parameters()])
    else:
        direction = None
    extra = {"start": start, "direction": direction, "forward_inputs": seen} if spec.get("reuse") else {}
    torch.save(
        {"weights": flat, "logs": logs, "allreduce": counter.per_step, "world_size": world, **extra},
        os.path.join(out, f"{spec['name']}.rank{rank}.pt"),
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--runs", required=True, help="JSON list of run specs")
    parser.add_argument("--expect_world_size", type=int, required=True)
    ns = parser.parse_args()
    torch.set_num_threads(1)
    for spec in json.loads(ns.runs):
        run(ns.out, spec)
        world = dist.get_world_size() if dist.is_initialized() else 1
        if world != ns.expect_world_size:
            raise SystemExit(f"expected world size {ns.expect_world_size}, got {world}")


if __name__ == "__main__":
    main()
    leave()
