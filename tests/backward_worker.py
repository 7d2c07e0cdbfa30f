"""Worker for tests/test_backward_distributed.py: `SSAMBackward` in hand-written Accelerate loops, 2 CPU processes.

Launched by the tests as users launch a ``*_no_trainer.py`` script on CPU machines:

    torchrun --standalone --nproc_per_node 2 tests/backward_worker.py --out /tmp/b --runs '[{"name": "a", ...}]'

Every run uses ``Accelerator(cpu=True, gradient_accumulation_steps=2)`` (gloo), SGD with momentum, and gives each
rank its half of every global micro-batch **by hand** (rows ``[r·h, (r+1)·h)`` of the micro-batch, no prepared
DataLoader), so that the test knows exactly which rows each rank saw. A run is one of two kinds; each writes
<out>/<name>.rank<r>.pt:

* ``ddp``: the float64 linear model of tests/_reference.py, prepared by Accelerate (DDP); saves the final weights
  θ = (w, b), the ``sam/*`` metrics read at every optimizer step, and the prepared model's type;
* ``fsdp2``: a small float64 MLP sharded by ``accelerator.prepare`` with Accelerate's FSDP plugin
  (``fsdp_version=2``, one unit per ``Block`` and the root), ``sync_ascent=True``, next to the same MLP trained
  unsharded in this process by ``SSAMBackward`` without an accelerator (``accumulation_steps=2``) on the whole
  micro-batches; saves both full weights (gathered with ``full_tensor()``, only to compare them), both metrics, the
  layout, and the error an FSDP2 model with ``sync_ascent=False`` is refused with.

Accelerate builds FSDP only on accelerators: on CPU processes `AcceleratorState` keeps the plain multi-CPU type and
drops the plugin. `enable_fsdp_on_cpu` makes the assignments Accelerate makes on accelerator processes (the branch
of ``AcceleratorState.__init__`` for them), so everything after it is Accelerate's real FSDP2 path: `prepare` →
``fully_shard``, FSDP2's ``no_sync`` inside ``accumulate``, the prepared optimizer over DTensor parameters.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.distributed as dist
from accelerate import Accelerator, FullyShardedDataParallelPlugin
from accelerate.state import AcceleratorState, GradientState, PartialState
from accelerate.utils import DistributedType
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's hf_ssam

from _reference import data  # noqa: E402  (tests/, the script's own folder)
from _teardown import leave  # noqa: E402

from hf_ssam import SSAMBackward  # noqa: E402

ACCUMULATION = 2


def enable_fsdp_on_cpu() -> None:
    """Let `AcceleratorState` take the FSDP plugin on CPU processes, as it does on accelerators."""
    original = AcceleratorState.__init__

    def init(self, *args, fsdp_plugin=None, **kwargs):
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin
            PartialState._shared_state["distributed_type"] = self.distributed_type

    AcceleratorState.__init__ = init


def fresh_accelerator(**kwargs) -> Accelerator:
    """A new Accelerator per run (its state is process-wide); the process group stays up."""
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    return Accelerator(cpu=True, gradient_accumulation_steps=ACCUMULATION, **kwargs)


def my_half(t: torch.Tensor) -> torch.Tensor:
    """This rank's rows of a global micro-batch."""
    n = len(t) // dist.get_world_size()
    return t[dist.get_rank() * n : (dist.get_rank() + 1) * n]


def micro_batches(x: torch.Tensor, y: torch.Tensor, size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x[i : i + size], y[i : i + size]) for i in range(0, len(x), size)]


def train(accelerator, model, opt, sam_backward, loss_fn, batches) -> list[dict[str, float]]:
    """The user's loop: each micro-batch inside ``accumulate``, the optimizer stepped on every one (Accelerate
    skips the non-boundary steps); the metrics read at every optimizer step."""
    logs = []
    for x, y in batches:
        with accelerator.accumulate(model):
            sam_backward(lambda x=x, y=y: loss_fn(model, x, y))
            opt.step()
            opt.zero_grad()
        if accelerator.sync_gradients:
            logs.append(sam_backward.metrics())
    return logs


# ------------------------------------------------------------------------------------------------ DDP


class LinReg(nn.Module):
    """prediction = x·w + b, float64 (tests/_reference.py's model)."""

    def __init__(self, theta: torch.Tensor):
        super().__init__()
        self.w = nn.Parameter(theta[:-1].clone())
        self.b = nn.Parameter(theta[-1:].clone())

    def forward(self, x):
        return x @ self.w + self.b


