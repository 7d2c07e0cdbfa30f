"""Worker for tests/test_fsdp.py: SSAMOptimizer over FSDP2 (`fully_shard`), 2 CPU processes, gloo.

Launched by the tests as users launch it:

    torchrun --standalone --nproc_per_node 2 tests/fsdp_worker.py --out /tmp/f --runs '[{"name": "a", ...}]'

A run is one of four kinds; each writes <out>/<name>.rank<r>.pt:

* ``equivalence``: an MLP (``fully_shard`` on every block and on the root) trained on half of every batch
  per rank, next to the same unsharded MLP trained in this process on the whole batch; saves both weights
  and the collectives counted inside ``first_step`` / ``second_step`` (the whole ``step(closure)`` with the
  closure API), and those of the same steps of plain FSDP training;
* ``linreg``: one float64 step of linear least squares under FSDP, saved for the test's numpy reference;
* ``resume``: training interrupted by a DCP checkpoint and resumed into fresh objects, next to an
  uninterrupted run; also an in-memory ``state_dict()`` / ``load_state_dict()`` round trip;
* ``norms``: ``hf_ssam.functional`` on hand-placed DTensors (Shard, uneven Shard, Replicate, 2-D meshes).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.debug import CommDebugMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's hf_ssam

from _teardown import leave  # noqa: E402  (tests/, the script's own folder)

from hf_ssam import VARIANTS, SSAMOptimizer, functional  # noqa: E402

BATCH = 8  # global batch; each of the 2 ranks takes half
OPTIMIZERS: dict[str, tuple[type[torch.optim.Optimizer], dict]] = {
    "sgd": (torch.optim.SGD, {"lr": 0.05, "momentum": 0.9, "weight_decay": 1e-3}),
    "adamw": (torch.optim.AdamW, {"lr": 0.01, "weight_decay": 0.01}),
}


class Block(nn.Module):
    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.linear = nn.Linear(d_in, d_out)

    def forward(self, x):
        return torch.tanh(self.linear(x))


def mlp(seed: int) -> nn.Sequential:
    """Sizes chosen so that some shards are uneven (3 rows over 2 ranks) and one is empty (1 row)."""
    torch.manual_seed(seed)
    return nn.Sequential(Block(6, 10), Block(10, 7), nn.Linear(7, 3), nn.Linear(3, 1))


def shard(model: nn.Module, mesh) -> nn.Module:
    for sub in model:  # nested: every sub-module, then the root, as users write it
        fully_shard(sub, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def batches(steps: int, dtype=torch.float32) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(123)
    return [(torch.randn(BATCH, 6, generator=g, dtype=dtype), torch.randn(BATCH, 1, generator=g, dtype=dtype))
            for _ in range(steps)]  # fmt: skip


def half(t: torch.Tensor) -> torch.Tensor:
    n = len(t) // dist.get_world_size()
    return t[dist.get_rank() * n : (dist.get_rank() + 1) * n]


def flat(model: nn.Module) -> torch.Tensor:
    """The full weights (gathered here, in the harness, only to compare them)."""
    full = [p.full_tensor() if isinstance(p, DTensor) else p for p in model.parameters()]
    return torch.cat([p.detach().reshape(-1) for p in full])


def make_opt(model: nn.Module, spec: dict) -> SSAMOptimizer:
    cls, kwargs = OPTIMIZERS[spec["optimizer"]]
    return SSAMOptimizer(model.parameters(), cls, variant=spec["variant"], rho=spec.get("rho", 0.1),
                         renormalize=spec.get("renormalize"), **kwargs)  # fmt: skip


def loss_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((model(x) - y) ** 2).mean()


def counted(comms: dict[str, int], fn: Callable[[], None]) -> None:
    mode = CommDebugMode()
    with mode:
        fn()
    for op, n in mode.get_comm_counts().items():
        comms[str(op)] = comms.get(str(op), 0) + n


def train(model: nn.Module, opt: SSAMOptimizer, data, api: str, comms: dict[str, int] | None = None) -> None:
    comms = {} if comms is None else comms
    for x, y in data:
        if api == "closure":
            counted(comms, lambda x=x, y=y: opt.step(lambda: loss_fn(model, x, y).backward()))
            continue
        loss_fn(model, x, y).backward()
        counted(comms, lambda: opt.first_step(zero_grad=True))
        loss_fn(model, x, y).backward()
        counted(comms, lambda: opt.second_step(zero_grad=True))


def run_equivalence(spec: dict, mesh) -> dict:
    data = batches(spec.get("steps", 5))
    reference = mlp(seed=0)
    start = flat(reference)
    train(reference, make_opt(reference, spec), data, "two_steps")
    model = shard(mlp(seed=0), mesh)
    opt = make_opt(model, spec)
    comms: dict[str, int] = {}
    train(model, opt, [(half(x), half(y)) for x, y in data], spec.get("api", "two_steps"), comms)
    backup = [b for b in opt._backup.values()]
    plain_comms: dict[str, int] = {}  # the same steps without SAM: forward + backward + step, all counted
    plain = shard(mlp(seed=0), mesh)
    plain_opt = OPTIMIZERS[spec["optimizer"]][0](plain.parameters(), **OPTIMIZERS[spec["optimizer"]][1])
    for x, y in data:
        counted(plain_comms, lambda x=x, y=y: (loss_fn(plain, half(x), half(y)).backward(), plain_opt.step()))
        plain_opt.zero_grad()
    return {
        "start": start,
        "plain_comms": plain_comms,
        "sharded": flat(model),
        "single": flat(reference),
        "comms": comms,
        "backup_local_numel": sum(b.to_local().numel() for b in backup),
        "backup_is_dtensor": all(isinstance(b, DTensor) for b in backup),
        "params_local_numel": sum(p.to_local().numel() for p in model.parameters()),
        "metrics": opt.last_metrics,
    }


class LinReg(nn.Module):
    def __init__(self, theta: list[float]):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(theta[:-1], dtype=torch.float64))
        self.b = nn.Parameter(torch.tensor(theta[-1:], dtype=torch.float64))

    def forward(self, x):
        return x @ self.w + self.b


def run_linreg(spec: dict, mesh) -> dict:
    model = fully_shard(LinReg(spec["theta"]), mesh=mesh)
    x, y = torch.tensor(spec["x"], dtype=torch.float64), torch.tensor(spec["y"], dtype=torch.float64)
    opt = SSAMOptimizer(model.parameters(), torch.optim.SGD, variant=spec["variant"], rho=spec["rho"],
                        renormalize=spec.get("renormalize"), lr=spec["lr"])  # fmt: skip
    train(model, opt, [(half(x), half(y))], "two_steps")
    return {"theta": torch.cat([model.w.full_tensor(), model.b.full_tensor()]).detach(), "metrics": opt.last_metrics}


def run_resume(spec: dict, mesh, out: str) -> dict:
    data = batches(6)
    straight = shard(mlp(seed=0), mesh)
    train(straight, make_opt(straight, spec), data, "two_steps")

    model = shard(mlp(seed=0), mesh)
    opt = make_opt(model, spec)
    train(model, opt, data[:3], "two_steps")
    model_sd, optim_sd = get_state_dict(model, opt.base_optimizer)  # sharded: each rank writes its shards
    path = os.path.join(out, spec["name"] + ".dcp")
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=path)
    sharded_state = all(isinstance(v, DTensor) for s in opt.state.values() for v in s.values() if v.dim() > 0)

    resumed = shard(mlp(seed=7), mesh)  # other weights and an empty optimizer: everything comes from the files
    resumed_opt = make_opt(resumed, spec)
    model_sd, optim_sd = get_state_dict(resumed, resumed_opt.base_optimizer)
    dcp.load({"model": model_sd, "optim": optim_sd}, checkpoint_id=path)
    set_state_dict(resumed, resumed_opt.base_optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd)
    resumed_opt.load_state_dict(resumed_opt.base_optimizer.state_dict())  # the SAM wrapper shares the new groups
    train(resumed, resumed_opt, data[3:], "two_steps")

    in_memory = shard(mlp(seed=0), mesh)  # in-memory round trip of the sharded state
    in_memory_opt = make_opt(in_memory, spec)
    in_memory.load_state_dict(model.state_dict())
    in_memory_opt.load_state_dict(opt.state_dict())
    train(in_memory, in_memory_opt, data[3:], "two_steps")
    return {"straight": flat(straight), "resumed": flat(resumed), "in_memory": flat(in_memory),
            "sharded_state": sharded_state}  # fmt: skip


def run_norms(spec: dict) -> dict:
    """Global norms of DTensors laid out in several ways, with the full tensors for the test's own sums."""
    world = dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    mesh2d = init_device_mesh("cpu", (world, 1), mesh_dim_names=("a", "b"))
    g = torch.Generator().manual_seed(5)
    full = {name: torch.randn(*shape, generator=g, dtype=torch.float64)
            for name, shape in [("rows", (5, 3)), ("cols", (2, 7)), ("rep", (4,)), ("one", (1, 3)), ("d2", (6, 2)),
                                ("d2b", (3, 2)), ("plain", (3,))]}  # fmt: skip
    dt = {
        "rows": distribute_tensor(full["rows"], mesh, [Shard(0)]),  # 3 + 2 rows
        "cols": distribute_tensor(full["cols"], mesh, [Shard(1)]),  # 4 + 3 columns
        "rep": distribute_tensor(full["rep"], mesh, [Replicate()]),  # a whole copy on each rank: counted once
        "one": distribute_tensor(full["one"], mesh, [Shard(0)]),  # one rank holds nothing
        "d2": distribute_tensor(full["d2"], mesh2d, [Replicate(), Shard(0)]),
        "d2b": distribute_tensor(full["d2b"], mesh2d, [Shard(0), Replicate()]),
    }
    names = list(dt)
    comms: dict[str, int] = {}
    norms = {}
    for name in names:
        counted(comms, lambda name=name: norms.__setitem__(name, functional.global_norm([dt[name]])))
    counted(comms, lambda: norms.__setitem__("all", functional.global_norm([dt[n] for n in names] + [full["plain"]])))
    try:
        functional.global_norm([DTensor.from_local(full["rep"], mesh, [Partial()])])
        partial_error = ""
    except ValueError as err:
        partial_error = str(err)

    # the elementwise maths on shards equals the same maths on the full tensors
    ascended = {}
    for variant in VARIANTS:
        params = [distribute_tensor(full[n], mesh, [Shard(0)]) for n in ("rows", "one")]
        grads = [distribute_tensor(full[n].flip(0) * 0.5, mesh, [Shard(0)]) for n in ("rows", "one")]
        plain_p = [full[n].clone() for n in ("rows", "one")]
        plain_g = [full[n].flip(0) * 0.5 for n in ("rows", "one")]
        backup = [torch.empty_like(p) for p in params]
        functional.save_(backup, params)
        for ps, gs in ((params, grads), (plain_p, plain_g)):
            s = functional.perturbation_scale(variant, 0.3, functional.global_norm(gs), params=ps, grads=gs)
            functional.ascend_(ps, gs, s, variant=variant)
        err = max((p.full_tensor() - q).abs().max().item() for p, q in zip(params, plain_p))
        functional.restore_(params, backup)
        restored = all(torch.equal(p.full_tensor(), full[n]) for p, n in zip(params, ("rows", "one")))
        functional.rescale_(grads, torch.tensor(0.5, dtype=torch.float64))
        rescaled = all(torch.equal(g.full_tensor(), full[n].flip(0) * 0.25) for g, n in zip(grads, ("rows", "one")))
        ascended[variant] = {"max_err": err, "restored": restored, "rescaled": rescaled}
    return {"full": full, "norms": {k: v.item() for k, v in norms.items()}, "comms": comms,
            "partial_error": partial_error, "ascended": ascended}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--runs", required=True, help="JSON list of run specs")
    parser.add_argument("--expect_world_size", type=int, default=2)
    ns = parser.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    if dist.get_world_size() != ns.expect_world_size:
        raise SystemExit(f"expected world size {ns.expect_world_size}, got {dist.get_world_size()}")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for spec in json.loads(ns.runs):
        kind = spec.get("kind", "equivalence")
        if kind == "equivalence":
            result = run_equivalence(spec, mesh)
        elif kind == "linreg":
            result = run_linreg(spec, mesh)
        elif kind == "resume":
            result = run_resume(spec, mesh, ns.out)
        else:
            result = run_norms(spec)
        result["world_size"] = dist.get_world_size()
        torch.save(result, os.path.join(ns.out, f"{spec['name']}.rank{dist.get_rank()}.pt"))
    leave()


if __name__ == "__main__":
    main()
