"""Real multi-process training (2 CPU processes, gloo) launched with torchrun, as users launch it.

One launch trains every configuration; the tests then compare what the ranks saved. The worker checks
the world size itself, so a launcher that silently starts a single process fails here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).with_name("dist_worker.py")
VARIANTS = ["ssam", "sam", "usam", "asam", "none"]
REPLICA_RUNS = [
    {"name": f"{v}-ga{k}-{'sync' if sync else 'local'}", "variant": v, "batch": 4, "accumulation": k, "sync": sync,
     "dropout": 0.1, "max_grad_norm": 1.0}
    for v in VARIANTS for k in (1, 2) for sync in (False, True) if not (v == "none" and sync)
] + [
    {"name": f"mixin-ssam-ga2-{'sync' if sync else 'local'}", "variant": "ssam", "batch": 4, "accumulation": 2,
     "sync": sync, "dropout": 0.1, "max_grad_norm": 1.0, "mixin": True}
    for sync in (False, True)
] + [
    {"name": f"guarded-ssam-ga2-{'sync' if sync else 'local'}", "variant": "ssam", "batch": 4, "accumulation": 2,
     "sync": sync, "dropout": 0.1, "max_grad_norm": 1.0, "guard_host_sync": True}
    for sync in (False, True)
]  # fmt: skip
EQUIVALENCE = [{"name": f"eq-{v}", "variant": v, "sync": True, "rho": 0.1, "steps": 10} for v in ("ssam", "sam")]
EQUIVALENCE += [{"name": "eq-mixin-ssam", "variant": "ssam", "sync": True, "rho": 0.1, "steps": 10, "mixin": True}]
#: LookSAM-style reuse: step 0 plain, SAM on the odd steps, the kept direction reused on the even ones (GA 2).
REUSE_RUNS = [
    {"name": f"reuse-ssam-ga2-{'sync' if sync else 'local'}", "variant": "ssam", "batch": 4, "accumulation": 2,
     "sync": sync, "interval": 2, "start": 1, "reuse": True, "alpha": 0.7, "steps": 10, "max_grad_norm": 1.0}
    for sync in (False, True)
]  # fmt: skip
REUSE_SINGLE = {**REUSE_RUNS[1], "name": "reuse-ssam-ga2-sync-single", "batch": 8}  # one process, the global batch


def _launch(out: Path, runs: list[dict], nproc: int) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    worker_args = [str(WORKER), "--out", str(out), "--runs", json.dumps(runs), "--expect_world_size", str(nproc)]
    if nproc == 1:
        cmd = [sys.executable, *worker_args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
               *worker_args]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    two = REPLICA_RUNS + [{**r, "batch": 4} for r in EQUIVALENCE] + REUSE_RUNS
    _launch(out, two, nproc=2)
    _launch(out, [{**r, "name": r["name"] + "-single", "batch": 8} for r in EQUIVALENCE] + [REUSE_SINGLE], nproc=1)

    def load(name: str, rank: int = 0) -> dict:
        return torch.load(out / f"{name}.rank{rank}.pt")

    return load


@pytest.mark.parametrize("run", REPLICA_RUNS, ids=[r["name"] for r in REPLICA_RUNS])
def test_replicas_stay_bitwise_identical(results, run):
    r0, r1 = results(run["name"], 0), results(run["name"], 1)
    assert r0["world_size"] == r1["world_size"] == 2
    assert torch.equal(r0["weights"], r1["weights"]), (r0["weights"] - r1["weights"]).abs().max()
    assert len(r0["allreduce"]) == 20


@pytest.mark.parametrize("run", REPLICA_RUNS, ids=[r["name"] for r in REPLICA_RUNS])
def test_logged_metrics_are_the_same_on_every_rank(results, run):
    logs0, logs1 = results(run["name"], 0)["logs"], results(run["name"], 1)["logs"]
    assert logs0 == logs1
    if run["variant"] != "none":
        assert all("sam/gamma" in h for h in logs0 if "loss" in h)


@pytest.mark.parametrize("variant", ["ssam", "sam", "mixin-ssam"])
def test_synchronized_ascent_equals_one_process_with_the_global_batch(results, variant):
    two = results(f"eq-{variant}")["weights"]
    one = results(f"eq-{variant}-single")["weights"]
    err = (two - one).abs().max().item()
    assert err < 1e-5, err
    assert not torch.equal(two, results("none-ga1-local")["weights"])


def _per_step(results, name):
    counts = results(name)["allreduce"]
    return {k: sorted({c[k] for c in counts}) for k in counts[0]}


def test_local_ascent_sends_no_more_gradient_traffic_than_plain_training(results):
    plain = _per_step(results, "none-ga1-local")
    local = _per_step(results, "ssam-ga1-local")
    synced = _per_step(results, "ssam-ga1-sync")
    assert plain == {"ddp_buckets": [1], "explicit_tensor": [0], "explicit_scalar": [0]}
    # local ascent: no DDP all-reduce in either pass; one all-reduce of the whole SAM gradient per optimizer
    # step (the same bytes as DDP's bucket here), and the logged metrics' small all-reduce at logging steps
    assert local["ddp_buckets"] == [0] and local["explicit_tensor"] == [1]
    assert set(local["explicit_scalar"]) <= {0, 1}
    assert synced["ddp_buckets"] == [2] and synced["explicit_tensor"] == [0]


@pytest.mark.parametrize("prefix", ["", "mixin-", "guarded-"])
def test_accumulation_local_mode_reduces_once_per_optimizer_step(results, prefix):
    counts = _per_step(results, f"{prefix}ssam-ga2-local")
    assert counts["ddp_buckets"] == [0] and counts["explicit_tensor"] == [1]
    assert _per_step(results, f"{prefix}ssam-ga2-sync")["ddp_buckets"] == [4]  # 2 passes × 2 micro-batches


def test_accelerate_launch_starts_two_processes_on_cpu(tmp_path):
    """The documented CPU command: `accelerate launch --multi_gpu --num_processes 2 ...` really runs two."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    run = {"name": "accel", "variant": "ssam", "batch": 4, "steps": 5}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(WORKER),
           "--out", str(tmp_path), "--runs", json.dumps([run]), "--expect_world_size", "2"]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    r0, r1 = (torch.load(tmp_path / f"accel.rank{r}.pt") for r in (0, 1))
    assert r0["world_size"] == 2 and torch.equal(r0["weights"], r1["weights"])


