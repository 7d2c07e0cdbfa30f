"""SSAMTrainer under FSDP2 through Accelerate: 2 CPU processes (gloo) launched with torchrun, as users launch them.

One launch runs every configuration (tests/fsdp_trainer_worker.py, which also explains how Accelerate's FSDP is
enabled on CPU processes). The weights the ranks end with are compared with a float64 hand computation of one
unsharded process training on the whole batch, written here with plain autograd and the SAM formulas.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from _versions import needs_fsdp2_on_cpu

pytestmark = needs_fsdp2_on_cpu  # torch 2.6 (the oldest supported) cannot run FSDP2 on CPU processes

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("fsdp_trainer_worker.py")
SHAPES = [(16, 8), (16,), (7, 16), (7,), (1, 7), (1,)]  # the worker's MLP, in `parameters()` order
LR, MOMENTUM, MAX_GRAD_NORM, RHO, ETA, STEPS, ALPHA = 0.05, 0.9, 1.0, 0.1, 0.01, 4, 0.7
IGNORE = -100.0
CLIP_EPS = 1e-6  # torch.nn.utils.clip_grad_norm_: max_norm / (total_norm + 1e-6)
#: float32 FSDP weights against the float64 reference after 4 steps.
TOLERANCE = 1e-6
#: bf16 autocast over fp32 sharded weights: error relative to how far the weights moved.
BF16_RELATIVE_TOLERANCE = 1e-2

EQUIVALENCE = [{"name": f"eq-{v}-ga{k}", "variant": v, "accumulation": k}
               for v in ("ssam", "sam", "usam", "asam") for k in (1, 2)]  # fmt: skip
RECIPE = ROOT / "recipes" / "accelerate" / "fsdp2_8gpu.yaml"


def _accelerate_env(path: Path) -> dict[str, str]:
    """The FSDP_* variables `accelerate launch --config_file` sets from a config's `fsdp_config`."""
    config = yaml.safe_load(path.read_text())["fsdp_config"]
    return {"FSDP_" + k.removeprefix("fsdp_").upper(): str(v).lower() if isinstance(v, bool) else str(v)
            for k, v in config.items()}  # fmt: skip


EQUIVALENCE += [
    {"name": "eq-tokens-ssam-ga2", "variant": "ssam", "accumulation": 2, "token": True},
    {"name": "eq-interval2-ssam-ga1", "variant": "ssam", "accumulation": 1, "interval": 2},
    {"name": "eq-interval2-ssam-ga2", "variant": "ssam", "accumulation": 2, "interval": 2},
    # step 0 plain, 1 and 3 SAM, 2 reuses the direction kept at step 1
    {"name": "eq-reuse-start1-ssam-ga2", "variant": "ssam", "accumulation": 2, "interval": 2, "start": 1,
     "reuse": True, "alpha": ALPHA},
    {"name": "eq-recipe-config-ssam-ga2", "variant": "ssam", "accumulation": 2,
     "accelerate_env": _accelerate_env(RECIPE)},
    {"name": "eq-activation-checkpointing-ssam-ga2", "variant": "ssam", "accumulation": 2,
     "fsdp_config": {"activation_checkpointing": True}},
]  # fmt: skip
PLAIN = [{"name": f"plain-ga{k}", "variant": "none", "accumulation": k} for k in (1, 2)]
BF16 = {"name": "bf16-ssam-ga2", "variant": "ssam", "accumulation": 2, "bf16": True}
RESUME = [
    {"name": f"resume-{kind}-ssam-ga2", "variant": "ssam", "accumulation": 2, "resume_at": 2,
     "sharded_checkpoint": kind == "sharded"}
    for kind in ("full", "sharded")
]  # fmt: skip
REFUSAL = {"name": "refusal", "kind": "refusal"}
#: stopped after the SAM step 1, resumed: the reuse step 2 needs the sharded direction saved with the checkpoint
RESUME_REUSE = {"name": "resume-reuse-start1-ssam-ga2", "variant": "ssam", "accumulation": 2, "interval": 2,
                "start": 1, "reuse": True, "alpha": ALPHA, "resume_at": 2}  # fmt: skip


