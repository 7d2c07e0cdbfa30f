"""Peak memory per rank under FSDP2 (`fully_shard`): plain training vs SSAMOptimizer, side by side.

Commands (from the repository root)::

    .venv/bin/python bench/fsdp_memory.py                      # 2 CPU processes (gloo), MLP of 8 x 1024² blocks
    .venv/bin/python bench/fsdp_memory.py --nproc 4 --width 2048
    .venv/bin/python bench/fsdp_memory.py --quick              # tiny smoke configuration, seconds
    .venv/bin/python bench/fsdp_memory.py --nproc 8 --device cuda   # 8 GPUs (nccl)

The script launches itself with torchrun twice, once per mode, so that each mode starts from a fresh
process: ``plain`` (AdamW on the sharded model: forward, backward, step) and ``ssam`` (the same AdamW
wrapped in ``SSAMOptimizer``: two forward/backward passes per step). The model is built on the meta device
and materialized shard by shard, so no rank ever holds the whole model. Each rank reports its peak memory
above what it held before the model was built: on CPU the resident-set high-water mark (``VmHWM``, reset
through ``/proc/self/clear_refs`` at that point; the workers run with ``MALLOC_MMAP_THRESHOLD_=131072`` so
glibc returns freed tensor-sized blocks and the mark follows the live tensors), with CUDA
``torch.cuda.max_memory_allocated``. The expected extra of SSAM is its weight backup, sharded like the
weights: parameter bytes / world size per rank.

Outputs (``--out``, default ``outputs/bench/fsdp_memory/``): ``fsdp_memory.csv`` (one row per rank) and the
per-rank JSON files of both modes.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
from pathlib import Path

import _common  # noqa: I001  (before torch: pins the offline, single-threaded environment)

MIB = 2**20
#: glibc: serve (and return to the OS) every allocation of at least this many bytes with mmap.
MMAP_THRESHOLD = 128 * 1024


def _parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nproc", type=int, default=2, help="processes (ranks) on this machine")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--width", type=int, default=1024, help="features of every Linear layer")
    p.add_argument("--depth", type=int, default=8, help="blocks (each two width x width Linear layers)")
    p.add_argument("--batch", type=int, default=16, help="rows per rank")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="width 256, depth 2, 2 steps")
    p.add_argument("--out", type=Path, default=_common.default_out("fsdp_memory"))
    p.add_argument("--mode", choices=["plain", "ssam"], help=argparse.SUPPRESS)  # set for the launched workers
    ns = p.parse_args(argv)
    if ns.quick:
        ns.width, ns.depth, ns.steps = 256, 2, 2
    return ns


# --- worker (one rank, one mode) ----------------------------------------------------------------------------


def _reset_peak(device) -> int:
    """Start a new peak measurement; returns the bytes held now."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return int(torch.cuda.memory_allocated(device))
    return _common.reset_rss_peak()


def _peak(device) -> int:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device))
    return _common.proc_status_bytes("VmHWM")


def train(ns: argparse.Namespace, device, mesh, width: int, depth: int, steps: int):
    """Build the sharded model (shards only) and train it for ``steps`` steps in ``ns.mode``."""
    import torch
    from torch import nn
    from torch.distributed.fsdp import fully_shard

    from hf_ssam import SSAMOptimizer

    with torch.device("meta"):
        model = nn.Sequential(*[nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, width))
                                for _ in range(depth)])  # fmt: skip
    for block in model:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    model.to_empty(device=device)  # only the local shards are allocated
    with torch.no_grad():
        for p in model.parameters():
            p.to_local().normal_(0.0, width**-0.5)
    if ns.mode == "ssam":
        opt = SSAMOptimizer(model.parameters(), torch.optim.AdamW, variant="ssam", rho=0.05, lr=1e-4)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator(device=device).manual_seed(0)
    for _ in range(steps):
        x = torch.randn(ns.batch, width, generator=g, device=device)
        model(x).square().mean().backward()
        if ns.mode == "ssam":
            opt.first_step(zero_grad=True)
            model(x).square().mean().backward()
            opt.second_step(zero_grad=True)
        else:
            opt.step()
            opt.zero_grad(set_to_none=True)
    return model, opt


