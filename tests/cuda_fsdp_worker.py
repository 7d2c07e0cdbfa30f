"""Worker for tests/test_cuda.py: SSAMTrainer under FSDP2 with one process on the GPU (torchrun, nccl).

    torchrun --standalone --nproc_per_node 1 tests/cuda_fsdp_worker.py --out /tmp/f

Trains the MLP of tests/fsdp_trainer_worker.py (two `Block` FSDP units and the root) for 4 steps with accumulation 2,
as a user's script would on one GPU (``fsdp=True, fsdp_config={"fsdp_version": 2}``), every ``training_step`` under
``torch.cuda.set_sync_debug_mode("error")``; writes <out>/fsdp-gpu.pt: the weights at the start and the end, the
inputs of every forward pass (for the float64 reference of tests/test_fsdp_trainer.py), the sync error if there
was one (the run is then repeated without the sync check), and the layout (DTensor shards on the GPU, backend).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's hf_ssam

from _teardown import leave  # noqa: E402  (tests/, the script's own folder)
from fsdp_trainer_worker import MLP, InOrder, Regression, full_weights, make_args  # noqa: E402

SPEC = {"name": "fsdp-gpu-ssam-ga2", "variant": "ssam", "accumulation": 2}


class SyncChecked(InOrder):
    """Every `training_step` under CUDA's sync debug mode "error": a host synchronisation raises."""

    check_sync = True

    def training_step(self, *args, **kwargs):
        if not self.check_sync:
            return super().training_step(*args, **kwargs)
        previous = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("error")
        try:
            return super().training_step(*args, **kwargs)
        finally:
            torch.cuda.set_sync_debug_mode(previous)


def train(out: str, check_sync: bool) -> tuple[SyncChecked, torch.Tensor, list]:
    model = MLP()
    seen: list = []  # device tensors: a copy to the host inside the step would itself be a sync
    model.register_forward_pre_hook(
        lambda m, a, kw: seen.append((kw["x"].detach().clone(), kw["labels"].detach().clone())), with_kwargs=True
    )
    args = make_args(out, SPEC, use_cpu=False)
    trainer = SyncChecked(model=model, args=args, train_dataset=Regression(False))
    trainer.check_sync = check_sync
    start = full_weights(trainer.model).cpu()
    trainer.train()
    return trainer, start, seen


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    ns = parser.parse_args()
    sync_error = None
    try:
        trainer, start, seen = train(ns.out, check_sync=True)
    except RuntimeError as err:  # a host synchronisation inside the step: recorded, and trained again without
        sync_error = str(err).splitlines()[0]
        trainer, start, seen = train(ns.out, check_sync=False)
    model = trainer.model
    params = list(model.parameters())
    result = {
        "sync_error": sync_error,
        "start": start,
        "weights": full_weights(model).cpu(),
        "forward_inputs": [(x.cpu(), y.cpu()) for x, y in seen],
        "logs": [{k: v for k, v in h.items() if k.startswith("sam/")} for h in trainer.state.log_history],
        "world_size": dist.get_world_size(),
        "backend": str(dist.get_backend()),
        "distributed_type": str(trainer.accelerator.state.distributed_type),
        "params_are_dtensors": all(isinstance(p, DTensor) for p in params),
        "param_devices": sorted({str(p.device.type) for p in params}),
        "fsdp_units": sum(isinstance(m, FSDPModule) for m in model.modules()),
        "backup_devices": sorted({str(b.device.type) for b in trainer._sam_backup or []}),
    }
    torch.save(result, os.path.join(ns.out, "fsdp-gpu.pt"))
    leave()


if __name__ == "__main__":
    main()
