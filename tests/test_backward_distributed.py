"""`SSAMBackward` in hand-written Accelerate loops on 2 CPU processes (gloo), launched with torchrun as users do.

One launch runs every configuration (tests/backward_worker.py): ``Accelerator(cpu=True,
gradient_accumulation_steps=2)``, SGD with momentum, each rank given its half of every global micro-batch by hand
(no prepared DataLoader, so the rows each rank saw are known here).

* DDP (``accelerator.prepare`` of a float64 linear model): the weights are compared with the float64 numpy
  reference of tests/_reference.py — for ``sync_ascent=True`` one process on the whole micro-batches, for
  ``sync_ascent=False`` the mean over the replicas' own half-batch SAM gradients — and the replicas with each other.
* FSDP2 through ``accelerator.prepare`` with Accelerate's FSDP plugin (``fsdp_version=2``; the worker explains how
  Accelerate's FSDP is enabled on CPU processes, as in tests/fsdp_trainer_worker.py), a float64 MLP: the full
  weights are compared with the same loop run unsharded by ``SSAMBackward`` without an accelerator.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from _reference import data, sam_gradient
from _versions import FSDP2_ON_CPU, needs_fsdp2_on_cpu

from hf_ssam import VARIANTS

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("backward_worker.py")
WORLD, K, STEPS, GLOBAL_BATCH = 2, 2, 3, 4  # 2 ranks × 2 rows per micro-batch, 2 micro-batches per step
LR, MOMENTUM, RHO, D, SEED = 0.1, 0.9, 0.2, 3, 0
THETA, X, Y = data(n=GLOBAL_BATCH * K * STEPS, d=D, seed=SEED)
#: float64 weights against the float64 numpy reference after 3 steps.
TOLERANCE = 1e-10

DDP = [
    {"name": f"ddp-{v}-{'sync' if sync else 'local'}", "kind": "ddp", "variant": v, "sync": sync, "n": len(X),
     "d": D, "seed": SEED, "lr": LR, "momentum": MOMENTUM, "rho": RHO, "global_batch": GLOBAL_BATCH}
    for v in VARIANTS for sync in (True, False)
]  # fmt: skip
FSDP2 = [
    {"name": f"fsdp2-{v}", "kind": "fsdp2", "variant": v, "seed": 3, "lr": 0.05, "momentum": MOMENTUM, "rho": 0.1,
     "global_batch": 8, "steps": STEPS}
    for v in VARIANTS
]  # fmt: skip
METRICS = ("sam/grad_norm", "sam/ascent_grad_norm", "sam/gamma", "sam/ascent_loss")


def _failure(stderr: str) -> str:
    """Rank 0's traceback when there is one, else the end of the launcher's output."""
    lines = [line for line in stderr.splitlines() if line.startswith("[rank0]")]
    return "\n".join(lines)[-4000:] if lines else stderr[-4000:]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("backward")
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": path}
    runs = DDP + (FSDP2 if FSDP2_ON_CPU else [])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(WORLD), str(WORKER),
           "--out", str(out), "--runs", json.dumps(runs), "--expect_world_size", str(WORLD)]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, _failure(proc.stderr)

    def load(name: str, rank: int = 0) -> dict:
        return torch.load(out / f"{name}.rank{rank}.pt", weights_only=False)

    return load


def reference(variant: str, sync: bool) -> tuple[np.ndarray, list[dict[str, float]]]:
    """SGD with momentum on the mean of the SAM gradients, in float64 numpy, and the ``sam/*`` averages per step.

    ``sync``: one SAM gradient per global micro-batch (one process on the whole micro-batch); otherwise one per
    rank's half of it, each perturbed with that half's own gradient, and averaged over ranks and micro-batches.
    """
    theta, buf, logs = THETA, None, []
    half = GLOBAL_BATCH // WORLD
    for s in range(STEPS):
        grads, stats = [], []
        for i in range(K):
            lo = (s * K + i) * GLOBAL_BATCH
            parts = [(lo, lo + GLOBAL_BATCH)] if sync else [(lo + r * half, lo + (r + 1) * half) for r in range(WORLD)]
            for a, b in parts:
                g, st = sam_gradient(variant, theta, X[a:b], Y[a:b], RHO)
                grads.append(g)
                stats.append(st)
        g = np.mean(grads, axis=0)
        buf = g if buf is None else MOMENTUM * buf + g  # torch's SGD: the first step's buffer is the gradient
        theta = theta - LR * buf
        logs.append(dict(zip(METRICS, np.mean(stats, axis=0))))
    return theta, logs


def _run(variant: str, sync: bool) -> dict:
    return next(r for r in DDP if r["variant"] == variant and r["sync"] is sync)


def _error(a, b) -> float:
    return float(np.abs(np.asarray(a) - np.asarray(b)).max())


@pytest.mark.parametrize("variant", VARIANTS)
def test_sync_ascent_equals_one_process_on_the_whole_micro_batches(results, variant):
    expected, _ = reference(variant, sync=True)
    for rank in range(WORLD):
        r = results(_run(variant, True)["name"], rank)
        assert r["world_size"] == WORLD and r["rows_per_rank"] == GLOBAL_BATCH // WORLD
        assert r["model_type"] == "DistributedDataParallel" and r["distributed_type"] == "DistributedType.MULTI_CPU"
        err = _error(r["theta"].numpy(), expected)
        assert err < TOLERANCE, (rank, err)


@pytest.mark.parametrize("variant", VARIANTS)
def test_local_ascent_equals_the_mean_of_the_replicas_own_sam_gradients(results, variant):
    expected, _ = reference(variant, sync=False)
    for rank in range(WORLD):
        r = results(_run(variant, False)["name"], rank)
        assert r["model_type"] == "DistributedDataParallel"
        err = _error(r["theta"].numpy(), expected)
        assert err < TOLERANCE, (rank, err)


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_two_modes_are_different_steps(results, variant):
    """Each mode matching its own reference means something only if the references (and runs) are far apart."""
    sync, _ = reference(variant, sync=True)
    local, _ = reference(variant, sync=False)
    assert _error(sync, local) > 1e4 * TOLERANCE
    assert min(_error(sync, THETA), _error(local, THETA)) > 1e-2  # the weights moved
    measured = [results(_run(variant, s)["name"])["theta"].numpy() for s in (True, False)]
    assert _error(*measured) > 1e4 * TOLERANCE


@pytest.mark.parametrize("run", DDP, ids=[r["name"] for r in DDP])
def test_replicas_are_bitwise_identical(results, run):
    t0, t1 = results(run["name"], 0)["theta"], results(run["name"], 1)["theta"]
    assert torch.equal(t0, t1), (t0 - t1).abs().max()


@pytest.mark.parametrize("run", DDP, ids=[r["name"] for r in DDP])
def test_metrics_are_identical_on_both_ranks_and_average_over_ranks_and_micro_batches(results, run):
    logs0, logs1 = results(run["name"], 0)["logs"], results(run["name"], 1)["logs"]
    assert logs0 == logs1
    _, expected = reference(run["variant"], run["sync"])
    assert len(logs0) == STEPS
    for got, want in zip(logs0, expected):
        assert got["sam/skipped"] == 0
        for key in METRICS:  # local ascent: the ranks' own norms differ, so an unreduced value would fail here
            assert got[key] == pytest.approx(want[key], rel=1e-10, abs=1e-12), key


@needs_fsdp2_on_cpu
@pytest.mark.parametrize("run", FSDP2, ids=[r["name"] for r in FSDP2])
def test_fsdp2_through_accelerate_prepare_equals_the_unsharded_run(results, run):
    r0, r1 = results(run["name"], 0), results(run["name"], 1)
    for r in (r0, r1):
        assert r["distributed_type"] == "DistributedType.FSDP"
        assert r["fsdp_units"] == 3  # each Block and the root
        assert r["params_are_dtensors"] and r["opt_params_are_dtensors"] and r["param_dtype"] == "torch.float64"
        err = _error(r["sharded"], r["single"])
        assert err < TOLERANCE, err
        assert _error(r["sharded"], r["start"]) > 1e-2  # the weights moved
    assert r0["local_numel"] + r1["local_numel"] == r0["sharded"].numel()  # sharded, not replicated
    assert torch.equal(r0["sharded"], r1["sharded"])
    assert r0["logs"] == r1["logs"] and len(r0["logs"]) == STEPS
    for got, want in zip(r0["logs"], r0["ref_logs"]):  # the global ‖g‖, γ, ... of the whole micro-batches
        assert got == pytest.approx(want, rel=1e-10, abs=1e-12)


@needs_fsdp2_on_cpu
def test_fsdp2_runs_tell_the_variants_apart(results):
    finals = [results(run["name"])["sharded"] for run in FSDP2]
    assert all(_error(a, b) > 1e-6 for i, a in enumerate(finals) for b in finals[i + 1 :])


@needs_fsdp2_on_cpu
def test_fsdp2_refuses_local_ascent_with_the_reason(results):
    for rank in range(WORLD):
        message = results(FSDP2[0]["name"], rank)["refusal"]
        assert "sync_ascent=False is not supported under FSDP2" in message and "sync_ascent=True" in message
