"""Worker for tests/test_fsdp_trainer.py: SSAMTrainer under FSDP2 through Accelerate, 2 CPU processes, gloo.

Launched by the tests as users launch training:

    torchrun --standalone --nproc_per_node 2 tests/fsdp_trainer_worker.py --out /tmp/f --runs '[{"name": "a", ...}]'

Accelerate builds FSDP only on accelerators: on CPU processes `AcceleratorState` keeps the plain multi-CPU type and
drops the FSDP plugin. `enable_fsdp_on_cpu` makes on CPU processes the assignments Accelerate makes on accelerator
processes (distributed type FSDP, the plugin's mixed precision, the plugin, the shared distributed type), so all
that follows is the real path: `Trainer` → `accelerator.prepare` → `fully_shard` of every `Block` and of the root,
FSDP2's `no_sync`, clipping, optimizer step and checkpoints, and the trainer's FSDP code.

A run trains an MLP for a few steps and writes <out>/<name>.rank<r>.pt: the full weights at the start and at the
end (gathered here, only to compare them), the inputs of every forward pass, the SAM logs, the collectives
counted inside each `training_step` and the FSDP layout (with `sam_reuse`, also the kept direction's). Runs of kind
``refusal`` build trainers from an Accelerate FSDP config (the environment `accelerate launch --config_file` sets)
and save the error messages.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys

import torch
import torch.distributed as dist
from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.debug import CommDebugMode
from torch.utils.data import Dataset, SequentialSampler

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's hf_ssam

from _teardown import leave  # noqa: E402  (tests/, the script's own folder)
from _versions import TRANSFORMERS_4  # noqa: E402

from hf_ssam import SSAMTrainer, SSAMTrainingArguments  # noqa: E402

N_SAMPLES = 64
IGNORE = -100.0  # a label the Trainer does not count as an item
FSDP_OPTIONS = ("fsdp_version", "auto_wrap_policy", "reshard_after_forward", "state_dict_type",
                "cpu_ram_efficient_loading", "activation_checkpointing")  # fmt: skip


def enable_fsdp_on_cpu() -> None:
    """Let `AcceleratorState` take the FSDP plugin on CPU processes, as it does on accelerators."""
    original = AcceleratorState.__init__

    def init(self, *args, fsdp_plugin=None, **kwargs):
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP  # accelerate/state.py, the branch for accelerators
            if self._mixed_precision != "no":
                fsdp_plugin.set_mixed_precision(self._mixed_precision)
            self.fsdp_plugin = fsdp_plugin
            PartialState._shared_state["distributed_type"] = self.distributed_type  # as the end of that __init__

    AcceleratorState.__init__ = init


class Regression(Dataset):
    """Rows of 8 features; with ``ignored``, some labels are IGNORE, so ranks and micro-batches hold unequal items."""

    def __init__(self, ignored: bool):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(N_SAMPLES, 8, generator=g)
        self.y = (self.x[:, :1] * 2 - self.x[:, 1:2]).squeeze(-1) + 0.1 * torch.randn(N_SAMPLES, generator=g)
        if ignored:
            self.y[torch.rand(N_SAMPLES, generator=g) < 0.4] = IGNORE

    def __len__(self) -> int:
        return N_SAMPLES

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[i], "labels": self.y[i]}


class Block(nn.Module):
    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.linear = nn.Linear(d_in, d_out)

    def forward(self, x):
        return torch.tanh(self.linear(x))


class MLP(nn.Module):
    """Two `Block`s (each its own FSDP unit: `_no_split_modules`) and a head; 7 and 1 rows shard unevenly."""

    _no_split_modules = ["Block"]

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.blocks = nn.Sequential(Block(8, 16), Block(16, 7))
        self.head = nn.Linear(7, 1)

    def predict(self, x):
        return self.head(self.blocks(x)).squeeze(-1).float()

    def forward(self, x, labels=None):
        return {"loss": ((self.predict(x) - labels) ** 2).mean()}  # the mean over the micro-batch


class SummedMLP(MLP):
    """A loss summed over the labelled rows and divided by the Trainer's item count (token-normalized losses)."""

    def forward(self, x, labels=None, num_items_in_batch=None, **kwargs):
        keep = labels != IGNORE
        summed = ((self.predict(x) - labels) ** 2 * keep).sum()
        return {"loss": summed / (num_items_in_batch if num_items_in_batch is not None else keep.sum())}


class InOrder(SSAMTrainer):
    def _get_train_sampler(self, *args, **kwargs):
        return SequentialSampler(self.train_dataset)


