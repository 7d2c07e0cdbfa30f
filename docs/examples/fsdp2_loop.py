"""SSAMOptimizer over a model sharded with FSDP2 (`fully_shard`): each process keeps 1/N of the weights.

    torchrun --standalone --nproc_per_node 2 docs/examples/fsdp2_loop.py   # 2 CPU processes (gloo)
    torchrun --standalone --nproc_per_node 8 docs/examples/fsdp2_loop.py   # 8 GPUs (nccl)
    python docs/examples/fsdp2_loop.py                                     # one process

Each process trains on its own part of every batch; FSDP2 averages the gradients over the processes,
so the step is that of one process on the whole batch. Halfway, the sharded model and optimizer state
are written with torch.distributed.checkpoint (DCP) and read back into fresh objects.
"""

import os
import sys
import tempfile

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from hf_ssam import SSAMOptimizer

launched = "RANK" in os.environ  # started by torchrun (or accelerate launch)
if torch.cuda.is_available():
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    torch.cuda.set_device(device)
else:
    device = torch.device("cpu")
backend = "nccl" if device.type == "cuda" else "gloo"
if launched:
    dist.init_process_group(backend)
else:  # a single process still needs a process group for FSDP
    store = tempfile.TemporaryDirectory()
    dist.init_process_group(backend, init_method=f"file://{store.name}/store", rank=0, world_size=1)
rank, world = dist.get_rank(), dist.get_world_size()
mesh = init_device_mesh(device.type, (world,))


def build() -> nn.Module:
    torch.manual_seed(0)  # the same initial weights on every process
    blocks = [nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32)) for _ in range(3)]
    model = nn.Sequential(*blocks, nn.Linear(32, 4)).to(device)
    for block in model:
        fully_shard(block, mesh=mesh)  # each block gathers its weights only while it runs
    return fully_shard(model, mesh=mesh)  # the root: parameters, gradients, optimizer state are DTensor shards


def make_optimizer(model: nn.Module) -> SSAMOptimizer:
    return SSAMOptimizer(model.parameters(), torch.optim.AdamW, variant="ssam", rho=0.05, lr=3e-3, weight_decay=0.01)


gen = torch.Generator().manual_seed(0)
x_all = torch.randn(512, 32, generator=gen)
y_all = (x_all[:, :4] * 2 + 0.1 * torch.randn(512, 4, generator=gen)).argmax(-1)
per_process = 64 // world  # global batch 64, split over the processes


def train(model: nn.Module, opt: SSAMOptimizer, steps: range) -> float:
    for step in steps:
        rows = slice(step * 64 % 512 + rank * per_process, step * 64 % 512 + (rank + 1) * per_process)
        x, y = x_all[rows].to(device), y_all[rows].to(device)
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()  # FSDP: all-gather each block's weights, reduce-scatter the gradients
        opt.first_step(zero_grad=True)  # w ← w + e on the local shards (norms: one scalar all-reduce)
        nn.functional.cross_entropy(model(x), y).backward()  # the same batch at w + e
        opt.second_step(zero_grad=True)  # w restored from the sharded backup, γ·g_asc, AdamW step
    loss = loss.detach().reshape(1)
    dist.all_reduce(loss)  # the loss of the whole batch (read once, at the end)
    return loss.item() / world


model = build()
opt = make_optimizer(model)
first_loss = train(model, opt, range(0, 1))
train(model, opt, range(1, 15))
shard_bytes = sum(p.to_local().numel() * p.element_size() for p in model.parameters())  # this process's
model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())  # the whole model

# Checkpoint: every process writes its own shards (a folder all processes see); the optimizer state is the
# base optimizer's.
checkpoint = "outputs/fsdp2_checkpoint"
model_sd, optim_sd = get_state_dict(model, opt.base_optimizer)
dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=checkpoint)

model = build()  # fresh objects, as in a new job
opt = make_optimizer(model)
model_sd, optim_sd = get_state_dict(model, opt.base_optimizer)
dcp.load({"model": model_sd, "optim": optim_sd}, checkpoint_id=checkpoint)
set_state_dict(model, opt.base_optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd)
opt.load_state_dict(opt.base_optimizer.state_dict())  # SSAMOptimizer shares the reloaded param groups
last_loss = train(model, opt, range(15, 30))

if rank == 0:
    print(f"{world} process(es): loss {first_loss:.3f} -> {last_loss:.3f}")
    print(f"rank 0 holds {shard_bytes} of the model's {model_bytes} weight bytes (the SSAM backup: as many)")
assert last_loss < first_loss
dist.barrier()  # every process is done communicating before any tears its connections down
dist.destroy_process_group()
if launched:
    # FSDP2's mesh still holds the process group, and a gloo worker thread that frees its last collective during
    # interpreter shutdown aborts the exit after the work is done (pytorch/pytorch#179291): skip that shutdown.
    sys.stdout.flush()
    os._exit(0)
