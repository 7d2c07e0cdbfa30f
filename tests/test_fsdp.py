"""SSAMOptimizer under FSDP2 (`fully_shard`): 2 CPU processes (gloo) launched with torchrun, as users launch them.

One launch runs every configuration (tests/fsdp_worker.py); the tests compare what the ranks saved with one
unsharded process on the whole batch, with the float64 hand computation and with plain sums of squares.
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
WORKER = Path(__file__).with_name("fsdp_worker.py")
#: Every variant with its default renormalization and with the other choice (`usam` is ssam without it).
VARIANT_RENORM = [(v, None) for v in VARIANTS] + [(v, True) for v in ("sam", "usam", "asam")]
EQUIVALENCE = [
    {"name": f"eq-{v}-{'default' if r is None else f'renorm{r}'}-{o}", "variant": v, "renormalize": r,
     "optimizer": o, "rho": 0.2 if v == "asam" else 0.1, "steps": 5}
    for v, r in VARIANT_RENORM for o in ("sgd", "adamw")
] + [{"name": "eq-ssam-closure-sgd", "variant": "ssam", "optimizer": "sgd", "api": "closure", "steps": 5}]  # fmt: skip
THETA, X, Y = data()
LINREG = [{"name": f"linreg-{v}-{r}", "kind": "linreg", "variant": v, "renormalize": r, "rho": 0.2, "lr": 0.1,
           "theta": THETA.tolist(), "x": X.tolist(), "y": Y.tolist()} for v, r in VARIANT_RENORM]  # fmt: skip
RESUME = [{"name": f"resume-{v}-{o}", "kind": "resume", "variant": v, "optimizer": o}
          for v, o in (("ssam", "adamw"), ("asam", "sgd"))]  # fmt: skip
NORMS = {"name": "norms", "kind": "norms"}
#: Equivalence to one process on the whole batch, float32 weights after 5 steps.
TOLERANCE = 1e-6


def _env() -> dict[str, str]:
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}


def _torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]


def _failure(stderr: str) -> str:
    """Rank 0's traceback when there is one, else the end of the launcher's output."""
    lines = [line for line in stderr.splitlines() if line.startswith("[rank0]")]
    return "\n".join(lines)[-4000:] if lines else stderr[-4000:]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    runs = (EQUIVALENCE + LINREG + RESUME if FSDP2_ON_CPU else []) + [NORMS]  # NORMS: DTensors without FSDP2
    cmd = _torchrun(str(WORKER), "--out", str(out), "--runs", json.dumps(runs))
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, _failure(proc.stderr)

    def load(name: str, rank: int = 0) -> dict:
        return torch.load(out / f"{name}.rank{rank}.pt", weights_only=False)

    return load


@needs_fsdp2_on_cpu
@pytest.mark.parametrize("run", EQUIVALENCE, ids=[r["name"] for r in EQUIVALENCE])
def test_two_sharded_processes_equal_one_process_on_the_whole_batch(results, run):
    for rank in (0, 1):
        r = results(run["name"], rank)
        assert r["world_size"] == 2
        err = (r["sharded"] - r["single"]).abs().max().item()
        assert err < TOLERANCE, (rank, err)
    r0, r1 = results(run["name"], 0), results(run["name"], 1)
    assert r0["metrics"] == r1["metrics"]  # ‖g‖, ‖g_asc‖, γ are global: the same on every rank
    assert (r0["sharded"] - r0["start"]).abs().max() > 100 * TOLERANCE  # the weights did move


@needs_fsdp2_on_cpu
@pytest.mark.parametrize("run", EQUIVALENCE, ids=[r["name"] for r in EQUIVALENCE])
def test_the_step_gathers_nothing_and_all_reduces_only_scalars(results, run):
    comms = dict(results(run["name"])["comms"])
    per_step = 3 if run["variant"] == "asam" else 2  # ‖g‖ (and ASAM's ‖T·g‖), then ‖g_asc‖
    assert comms.pop("c10d.allreduce_") == per_step * run["steps"]
    if run.get("api") == "closure":  # the counts include the closure's two forward + backward passes
        plain = results(run["name"])["plain_comms"]
        assert set(plain) == {"c10d._allgather_base_", "c10d._reduce_scatter_base_"}, plain
        assert comms == {k: 2 * n for k, n in plain.items()}  # twice the all-gathers and reduce-scatters
    else:
        assert comms == {}, comms


@needs_fsdp2_on_cpu
@pytest.mark.parametrize("run", EQUIVALENCE[:2], ids=[r["name"] for r in EQUIVALENCE[:2]])
def test_the_weight_backup_is_sharded_like_the_parameters(results, run):
    for rank in (0, 1):
        r = results(run["name"], rank)
        assert r["backup_is_dtensor"]
        assert r["backup_local_numel"] == r["params_local_numel"]
    total = results(run["name"], 0)["sharded"].numel()
    assert results(run["name"], 0)["backup_local_numel"] + results(run["name"], 1)["backup_local_numel"] == total


@needs_fsdp2_on_cpu
@pytest.mark.parametrize("run", LINREG, ids=[r["name"] for r in LINREG])
def test_one_sharded_step_matches_the_float64_hand_computation(results, run):
    g_sam, (g_norm, g_asc_norm, gamma, _) = sam_gradient(run["variant"], THETA, X, Y, run["rho"], run["renormalize"])
    for rank in (0, 1):
        r = results(run["name"], rank)
        np.testing.assert_allclose(r["theta"].numpy(), THETA - run["lr"] * g_sam, rtol=0, atol=1e-12)
        assert r["metrics"]["grad_norm"] == pytest.approx(g_norm, abs=1e-12)
        assert r["metrics"]["ascent_grad_norm"] == pytest.approx(g_asc_norm, abs=1e-12)
        assert r["metrics"]["gamma"] == pytest.approx(gamma, abs=1e-12)


@needs_fsdp2_on_cpu
@pytest.mark.parametrize("run", RESUME, ids=[r["name"] for r in RESUME])
def test_sharded_state_dict_round_trip_resumes_exactly(results, run):
    for rank in (0, 1):
        r = results(run["name"], rank)
        assert r["sharded_state"]
        assert torch.equal(r["resumed"], r["straight"]), (r["resumed"] - r["straight"]).abs().max()
        assert torch.equal(r["in_memory"], r["straight"]), (r["in_memory"] - r["straight"]).abs().max()


def test_global_norm_counts_every_element_once_whatever_the_placement(results):
    r = results("norms")
    full = {k: v.numpy() for k, v in r["full"].items()}
    for name in ("rows", "cols", "rep", "one", "d2", "d2b"):
        assert r["norms"][name] == pytest.approx(np.sqrt((full[name] ** 2).sum()), abs=1e-12), name
    everything = np.sqrt(sum((v**2).sum() for v in full.values()))
    assert r["norms"]["all"] == pytest.approx(everything, abs=1e-12)
    assert results("norms", 1)["norms"] == r["norms"]
    assert set(r["comms"]) == {"c10d.allreduce_"}  # scalars only, nothing gathered
    assert "Partial" in r["partial_error"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_shardwise_maths_equals_the_maths_on_full_tensors(results, variant):
    for rank in (0, 1):
        a = results("norms", rank)["ascended"][variant]
        assert a["max_err"] < 1e-12 and a["restored"] and a["rescaled"], a


@needs_fsdp2_on_cpu
def test_the_fsdp2_example_runs_on_two_cpu_processes(tmp_path):
    """The documented CPU command: `torchrun --standalone --nproc_per_node 2 docs/examples/fsdp2_loop.py`."""
    cmd = _torchrun(str(ROOT / "docs" / "examples" / "fsdp2_loop.py"))
    proc = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, _failure(proc.stderr)
    assert "2 process(es)" in proc.stdout
    assert len(list((tmp_path / "outputs" / "fsdp2_checkpoint").glob("*.distcp"))) == 2  # one shard file per rank


@pytest.mark.slow
def test_the_memory_bench_runs(tmp_path):
    cmd = [sys.executable, str(ROOT / "bench" / "fsdp_memory.py"), "--quick", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "the backup is sharded exactly like the weights" in proc.stdout
    assert (tmp_path / "fsdp_memory.csv").is_file()


@pytest.mark.parametrize("name, machines, processes", [("fsdp2_8gpu", 1, 8), ("fsdp2_2x8gpu", 2, 16)])
def test_fsdp2_accelerate_configs_load(name, machines, processes):
    from accelerate.commands.config.config_args import ClusterConfig

    path = ROOT / "recipes" / "accelerate" / f"{name}.yaml"
    config = ClusterConfig.from_yaml_file(str(path))
    assert config.distributed_type == "FSDP" and config.mixed_precision == "bf16"
    assert (config.num_machines, config.num_processes) == (machines, processes)
    assert config.fsdp_config["fsdp_version"] == 2
    assert path.read_text().startswith("#")