class Counted(InOrder):
    """Counts the collectives of every `training_step` and refuses host synchronisations inside it."""

    def training_step(self, *args, **kwargs):
        mode = CommDebugMode()
        with mode, no_host_sync():
            loss = super().training_step(*args, **kwargs)
        self.comms.append({str(op): n for op, n in mode.get_comm_counts().items()})
        return loss


@contextlib.contextmanager
def no_host_sync():
    saved = {name: getattr(torch.Tensor, name) for name in ("__bool__", "item", "cpu", "tolist", "__float__")}

    def refuse(*args, **kwargs):
        raise RuntimeError("host synchronisation inside the SAM step")

    for name in saved:
        setattr(torch.Tensor, name, refuse)
    try:
        yield
    finally:
        for name, method in saved.items():
            setattr(torch.Tensor, name, method)


def full_weights(model: nn.Module) -> torch.Tensor:
    return full_weights_of(list(model.parameters()))


def make_args(out: str, spec: dict, **overrides) -> SSAMTrainingArguments:
    fsdp_config = {"fsdp_version": spec.get("fsdp_version", 2), **spec.get("fsdp_config", {})}
    if spec.get("sharded_checkpoint"):
        fsdp_config["fsdp_state_dict_type"] = "SHARDED_STATE_DICT"
    values = dict(
        output_dir=os.path.join(out, spec["name"]), report_to="none", use_cpu=True, save_strategy="no",
        disable_tqdm=True, logging_steps=1, max_steps=spec.get("steps", 4), per_device_train_batch_size=4,
        gradient_accumulation_steps=spec.get("accumulation", 1), learning_rate=0.05, lr_scheduler_type="constant",
        optim="sgd", optim_args="momentum=0.9", max_grad_norm=spec.get("max_grad_norm", 1.0),
        bf16=spec.get("bf16", False), sam_variant=spec.get("variant", "ssam"), sam_rho=spec.get("rho", 0.1),
        sam_sync_ascent=True, sam_interval=spec.get("interval", 1), sam_start=spec.get("start", 0),
        sam_reuse=spec.get("reuse", False), sam_reuse_alpha=spec.get("alpha", 0.7), seed=0, dataloader_num_workers=0,
        fsdp=True, fsdp_config=fsdp_config,
    )  # fmt: skip
    values.update(overrides)
    return SSAMTrainingArguments(**values)


def build(out: str, spec: dict, **overrides) -> tuple[Counted, list]:
    model = SummedMLP() if spec.get("token") else MLP()
    seen: list = []
    model.register_forward_pre_hook(
        lambda m, a, kw: seen.append((kw["x"].detach().clone(), kw["labels"].detach().clone())), with_kwargs=True
    )
    trainer = Counted(model=model, args=make_args(out, spec, **overrides), train_dataset=Regression(spec.get("token")))
    if spec.get("token"):  # the loss divides by num_items_in_batch, declared: no loss probe (its forwards and sync)
        trainer.loss_is_scaled_for_ga = True
    trainer.comms = []
    return trainer, seen


def run_train(out: str, spec: dict) -> dict:
    if "accelerate_env" in spec:  # FSDP from an Accelerate config, as `accelerate launch --config_file` sets it up
        with environment(ACCELERATE_USE_FSDP="true", **spec["accelerate_env"]):
            return _run_train(out, spec, fsdp=None, fsdp_config=None)
    return _run_train(out, spec)


def _run_train(out: str, spec: dict, **overrides) -> dict:
    trainer, seen = build(out, spec, **overrides)
    start = full_weights(trainer.model)
    resume = spec.get("resume_at")
    if resume:  # stop at a checkpoint, then resume into a fresh trainer (other initial weights) up to `steps`
        trainer, seen = build(out, spec, max_steps=resume, save_strategy="steps", save_steps=resume, **overrides)
        trainer.train()
        trainer, seen = build(out, spec, **overrides)
        with torch.no_grad():
            for p in trainer.model.parameters():
                p.add_(1.0)  # the checkpoint must overwrite these
        trainer.train(resume_from_checkpoint=os.path.join(out, spec["name"], f"checkpoint-{resume}"))
    else:
        trainer.train()
    model = trainer.model
    logs = [{k: v for k, v in h.items() if k.startswith("sam/") or k in ("loss", "grad_norm")}
            for h in trainer.state.log_history]  # fmt: skip
    try:
        with no_host_sync():
            bool(torch.ones(()) > 0)
        guard_works = False
    except RuntimeError:
        guard_works = True
    return {
        **kept_direction(trainer),
        "guard_works": guard_works,
        "start": start,
        "weights": full_weights(model),
        "forward_inputs": seen,  # two per micro-batch of a SAM step, one per micro-batch of a plain one
        "logs": logs,
        "comms": trainer.comms,
        "fsdp_units": sum(isinstance(m, FSDPModule) for m in model.modules()),
        "is_fsdp_enabled": trainer.is_fsdp_enabled,
        "distributed_type": str(trainer.accelerator.state.distributed_type),
        "fsdp_plugin": {k: str(getattr(trainer.accelerator.state.fsdp_plugin, k)) for k in FSDP_OPTIONS},
        "params_are_dtensors": all(isinstance(p, DTensor) for p in model.parameters()),
        "param_dtype": str(next(model.parameters()).dtype),
        "local_numel": sum(p.to_local().numel() for p in model.parameters()),
        "checkpoints": sorted(os.listdir(os.path.join(out, spec["name"])))
        if os.path.isdir(os.path.join(out, spec["name"]))
        else [],
    }