# ------------------------------------------------------- sam_start + sam_interval + sam_reuse under DDP


LR, RHO, MOMENTUM, CLIP_EPS = 0.05, 0.1, 0.9, 1e-6
SHAPES = [(16, 8), (16,), (1, 16), (1,)]  # the worker's MLP, in `parameters()` order
#: float32 training against the float64 reference after 10 steps.
REUSE_TOLERANCE = 1e-5


def _kind(run: dict, step: int) -> str:
    start = run.get("start", 0)
    if run["variant"] == "none" or step < start:
        return "plain"
    if (step - start) % run.get("interval", 1) == 0:
        return "sam"
    return "reuse" if run.get("reuse") else "plain"


def _micro_batches(run: dict, r: dict) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One rank's micro-batches, in order; checks that each SAM micro-batch ran two forwards on one batch and every
    other micro-batch one."""
    inputs, ours, i = r["forward_inputs"], [], 0
    for step in range(run["steps"]):
        sam = _kind(run, step) == "sam"
        for _ in range(run["accumulation"]):
            if sam:
                assert all(torch.equal(a, b) for a, b in zip(inputs[i], inputs[i + 1]))
            ours.append((inputs[i][0].double(), inputs[i][1].double()))
            i += 2 if sam else 1
    assert i == len(inputs)
    return ours


def _grad(params: list[torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    params = [p.detach().requires_grad_(True) for p in params]
    w1, b1, w2, b2 = params
    loss = (((torch.tanh(x @ w1.T + b1) @ w2.T + b2).squeeze(-1) - y) ** 2).mean()
    return list(torch.autograd.grad(loss, params))


def _norm(ts: list[torch.Tensor]) -> torch.Tensor:
    return torch.sqrt(sum((t**2).sum() for t in ts))


def _dot(a: list[torch.Tensor], b: list[torch.Tensor]) -> torch.Tensor:
    return sum((x * y).sum() for x, y in zip(a, b))


def _flat(ts: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in ts])


def reuse_reference(run: dict, start: torch.Tensor, per_rank: list[list[tuple[torch.Tensor, torch.Tensor]]]):
    """SSAM with the schedule and LookSAM-style reuse, written out in float64 for replicas with local ascent (each
    replica's own g, e, v; the accumulated gradients and the kept directions averaged over replicas at the boundary)
    or one process (``per_rank`` of one replica: synchronized ascent on the global micro-batches). Trainer clipping
    and SGD with momentum. Returns the weights, the kept direction v and each replica's own v before averaging."""
    flat, params = start.double(), []
    for shape in SHAPES:
        n = int(torch.tensor(shape).prod())
        params.append(flat[:n].reshape(shape).clone())
        flat = flat[n:]
    k, alpha = run["accumulation"], run.get("alpha", 0.7)
    buffers, v, own = None, None, None
    for step in range(run["steps"]):
        kind = _kind(run, step)
        grads, directions = [], []
        for batches in per_rank:
            total, kept = [torch.zeros_like(p) for p in params], []
            for x, y in batches[step * k : (step + 1) * k]:
                g = _grad(params, x, y)
                if kind == "sam":
                    g_asc = _grad([p + RHO * t for p, t in zip(params, g)], x, y)  # at w + ρ·g
                    coef = _dot(g_asc, g) / _norm(g) ** 2
                    kept.append([a - coef * t for a, t in zip(g_asc, g)])  # v = g_asc − (⟨g_asc, g⟩/‖g‖²)·g
                    g = [_norm(g) / _norm(g_asc) * t for t in g_asc]  # SSAM: γ·g_asc
                elif kind == "reuse":
                    mixed = [t + alpha * _norm(g) / _norm(v) * d for t, d in zip(g, v)]  # g + α·(‖g‖/‖v‖)·v
                    g = [_norm(g) / _norm(mixed) * t for t in mixed]  # rescaled to ‖g‖ (SSAM)
                total = [a + t / k for a, t in zip(total, g)]
            grads.append(total)
            if kept:
                directions.append([sum(ts) / k for ts in zip(*kept)])  # the micro-batches' mean
        grad = [sum(ts) / len(per_rank) for ts in zip(*grads)]  # the replicas' mean
        if directions:
            own = [_flat(d) for d in directions]
            v = [sum(ts) / len(per_rank) for ts in zip(*directions)]
        clip = min(1.0, run["max_grad_norm"] / (float(_norm(grad)) + CLIP_EPS))
        grad = [clip * t for t in grad]
        buffers = grad if buffers is None else [MOMENTUM * b + t for b, t in zip(buffers, grad)]
        params = [p - LR * b for p, b in zip(params, buffers)]
    return _flat(params), _flat(v), own


def _reference_of(results, run: dict, **changes):
    run = {**run, **changes}
    r0, r1 = results(run["name"], 0), results(run["name"], 1)
    ranks = [_micro_batches(run, r0), _micro_batches(run, r1)]
    if run["sync"]:  # synchronized ascent: one process on the global micro-batches
        ranks = [[(torch.cat([a[0], b[0]]), torch.cat([a[1], b[1]])) for a, b in zip(*ranks)]]
    return reuse_reference(run, r0["start"], ranks)


@pytest.mark.parametrize("run", REUSE_RUNS, ids=[r["name"] for r in REUSE_RUNS])
def test_reuse_replicas_stay_bitwise_identical_and_keep_one_direction(results, run):
    r0, r1 = results(run["name"], 0), results(run["name"], 1)
    assert r0["world_size"] == r1["world_size"] == 2
    assert torch.equal(r0["weights"], r1["weights"]), (r0["weights"] - r1["weights"]).abs().max()
    assert r0["direction"] is not None and torch.equal(r0["direction"], r1["direction"])
    assert r0["logs"] == r1["logs"]
    assert not torch.equal(r0["forward_inputs"][0][0], r1["forward_inputs"][0][0])  # each replica its own data


@pytest.mark.parametrize("run", [*REUSE_RUNS, REUSE_SINGLE], ids=[r["name"] for r in [*REUSE_RUNS, REUSE_SINGLE]])
def test_reuse_steps_use_the_kept_direction(results, run):
    logs = [h for h in results(run["name"])["logs"] if "loss" in h]
    kinds = [_kind(run, step) for step in range(run["steps"])]
    assert kinds[:4] == ["plain", "sam", "reuse", "sam"]
    assert [h["sam/reused"] for h in logs] == [1.0 if kind == "reuse" else 0.0 for kind in kinds]
    assert all(h["sam/skipped"] == 0 for h in logs)
    assert ["sam/gamma" in h for h in logs] == [kind == "sam" for kind in kinds]  # two passes on SAM steps only


@pytest.mark.parametrize("run", REUSE_RUNS, ids=[r["name"] for r in REUSE_RUNS])
def test_reuse_equals_the_float64_reference(results, run):
    weights, v, own = _reference_of(results, run)
    for rank in (0, 1):
        r = results(run["name"], rank)
        err = (r["weights"].double() - weights).abs().max().item()
        assert err < REUSE_TOLERANCE, err
        err_v = ((r["direction"].double() - v).norm() / v.norm()).item()
        assert err_v < REUSE_TOLERANCE, err_v
    # the reuse steps changed the run: without reuse (plain steps between SAM steps) the weights differ
    plain_between, _, _ = _reference_of(results, run, reuse=False)
    assert (plain_between - weights).abs().max() > 1e3 * REUSE_TOLERANCE
    if not run["sync"]:  # local ascent: each replica kept its own v; what every replica holds is their mean
        assert ((own[0] - own[1]).norm() / v.norm()).item() > 1e3 * REUSE_TOLERANCE
        assert ((results(run["name"])["direction"].double() - own[0]).norm() / v.norm()).item() > 1e2 * REUSE_TOLERANCE


def test_reuse_synchronized_ascent_equals_one_process_with_the_global_batch(results):
    two, one = results(REUSE_RUNS[1]["name"]), results(REUSE_SINGLE["name"])
    err = (two["weights"] - one["weights"]).abs().max().item()
    assert err < 1e-5, err
    err_v = ((two["direction"] - one["direction"]).norm() / one["direction"].norm()).item()
    assert err_v < 1e-5, err_v
    local = results(REUSE_RUNS[0]["name"])  # local ascent is another step: the comparison can tell them apart
    assert (local["weights"] - one["weights"]).abs().max() > 1e-3