def worker(ns: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    torch.set_num_threads(1)
    if ns.device == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh(device.type, (world,))

    train(ns, device, mesh, width=64, depth=1, steps=1)  # warm-up: lazy imports, first-call buffers
    gc.collect()
    before = _reset_peak(device)
    model, opt = train(ns, device, mesh, ns.width, ns.depth, ns.steps)
    peak = _peak(device) - before
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())  # the whole model
    backup_bytes = 0
    if ns.mode == "ssam":
        backup_bytes = sum(b.to_local().numel() * b.element_size() for b in opt._backup.values())
    shard_bytes = sum(p.to_local().numel() * p.element_size() for p in model.parameters())
    result = {"rank": rank, "world": world, "mode": ns.mode, "peak_bytes": peak, "param_bytes": param_bytes,
              "shard_bytes": shard_bytes, "backup_bytes": backup_bytes, "device": str(device)}  # fmt: skip
    (ns.out / f"{ns.mode}.rank{rank}.json").write_text(json.dumps(result))
    dist.barrier()  # nobody tears the connections down while another process still uses them
    dist.destroy_process_group()
    # FSDP2's mesh still holds the process group, and a gloo worker thread that frees its last collective during
    # interpreter shutdown aborts the exit after the work is done (pytorch/pytorch#179291): skip that shutdown.
    sys.stdout.flush()
    os._exit(0)


# --- driver -------------------------------------------------------------------------------------------------


def launch(ns: argparse.Namespace, mode: str) -> None:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(MMAP_THRESHOLD), OMP_NUM_THREADS="1")
    args = ["--mode", mode, "--out", str(ns.out), "--device", ns.device, "--width", str(ns.width),
            "--depth", str(ns.depth), "--batch", str(ns.batch), "--steps", str(ns.steps)]  # fmt: skip
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ns.nproc),
           str(Path(__file__).resolve()), *args]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{mode} run failed:\n{proc.stderr[-4000:]}")


def main(argv: list[str] | None = None) -> None:
    ns = _parse(argv)
    ns.out.mkdir(parents=True, exist_ok=True)
    if ns.mode is not None:
        worker(ns)
        return
    for mode in ("plain", "ssam"):
        launch(ns, mode)
    rows = []
    for rank in range(ns.nproc):
        plain, ssam = (json.loads((ns.out / f"{m}.rank{rank}.json").read_text()) for m in ("plain", "ssam"))
        expected = plain["param_bytes"] / plain["world"]
        extra = ssam["peak_bytes"] - plain["peak_bytes"]
        rows.append({
            "rank": rank,
            "plain_peak_MiB": plain["peak_bytes"] / MIB,
            "ssam_peak_MiB": ssam["peak_bytes"] / MIB,
            "extra_MiB": extra / MIB,
            "params_per_world_MiB": expected / MIB,
            "extra/(params/world)": extra / expected,
            "backup_shard_MiB": ssam["backup_bytes"] / MIB,
            "weight_shard_MiB": ssam["shard_bytes"] / MIB,
        })  # fmt: skip
    _common.write_csv(ns.out / "fsdp_memory.csv", rows)
    info = _common.environment()
    model_mib = rows[0]["params_per_world_MiB"] * ns.nproc
    print(
        f"FSDP2 peak memory per rank: {ns.nproc} x {ns.device}, {ns.depth} blocks of 2 x {ns.width}², "
        f"{ns.batch} rows per rank, {ns.steps} steps, AdamW; model {model_mib:.1f} MiB (torch {info['torch']})"
    )
    print(_common.format_table(rows, list(rows[0]), floatfmt=".2f"))
    ratios = [r["extra/(params/world)"] for r in rows]
    print(_common.verdict(all(0.8 <= r <= 1.2 for r in ratios),
                          "SSAM's extra peak memory per rank is the sharded weight backup, param bytes / world size "
                          f"(measured {min(ratios):.2f}x to {max(ratios):.2f}x)"))  # fmt: skip
    print(_common.verdict(all(r["backup_shard_MiB"] == r["weight_shard_MiB"] for r in rows),
                          "the backup is sharded exactly like the weights"))  # fmt: skip


if __name__ == "__main__":
    main()