def _failure(stderr: str) -> str:
    """Rank 0's traceback when there is one, else the end of the launcher's output."""
    lines = [line for line in stderr.splitlines() if line.startswith("[rank0]")]
    return "\n".join(lines)[-4000:] if lines else stderr[-4000:]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp_trainer")
    runs = EQUIVALENCE + PLAIN + [BF16] + RESUME + [RESUME_REUSE, REFUSAL]
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": path}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(WORKER),
           "--out", str(out), "--runs", json.dumps(runs)]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, _failure(proc.stderr)

    def load(name: str, rank: int = 0) -> dict:
        return torch.load(out / f"{name}.rank{rank}.pt", weights_only=False)

    return load


# ------------------------------------------------------------------ the float64 reference, one unsharded process


def _predict(params: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    w1, b1, w2, b2, w3, b3 = params
    h = torch.tanh(x @ w1.T + b1)
    h = torch.tanh(h @ w2.T + b2)
    return (h @ w3.T + b3).squeeze(-1)


def _summed_loss_grad(params: list[torch.Tensor], x, y) -> tuple[list[torch.Tensor], torch.Tensor]:
    """∇S and n: S the squared error summed over the labelled rows, n their number."""
    params = [p.detach().requires_grad_(True) for p in params]
    keep = y != IGNORE
    summed = ((_predict(params, x) - y) ** 2 * keep).sum()
    return list(torch.autograd.grad(summed, params)), keep.sum().to(torch.float64)


def _norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.sqrt(sum((t**2).sum() for t in tensors))


def _sam_gradient(variant: str, params, x, y, keep: list | None = None) -> tuple[list[torch.Tensor], torch.Tensor]:
    """(γ·)∇S(w + e) for one global micro-batch, e from g = ∇(S/n)(w), the gradient of its own mean loss; and n.
    ``keep`` gains ``v = g_asc − (⟨g_asc, g⟩/‖g‖²)·g`` (g_asc = ∇(S/n)(w + e))."""
    grad_s, n = _summed_loss_grad(params, x, y)
    g = [t / n for t in grad_s]
    g_norm = _norm(g)
    if variant in ("ssam", "usam"):
        e = [RHO * t for t in g]  # e = ρ·g
    elif variant == "sam":
        e = [RHO * t / g_norm for t in g]  # e = ρ·g/‖g‖
    else:
        t_ = [p.abs() + ETA for p in params]  # T = |w| + η
        e = [RHO * t * t * gi / _norm([t * gi for t, gi in zip(t_, g)]) for t, gi in zip(t_, g)]  # ρ·T²g/‖Tg‖
    grad_asc, _ = _summed_loss_grad([p + ei for p, ei in zip(params, e)], x, y)
    gamma = g_norm / _norm([t / n for t in grad_asc]) if variant == "ssam" else 1.0  # γ = ‖g‖/‖g_asc‖
    if keep is not None:
        g_asc = [t / n for t in grad_asc]
        coef = sum((a * b).sum() for a, b in zip(g_asc, g)) / g_norm**2
        keep.append([a - coef * b for a, b in zip(g_asc, g)])
    return [gamma * t for t in grad_asc], n


def _kind(run: dict, step: int) -> str:
    """``sam``, ``reuse`` or ``plain``: SAM from ``start`` on every ``interval`` steps, reuse (or plain) between."""
    start = run.get("start", 0)
    if run["variant"] == "none" or step < start:
        return "plain"
    if (step - start) % run.get("interval", 1) == 0:
        return "sam"
    return "reuse" if run.get("reuse") else "plain"


def _with_direction(grad_s: list[torch.Tensor], v: list[torch.Tensor], renormalize: bool) -> list[torch.Tensor]:
    """``g + α·(‖g‖/‖v‖)·v`` (rescaled to ‖g‖ with renormalization), for ∇S (only the direction of g matters)."""
    mixed = [t + ALPHA * _norm(grad_s) / _norm(v) * d for t, d in zip(grad_s, v)]
    return [_norm(grad_s) / _norm(mixed) * t for t in mixed] if renormalize else mixed


def reference(
    run: dict,
    start: torch.Tensor,
    micro_batches: list[tuple[torch.Tensor, torch.Tensor]],
    directions: list | None = None,
) -> torch.Tensor:
    """Trainer + SGD(momentum) + clipping, one process, global micro-batches, float64. ``directions`` gains the
    direction kept at each SAM step (the mean of the micro-batches' v) when the run reuses it."""
    flat = start.to(torch.float64)
    params, i = [], 0
    for shape in SHAPES:
        n = int(torch.tensor(shape).prod())
        params.append(flat[i : i + n].reshape(shape).clone())
        i += n
    k = run["accumulation"]
    buffers, v = None, None
    directions = [] if directions is None else directions
    for step in range(STEPS):
        batch = micro_batches[step * k : (step + 1) * k]
        kind, kept = _kind(run, step), []
        if kind == "sam":
            parts = [_sam_gradient(run["variant"], params, x, y, kept) for x, y in batch]
            if run.get("reuse"):
                v = [sum(ts) / k for ts in zip(*kept)]
                directions.append(torch.cat([t.reshape(-1) for t in v]))
        else:
            parts = [_summed_loss_grad(params, x, y) for x, y in batch]
            if kind == "reuse":
                parts = [(_with_direction(gs, v, run["variant"] == "ssam"), n) for gs, n in parts]
        total = sum(n for _, n in parts)  # N: items of the accumulated batch
        grad = [sum(gs[j] for gs, _ in parts) / total for j in range(len(params))]  # Σ_j ∇S_j / N
        clip = min(1.0, MAX_GRAD_NORM / (float(_norm(grad)) + CLIP_EPS))
        grad = [clip * t for t in grad]
        buffers = grad if buffers is None else [MOMENTUM * b + t for b, t in zip(buffers, grad)]
        params = [p - LR * b for p, b in zip(params, buffers)]
    return torch.cat([p.reshape(-1) for p in params])


def global_micro_batches(run: dict, results) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Rank 0's and rank 1's halves of each micro-batch, joined; checks that a SAM step's two passes see one batch."""
    halves = []
    for rank in (0, 1):
        inputs, ours, i = results(run["name"], rank)["forward_inputs"], [], 0
        for step in range(STEPS):
            sam = _kind(run, step) == "sam"
            for _ in range(run["accumulation"]):
                if sam:
                    assert all(torch.equal(a, b) for a, b in zip(inputs[i], inputs[i + 1]))
                ours.append(inputs[i])
                i += 2 if sam else 1
        assert i == len(inputs)
        halves.append(ours)
    batches = [(torch.cat([a[0], b[0]]).double(), torch.cat([a[1], b[1]]).double()) for a, b in zip(*halves)]
    assert len({tuple(x[:, 0].tolist()) for x, _ in batches}) == len(batches)  # every micro-batch is new data
    return batches


# --------------------------------------------------------------------------------------------------- the tests


@pytest.mark.parametrize("run", EQUIVALENCE, ids=[r["name"] for r in EQUIVALENCE])
def test_two_sharded_trainer_processes_equal_one_process_on_the_whole_batch(results, run):
    r0, r1 = results(run["name"], 0), results(run["name"], 1)
    assert r0["world_size"] == 2 and r0["distributed_type"] == "DistributedType.FSDP" and r0["is_fsdp_enabled"]
    assert r0["params_are_dtensors"] and r0["fsdp_units"] >= 3  # both Blocks and the root (and checkpoint wrappers)
    assert r0["local_numel"] + r1["local_numel"] == r0["weights"].numel()  # each rank holds its shards only
    expected = reference(run, r0["start"], global_micro_batches(run, results))
    for r in (r0, r1):
        err = (r["weights"].double() - expected).abs().max().item()
        assert err < TOLERANCE, err
    assert (expected - r0["start"].double()).abs().max() > 1e3 * TOLERANCE  # the weights did move
    assert [h["sam/gamma"] for h in r0["logs"] if "sam/gamma" in h] == [
        h["sam/gamma"] for h in r1["logs"] if "sam/gamma" in h
    ]  # γ is global: one value on every rank


def test_the_reference_tells_the_variants_and_the_token_normalization_apart(results):
    run = EQUIVALENCE[1]  # ssam, GA 2
    start, batches = results(run["name"])["start"], global_micro_batches(run, results)
    ssam = reference(run, start, batches)
    assert (ssam - reference({**run, "variant": "usam"}, start, batches)).abs().max() > 1e3 * TOLERANCE
    assert (ssam - reference({**run, "variant": "none"}, start, batches)).abs().max() > 1e3 * TOLERANCE
    token_run = next(r for r in EQUIVALENCE if r.get("token"))
    r = results(token_run["name"])
    per_rank = [len(x) - int((y == IGNORE).sum()) for x, y in results(token_run["name"], 0)["forward_inputs"][::2]]
    assert len(set(per_rank)) > 1  # the items per micro-batch differ (and differ between the ranks)
    assert (r["weights"] - results(run["name"])["weights"]).abs().max() > 1e3 * TOLERANCE


def test_bf16_mixed_precision_stays_within_bf16_tolerance(results):
    run = BF16
    r = results(run["name"])
    assert r["param_dtype"] == "torch.float32"  # sharded fp32 weights, bf16 compute
    expected = reference(run, r["start"], global_micro_batches(run, results))
    moved = (expected - r["start"].double()).abs().max().item()
    err = (r["weights"].double() - expected).abs().max().item()
    assert err < BF16_RELATIVE_TOLERANCE * moved, (err, moved)
    assert err > 10 * TOLERANCE  # bf16 did run: not the float32 result
    assert torch.equal(r["weights"], results(run["name"], 1)["weights"])


@pytest.mark.parametrize("run", RESUME, ids=[r["name"] for r in RESUME])
def test_checkpoint_save_and_resume_continue_exactly(results, run):
    straight = results("eq-ssam-ga2")["weights"]
    for rank in (0, 1):
        r = results(run["name"], rank)
        assert r["checkpoints"] == ["checkpoint-2"]
        assert torch.equal(r["weights"], straight), (r["weights"] - straight).abs().max()


@pytest.mark.parametrize("k", [1, 2])
def test_each_micro_batch_costs_two_plain_fsdp_rounds_and_two_scalar_all_reduces(results, k):
    gather, scatter, reduce = "c10d._allgather_base_", "c10d._reduce_scatter_base_", "c10d.allreduce_"
    plain = results(f"plain-ga{k}")["comms"]
    assert all(set(c) <= {gather, scatter} for c in plain)
    last = plain[k - 1]  # the plain step reduce-scatters at the accumulation boundary only
    assert [c.get(scatter, 0) for c in plain[:k]] == [0] * (k - 1) + [last[scatter]]
    for variant in ("ssam", "sam", "asam"):
        for c in results(f"eq-{variant}-ga{k}")["comms"]:  # every micro-batch: two full plain rounds, scalars
            assert c[gather] == 2 * last[gather] and c[scatter] == 2 * last[scatter], c
            assert c[reduce] == (3 if variant == "asam" else 2), c  # ‖g‖ (ASAM's ‖T·g‖), ‖g_asc‖
            assert set(c) == {gather, scatter, reduce}
    tokens = results("eq-tokens-ssam-ga2")["comms"]
    assert all(c[reduce] == 3 for c in tokens)  # + the item counts of the micro-batch


@pytest.mark.parametrize("k", [1, 2])
def test_plain_steps_between_sam_steps_keep_fsdp_gradient_sync(results, k):
    comms = results(f"eq-interval2-ssam-ga{k}")["comms"]
    plain, ssam = results(f"plain-ga{k}")["comms"], results(f"eq-ssam-ga{k}")["comms"]
    assert comms[:k] == ssam[:k] and comms[k : 2 * k] == plain[k : 2 * k]  # step 1 is plain


def test_no_host_synchronisation_inside_the_step(results):
    for run in EQUIVALENCE + [BF16]:  # the worker refuses bool()/.item()/.cpu() inside every training_step
        r = results(run["name"])
        assert r["guard_works"] and len(r["comms"]) == STEPS * run["accumulation"]


def test_accelerate_fsdp_configs_are_checked_at_construction(results):
    messages = results("refusal")["messages"]
    assert messages["accepted"] == "accepted, fsdp_version=2"
    assert messages["plain_fsdp1"] == "accepted, fsdp_version=1"  # sam_variant='none' is plain training
    assert "fsdp_version=1 is not supported" in messages["fsdp1"] and "'fsdp_version': 2" in messages["fsdp1"]
    assert "sam_sync_ascent=False is not supported" in messages["local_ascent"]
    assert "Set sam_sync_ascent=True" in messages["local_ascent"]
    assert messages["changed_before_train"].startswith("The Accelerate FSDP config (FSDP2) with sam_sync_ascent=False")


def test_the_recipe_config_is_the_one_that_ran(results):
    plugin = results("eq-recipe-config-ssam-ga2")["fsdp_plugin"]
    assert plugin["fsdp_version"] == "2" and plugin["auto_wrap_policy"] != "None"
    assert "SHARDED_STATE_DICT" in plugin["state_dict_type"]
    assert plugin["cpu_ram_efficient_loading"] == "True" and plugin["reshard_after_forward"] == "True"
    assert results("eq-activation-checkpointing-ssam-ga2")["fsdp_plugin"]["activation_checkpointing"] == "True"


def test_reuse_under_fsdp2_keeps_a_sharded_direction_and_uses_it(results):
    run = next(r for r in EQUIVALENCE if r.get("reuse"))
    assert [_kind(run, step) for step in range(STEPS)] == ["plain", "sam", "reuse", "sam"]
    r0, r1 = results(run["name"], 0), results(run["name"], 1)
    for r in (r0, r1):  # v is sharded like the parameters: DTensors with their mesh, placements and local shapes
        assert all(r["direction_is_dtensor"]) and all(r["direction_like_params"])
        assert len(r["direction_is_dtensor"]) == len(SHAPES)
    assert r0["direction_local_numel"] + r1["direction_local_numel"] == r0["weights"].numel()
    assert r0["direction_local_numel"] == r0["local_numel"] and r1["direction_local_numel"] == r1["local_numel"]
    batches = global_micro_batches(run, results)
    directions: list = []
    expected = reference(run, r0["start"], batches, directions)
    assert len(directions) == 2  # kept at steps 1 and 3
    v = directions[-1]
    for r in (r0, r1):
        err = ((r["direction"].double() - v).norm() / v.norm()).item()
        assert err < TOLERANCE, err
    logs = [h for h in r0["logs"] if "loss" in h]
    assert [h["sam/reused"] for h in logs] == [0.0, 0.0, 1.0, 0.0] and all(h["sam/skipped"] == 0 for h in logs)
    # the reuse step changed the run: with a plain step in its place, or without the late start, it differs
    assert (reference({**run, "reuse": False}, r0["start"], batches) - expected).abs().max() > 1e3 * TOLERANCE
    from_step_0 = reference({**run, "start": 0, "reuse": False}, r0["start"], batches)
    assert (from_step_0 - expected).abs().max() > 1e3 * TOLERANCE


def test_resume_with_reuse_continues_exactly_with_the_sharded_direction(results):
    straight = results("eq-reuse-start1-ssam-ga2")
    for rank in (0, 1):
        r = results(RESUME_REUSE["name"], rank)
        assert r["checkpoints"] == ["checkpoint-2"]
        assert torch.equal(r["weights"], straight["weights"]), (r["weights"] - straight["weights"]).abs().max()
        assert torch.equal(r["direction"], results("eq-reuse-start1-ssam-ga2", rank)["direction"])
        assert all(r["direction_like_params"])
        assert [h["sam/reused"] for h in r["logs"] if "loss" in h] == [0.0, 0.0, 1.0, 0.0]  # step 2 used v