def kept_direction(trainer: Counted) -> dict:
    """With `sam_reuse`: the direction kept at the last SAM step (gathered, only to compare it) and its layout."""
    kept = trainer._sam_direction
    if kept is None:
        return {"direction": None}
    by_id = dict(zip(kept[0], kept[1]))  # kept in the SAM set's (the optimizer's) order: back to `parameters()`
    params = list(trainer.model.parameters())
    v = [by_id[id(p)] for p in params]
    return {
        "direction": full_weights_of(v),
        "direction_is_dtensor": [isinstance(t, DTensor) for t in v],
        "direction_like_params": [
            isinstance(t, DTensor)
            and t.placements == p.placements
            and t.device_mesh == p.device_mesh
            and t.shape == p.shape
            and t.to_local().shape == p.to_local().shape
            for t, p in zip(v, params)
        ],  # fmt: skip
        "direction_local_numel": sum(t.to_local().numel() for t in v if isinstance(t, DTensor)),
    }


def full_weights_of(tensors: list) -> torch.Tensor:
    full = [t.full_tensor() if isinstance(t, DTensor) else t for t in tensors]
    return torch.cat([t.detach().reshape(-1).float() for t in full])


@contextlib.contextmanager
def environment(**values: str):
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def run_refusal(out: str, spec: dict) -> dict:
    """Trainers built from an Accelerate FSDP config (no `fsdp=` argument), as `accelerate launch` sets it up."""
    messages = {}
    cases = {
        "fsdp1": ({"FSDP_VERSION": "1"}, {"sam_sync_ascent": True}),
        "local_ascent": ({"FSDP_VERSION": "2"}, {"sam_sync_ascent": False}),
        "accepted": ({"FSDP_VERSION": "2"}, {"sam_sync_ascent": True}),
        "plain_fsdp1": ({"FSDP_VERSION": "1"}, {"sam_variant": "none"}),
    }
    for case, (env, overrides) in cases.items():
        with environment(ACCELERATE_USE_FSDP="true", **env):
            args = make_args(out, {"name": f"{spec['name']}-{case}"}, fsdp=None, fsdp_config=None, **overrides)
            try:
                trainer = InOrder(model=MLP(), args=args, train_dataset=Regression(False))
                messages[case] = f"accepted, fsdp_version={trainer.accelerator.state.fsdp_plugin.fsdp_version}"
            except ValueError as err:
                messages[case] = str(err)
                continue
            if case == "accepted":  # a setting changed after construction is checked again when training starts
                trainer.args.sam_sync_ascent = False
                try:
                    trainer.train()
                    messages["changed_before_train"] = "trained"
                except ValueError as err:
                    messages["changed_before_train"] = str(err)
    return {"messages": messages}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--runs", required=True, help="JSON list of run specs")
    ns = parser.parse_args()
    torch.set_num_threads(1)
    enable_fsdp_on_cpu()
    if TRANSFORMERS_4:  # 4.x ignores fsdp_config["fsdp_version"]: Accelerate reads the version from here (default 1)
        os.environ.setdefault("FSDP_VERSION", "2")
    for spec in json.loads(ns.runs):
        result = run_refusal(ns.out, spec) if spec.get("kind") == "refusal" else run_train(ns.out, spec)
        result["world_size"] = dist.get_world_size()
        torch.save(result, os.path.join(ns.out, f"{spec['name']}.rank{dist.get_rank()}.pt"))
    leave()


if __name__ == "__main__":
    main()