def mse(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((model(x) - y) ** 2).mean()


def run_ddp(spec: dict) -> dict:
    theta, x, y = (torch.tensor(a) for a in data(n=spec["n"], d=spec["d"], seed=spec["seed"]))
    accelerator = fresh_accelerator()
    model = LinReg(theta)
    opt = torch.optim.SGD(model.parameters(), lr=spec["lr"], momentum=spec["momentum"])
    model, opt = accelerator.prepare(model, opt)
    sam_backward = SSAMBackward(model, opt, accelerator=accelerator, variant=spec["variant"], rho=spec["rho"],
                                sync_ascent=spec["sync"])  # fmt: skip
    batches = [(my_half(xb), my_half(yb)) for xb, yb in micro_batches(x, y, spec["global_batch"])]
    logs = train(accelerator, model, opt, sam_backward, mse, batches)
    inner = accelerator.unwrap_model(model)
    return {
        "theta": torch.cat([inner.w.detach(), inner.b.detach()]),
        "logs": logs,
        "model_type": type(model).__name__,
        "distributed_type": str(accelerator.distributed_type),
        "rows_per_rank": len(batches[0][0]),
    }


# ---------------------------------------------------------------------------------------------- FSDP2


class Block(nn.Module):
    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.linear = nn.Linear(d_in, d_out)

    def forward(self, x):
        return torch.tanh(self.linear(x))


class MLP(nn.Module):
    """Two `Block`s (each its own FSDP unit) and a head; 7 and 1 rows shard unevenly over 2 ranks."""

    _no_split_modules = ["Block"]

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.blocks = nn.Sequential(Block(6, 10), Block(10, 7))
        self.head = nn.Linear(7, 1)
        self.double()

    def forward(self, x):
        return self.head(self.blocks(x))  # (n, 1), not a view: FSDP2 warns about views returned by its units


def full_weights(model: nn.Module) -> torch.Tensor:
    full = [p.full_tensor() if isinstance(p, DTensor) else p for p in model.parameters()]
    return torch.cat([p.detach().reshape(-1) for p in full])


def run_fsdp2(spec: dict) -> dict:
    g = torch.Generator().manual_seed(spec["seed"])
    n = spec["global_batch"] * ACCUMULATION * spec["steps"]
    x = torch.randn(n, 6, generator=g, dtype=torch.float64)
    y = torch.randn(n, 1, generator=g, dtype=torch.float64)
    whole = micro_batches(x, y, spec["global_batch"])
    sgd = {"lr": spec["lr"], "momentum": spec["momentum"]}
    sam = {"variant": spec["variant"], "rho": spec["rho"]}

    reference = MLP()  # one unsharded process on the whole micro-batches, no accelerator
    start = full_weights(reference)
    ref_opt = torch.optim.SGD(reference.parameters(), **sgd)
    ref_backward = SSAMBackward(reference, ref_opt, accumulation_steps=ACCUMULATION, **sam)
    ref_logs = []
    for i, (xb, yb) in enumerate(whole):
        ref_backward(lambda xb=xb, yb=yb: mse(reference, xb, yb))
        if (i + 1) % ACCUMULATION == 0:
            ref_opt.step()
            ref_opt.zero_grad()
            ref_logs.append(ref_backward.metrics())

    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap",
                                            transformer_cls_names_to_wrap=["Block"])  # fmt: skip
    accelerator = fresh_accelerator(fsdp_plugin=plugin)
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), **sgd)
    model, opt = accelerator.prepare(model, opt)
    try:
        SSAMBackward(model, opt, accelerator=accelerator, sync_ascent=False, **sam)
        refusal = ""
    except ValueError as err:
        refusal = str(err)
    sam_backward = SSAMBackward(model, opt, accelerator=accelerator, sync_ascent=True, **sam)
    logs = train(accelerator, model, opt, sam_backward, mse, [(my_half(xb), my_half(yb)) for xb, yb in whole])
    return {
        "start": start,
        "sharded": full_weights(model),
        "single": full_weights(reference),
        "logs": logs,
        "ref_logs": ref_logs,
        "refusal": refusal,
        "distributed_type": str(accelerator.distributed_type),
        "fsdp_units": sum(isinstance(m, FSDPModule) for m in model.modules()),
        "params_are_dtensors": all(isinstance(p, DTensor) for p in model.parameters()),
        "opt_params_are_dtensors": all(isinstance(p, DTensor) for grp in opt.param_groups for p in grp["params"]),
        "local_numel": sum(p.to_local().numel() for p in model.parameters()),
        "param_dtype": str(next(model.parameters()).dtype),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--runs", required=True, help="JSON list of run specs")
    parser.add_argument("--expect_world_size", type=int, default=2)
    ns = parser.parse_args()
    torch.set_num_threads(1)
    enable_fsdp_on_cpu()
    dist.init_process_group("gloo")  # Accelerate finds it initialized and keeps it across runs
    if dist.get_world_size() != ns.expect_world_size:
        raise SystemExit(f"expected world size {ns.expect_world_size}, got {dist.get_world_size()}")
    for spec in json.loads(ns.runs):
        result = run_fsdp2(spec) if spec["kind"] == "fsdp2" else run_ddp(spec)
        result["world_size"] = dist.get_world_size()
        torch.save(result, os.path.join(ns.out, f"{spec['name']}.rank{dist.get_rank()}.pt"))
    leave()


if __name__ == "__main__":
    main()
