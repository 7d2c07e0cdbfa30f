"""Peak memory per rank under DeepSpeed ZeRO-2 and ZeRO-3: the plain Trainer vs SSAMTrainer, side by side.

Commands (from the repository root)::

    .venv/bin/python bench/deepspeed_memory.py                 # 2 CPU processes (gloo), stages 2 and 3 (~2 min)
    .venv/bin/python bench/deepspeed_memory.py --stages 3 --width 2048
    .venv/bin/python bench/deepspeed_memory.py --quick         # tiny smoke configuration

Each (stage, mode) runs in its own torchrun launch, so each starts from fresh processes: ``plain``
(``sam_variant="none"``) and ``ssam`` (``sam_sync_ascent=True``), both `SSAMTrainer` with ``deepspeed=`` a ZeRO config,
SGD with momentum, gradient accumulation 2, on an MLP of ``depth`` blocks of two ``width²`` Linear layers. Each rank
reports its peak above what it held just before ``train()`` (the model built, the engine not yet): the resident-set
high-water mark (``VmHWM``, reset through ``/proc/self/clear_refs``; the workers run with
``MALLOC_MMAP_THRESHOLD_=131072`` so glibc returns freed tensor-sized blocks and the mark follows the live tensors).
Also printed: the bytes of the SAM step's weight backup on each rank.

What to expect (``docs/distributed.md``): under ZeRO-3 the backup, ``g`` and ``g_asc`` are this rank's partitions
(parameter bytes / world size each); under ZeRO-1/2 the weights are replicated, so the backup is a full copy, and
the SAM step reads ``g`` and ``g_asc`` in full (DeepSpeed's ``safe_get_full_grad``), about two more full fp32
copies at the peak.

Outputs (``--out``, default ``outputs/bench/deepspeed_memory/``): ``deepspeed_memory.csv`` and the per-rank JSON files.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import _common  # noqa: I001  (before torch: pins the offline, single-threaded environment)

MIB = 2**20
#: glibc: serve (and return to the OS) every allocation of at least this many bytes with mmap.
MMAP_THRESHOLD = 128 * 1024


def _parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nproc", type=int, default=2, help="processes (ranks) on this machine")
    p.add_argument("--stages", type=int, nargs="+", default=[2, 3], choices=[1, 2, 3])
    p.add_argument("--width", type=int, default=1024, help="features of every Linear layer")
    p.add_argument("--depth", type=int, default=4, help="blocks (each two width x width Linear layers)")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="width 128, depth 1, 1 step")
    p.add_argument("--out", type=Path, default=_common.default_out("deepspeed_memory"))
    p.add_argument("--mode", choices=["plain", "ssam"], help=argparse.SUPPRESS)  # set for the launched workers
    p.add_argument("--stage", type=int, help=argparse.SUPPRESS)
    ns = p.parse_args(argv)
    if ns.quick:
        ns.width, ns.depth, ns.steps = 128, 1, 1
    return ns


# --- worker (one rank, one stage, one mode) -------------------------------------------------------------------


def worker(ns: argparse.Namespace) -> None:
    import importlib

    import torch
    import torch.distributed as dist
    from torch import nn

    from hf_ssam import SSAMTrainer, SSAMTrainingArguments

    torch.set_num_threads(1)
    # DeepSpeed's CPU backend compiles a shared-memory op used only by inference all-reduces: not built here
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None

    class Wide(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            w = ns.width
            blocks = [nn.Sequential(nn.Linear(w, w), nn.GELU(), nn.Linear(w, w)) for _ in range(ns.depth)]
            self.net = nn.Sequential(*blocks)

        def forward(self, x, labels=None):
            return {"loss": (self.net(x).mean(-1) - labels).square().mean()}

    g = torch.Generator().manual_seed(0)
    data = [{"x": torch.randn(ns.width, generator=g), "labels": torch.randn((), generator=g)} for _ in range(64)]
    config = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
              "gradient_clipping": "auto", "zero_allow_untested_optimizer": True,
              "zero_optimization": {"stage": ns.stage}, "fp16": {"enabled": "auto"}}  # fmt: skip
    model = Wide()
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    with tempfile.TemporaryDirectory() as tmp:
        args = SSAMTrainingArguments(
            output_dir=tmp, report_to="none", use_cpu=True, save_strategy="no", disable_tqdm=True,
            max_steps=ns.steps, per_device_train_batch_size=4, gradient_accumulation_steps=2, optim="sgd",
            optim_args="momentum=0.9", learning_rate=1e-3, deepspeed=config,
            sam_variant="ssam" if ns.mode == "ssam" else "none", sam_sync_ascent=True,
        )  # fmt: skip
        trainer = SSAMTrainer(model=model, args=args, train_dataset=data)
        gc.collect()
        before = _common.reset_rss_peak()
        trainer.train()
        peak = _common.proc_status_bytes("VmHWM") - before
    backup = trainer._sam_zero_step.backup or []
    rank, world = dist.get_rank(), dist.get_world_size()
    backup_bytes = sum(b.numel() * b.element_size() for b in backup)
    result = {"rank": rank, "world": world, "stage": ns.stage, "mode": ns.mode, "peak_bytes": peak,
              "param_bytes": param_bytes, "backup_bytes": backup_bytes}  # fmt: skip
    (ns.out / f"z{ns.stage}-{ns.mode}.rank{rank}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)  # a gloo worker thread freeing its last collective at interpreter shutdown aborts the exit


# --- driver -------------------------------------------------------------------------------------------------


def launch(ns: argparse.Namespace, stage: int, mode: str) -> None:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(MMAP_THRESHOLD), OMP_NUM_THREADS="1")
    args = ["--mode", mode, "--stage", str(stage), "--out", str(ns.out), "--width", str(ns.width),
            "--depth", str(ns.depth), "--steps", str(ns.steps)]  # fmt: skip
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ns.nproc),
           str(Path(__file__).resolve()), *args]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"stage {stage} {mode} run failed:\n{proc.stderr[-4000:]}")


def main(argv: list[str] | None = None) -> list[dict]:
    ns = _parse(argv)
    ns.out.mkdir(parents=True, exist_ok=True)
    if ns.mode is not None:
        worker(ns)
        return []
    rows = []
    for stage in ns.stages:
        for mode in ("plain", "ssam"):
            launch(ns, stage, mode)
        for rank in range(ns.nproc):
            plain, ssam = (json.loads((ns.out / f"z{stage}-{m}.rank{rank}.json").read_text())
                           for m in ("plain", "ssam"))  # fmt: skip
            params = plain["param_bytes"]
            extra = ssam["peak_bytes"] - plain["peak_bytes"]
            rows.append({
                "stage": stage,
                "rank": rank,
                "params_MiB": params / MIB,
                "plain_peak_MiB": plain["peak_bytes"] / MIB,
                "ssam_peak_MiB": ssam["peak_bytes"] / MIB,
                "extra_MiB": extra / MIB,
                "extra/params": extra / params,
                "backup/params": ssam["backup_bytes"] / params,
            })  # fmt: skip
    _common.write_csv(ns.out / "deepspeed_memory.csv", rows)
    columns = ["stage", "rank", "params_MiB", "plain_peak_MiB", "ssam_peak_MiB", "extra_MiB", "extra/params",
               "backup/params"]  # fmt: skip
    print(f"world size {ns.nproc}, parameters {rows[0]['params_MiB']:.1f} MiB (fp32)")
    print(_common.format_table(rows, columns, floatfmt=".3g"))
    return rows


if __name__ == "__main__":
    main()
