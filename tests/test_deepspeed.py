"""SSAMTrainer under DeepSpeed ZeRO stages 1, 2 and 3: 2 CPU processes (gloo) launched with torchrun.

One launch runs every configuration (tests/deepspeed_worker.py, which explains how DeepSpeed runs on CPU processes).
DeepSpeed's fp32 master weights after 4 steps are compared with the float64 hand computation of one unsharded
process training on the whole batch (the reference of tests/test_fsdp_trainer.py: plain autograd and the SAM
formulas, SGD with momentum, clipping once per step).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import test_fsdp_trainer
import torch
import yaml
from _lm import hand_sam_gradient, label_tokens, tiny_lm
from _versions import TRANSFORMERS_4
from test_fsdp_trainer import IGNORE, TOLERANCE, global_micro_batches, reference

deepspeed = pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (pip install 'hf_ssam[deepspeed]')")

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("deepspeed_worker.py")
#: bf16 weights and compute over fp32 master weights: error relative to how far the weights moved.
BF16_RELATIVE_TOLERANCE = 2e-2

VARIANTS = ("ssam", "sam", "usam", "asam")
EQUIVALENCE = [
    {"name": f"z{stage}-{v}-ga{k}", "stage": stage, "variant": v, "accumulation": k}
    for stage in (2, 3)
    for v in VARIANTS
    for k in (1, 2)
] + [{"name": f"z1-{v}-ga{k}", "stage": 1, "variant": v, "accumulation": k} for v in ("ssam", "sam") for k in (1, 2)]


def _accelerate_env(path: Path) -> dict[str, str]:
    """The variables `accelerate launch --config_file` sets from a DeepSpeed config (accelerate/utils/launch.py);
    the tests run fp32 (the configs' bf16 is compared within bf16 tolerance elsewhere)."""
    config = yaml.safe_load(path.read_text())["deepspeed_config"]
    names = {"zero_stage": "DEEPSPEED_ZERO_STAGE", "gradient_accumulation_steps": "GRADIENT_ACCUMULATION_STEPS",
             "gradient_clipping": "GRADIENT_CLIPPING", "zero3_init_flag": "DEEPSPEED_ZERO3_INIT",
             "offload_optimizer_device": "DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE",
             "offload_param_device": "DEEPSPEED_OFFLOAD_PARAM_DEVICE",
             "zero3_save_16bit_model": "DEEPSPEED_ZERO3_SAVE_16BIT_MODEL"}  # fmt: skip
    env = {"ACCELERATE_" + names[k]: str(v).lower() for k, v in config.items()}
    return {**env, "ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_MIXED_PRECISION": "no"}


RECIPES = {s: ROOT / "recipes" / "accelerate" / f"deepspeed_zero{s}_8gpu.yaml" for s in (2, 3)}
EQUIVALENCE += [
    {"name": f"z{s}-recipe-config-ssam-ga1", "stage": s, "variant": "ssam", "accumulation": 1,
     "accelerate_env": _accelerate_env(path)}
    for s, path in RECIPES.items()
]  # fmt: skip
EQUIVALENCE += [
    # ZeRO-3 with every parameter partitioned (the default threshold keeps the tiny ones gathered: persistent)
    {"name": "z3-unpersisted-ssam-ga2", "stage": 3, "variant": "ssam", "accumulation": 2,
     "zero": {"stage3_param_persistence_threshold": 0}},
    {"name": "z2-tokens-ssam-ga2", "stage": 2, "variant": "ssam", "accumulation": 2, "token": True},
    {"name": "z3-tokens-ssam-ga2", "stage": 3, "variant": "ssam", "accumulation": 2, "token": True},
    {"name": "z2-noclip-ssam-ga2", "stage": 2, "variant": "ssam", "accumulation": 2, "max_grad_norm": 0.0},
    {"name": "z2-plain-ga2", "stage": 2, "variant": "none", "accumulation": 2},
]  # fmt: skip
BF16 = [{"name": f"z{s}-bf16-ssam-ga2", "stage": s, "variant": "ssam", "accumulation": 2, "bf16": True}
        for s in (2, 3)]  # fmt: skip
RESUME = [{"name": f"z{s}-resume-ssam-ga2", "stage": s, "variant": "ssam", "accumulation": 2, "resume_at": 2}
          for s in (2, 3)]  # fmt: skip
REFUSAL = {"name": "refusal", "kind": "refusal"}
#: the 6th pass is the second pass of the 3rd micro-batch: step 2, its first micro-batch's gradient already summed
FAULT = [{"name": f"z{s}-fault", "kind": "fault", "stage": s, "accumulation": 2, "fault_at": 6} for s in (2, 3)]
DPO = [{"name": "dpo-plain", "kind": "dpo", "stage": 2, "variant": "none"},
       {"name": "dpo-rho0", "kind": "dpo", "stage": 2, "rho": 0.0},
       {"name": "dpo-ssam", "kind": "dpo", "stage": 2}]  # fmt: skip
LM_LR, LM_RHO = 0.5, 0.05
LENGTHS = [3, 16, 2, 15, 9, 4, 16, 6]  # label tokens per sequence: unequal micro-batches and ranks
LM = [{"name": f"z{s}-llama-ssam-ga2", "model": "lm", "stage": s, "accumulation": 2, "lengths": LENGTHS}
      for s in (2, 3)]  # fmt: skip
LORA = {"name": "z2-lora-ssam-ga2", "model": "lm", "lora": True, "stage": 2, "accumulation": 2, "lengths": LENGTHS,
        "steps": 2}  # fmt: skip
DROPOUT = [
    {"name": "z2-dropout-plain", "stage": 2, "variant": "none", "accumulation": 2, "dropout": True},
    {"name": "z2-dropout-rho0", "stage": 2, "rho": 0.0, "accumulation": 2, "dropout": True},
    {"name": "z2-dropout-rho0-noreplay", "stage": 2, "rho": 0.0, "accumulation": 2, "dropout": True,
     "replay_rng": False},
]  # fmt: skip


def _failure(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith("[rank0]")]
    return "\n".join(lines)[-4000:] if lines else stderr[-4000:]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("deepspeed")
    runs = EQUIVALENCE + BF16 + RESUME + LM + [LORA] + DROPOUT + DPO + FAULT + [REFUSAL]
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": path}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(WORKER),
           "--out", str(out), "--runs", json.dumps(runs)]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, _failure(proc.stderr)

    def load(name: str, rank: int = 0) -> dict:
        return torch.load(out / f"{name}.rank{rank}.pt", weights_only=False)

    return load


@pytest.fixture
def _expected(monkeypatch):
    def expected(run: dict, results) -> tuple[torch.Tensor, torch.Tensor]:
        r = results(run["name"])
        if run.get("max_grad_norm") == 0.0:  # no clipping (the Trainer's max_grad_norm=0, DeepSpeed's "auto")
            monkeypatch.setattr(test_fsdp_trainer, "MAX_GRAD_NORM", float("inf"))
        return r["start"], reference(run, r["start"], global_micro_batches(run, results))

    return expected


@pytest.mark.parametrize("run", EQUIVALENCE, ids=[r["name"] for r in EQUIVALENCE])
def test_two_zero_processes_equal_one_process_on_the_whole_batch(results, run, _expected):
    r0, r1 = results(run["name"], 0), results(run["name"], 1)
    assert r0["world_size"] == 2 and r0["engine"] == "DeepSpeedEngine" and r0["stage"] == run["stage"]
    assert r0["from_accelerate_config"] == ("accelerate_env" in run)
    start, expected = _expected(run, results)
    for r in (r0, r1):
        err = (r["weights"].double() - expected).abs().max().item()
        assert err < TOLERANCE, err
    assert (expected - start.double()).abs().max() > 1e3 * TOLERANCE  # the weights did move
    gammas = [[h["sam/gamma"] for h in r["logs"] if "sam/gamma" in h] for r in (r0, r1)]
    assert gammas[0] == gammas[1] and len(gammas[0]) == (0 if run["variant"] == "none" else 4)  # one γ, global


def test_the_reference_tells_the_runs_apart(results):
    """The comparison has teeth: SSAM is not SAM, USAM or plain training, and clipping and token counts matter."""
    run = next(r for r in EQUIVALENCE if r["name"] == "z2-ssam-ga2")
    start, batches = results(run["name"])["start"], global_micro_batches(run, results)
    ssam = reference(run, start, batches)
    for other in ("usam", "sam", "none"):
        assert (ssam - reference({**run, "variant": other}, start, batches)).abs().max() > 1e3 * TOLERANCE
    noclip = next(r for r in EQUIVALENCE if r["name"] == "z2-noclip-ssam-ga2")
    assert (results(noclip["name"])["weights"] - results(run["name"])["weights"]).abs().max() > 1e3 * TOLERANCE
    token = next(r for r in EQUIVALENCE if r["name"] == "z2-tokens-ssam-ga2")
    per_rank = [len(x) - int((y == IGNORE).sum()) for x, y in results(token["name"], 0)["forward_inputs"][::2]]
    assert len(set(per_rank)) > 1  # the items per micro-batch differ


@pytest.mark.parametrize("run", BF16, ids=[r["name"] for r in BF16])
def test_bf16_stays_within_bf16_tolerance(results, run, _expected):
    r = results(run["name"])
    assert r["bf16"]
    start, expected = _expected(run, results)
    moved = (expected - start.double()).abs().max().item()
    err = (r["weights"].double() - expected).abs().max().item()
    assert err < BF16_RELATIVE_TOLERANCE * moved, (err, moved)
    assert err > 10 * TOLERANCE  # bf16 did run: not the float32 result
    assert torch.equal(r["weights"], results(run["name"], 1)["weights"])


@pytest.mark.parametrize("run", EQUIVALENCE + BF16, ids=[r["name"] for r in EQUIVALENCE + BF16])
def test_one_optimizer_step_per_accumulation_window(results, run):
    r = results(run["name"])
    assert r["engine_global_steps"] == r["trainer_global_step"] == 4


@pytest.mark.parametrize("run", RESUME, ids=[r["name"] for r in RESUME])
def test_checkpoint_save_and_resume_continue_exactly(results, run):
    straight = results(f"z{run['stage']}-ssam-ga2")["weights"]
    for rank in (0, 1):
        r = results(run["name"], rank)
        assert r["checkpoints"] == ["checkpoint-2"]
        assert r["engine_global_steps"] == r["trainer_global_step"] == 4
        assert torch.equal(r["weights"], straight), (r["weights"] - straight).abs().max()


def test_accelerate_deepspeed_configs_are_checked_at_construction(results):
    messages = results("refusal")["messages"]
    assert "sam_sync_ascent=False is not supported" in messages["local_ascent"]
    assert "ZeRO reduces every gradient" in messages["local_ascent"]
    assert "offload_param.device='cpu' is not supported" in messages["offload"]
    assert messages["accepted"] == "accepted, deepspeed=True"
    assert messages["plain_local"] == "accepted, deepspeed=True"  # sam_variant='none' is plain DeepSpeed
    assert "sam_sync_ascent=False is not supported" in messages["changed_before_train"]


@pytest.mark.parametrize("run", LM, ids=[r["name"] for r in LM])
def test_a_token_normalized_llama_with_unequal_tokens_per_rank(results, run):
    """One SSAM step (2 micro-batches) of a tiny Llama: the float64 hand computation on the global micro-batches,
    g the gradient of each one's mean loss per label token, the descent weighted by its share of the tokens."""
    ranks = [results(run["name"], r) for r in (0, 1)]
    micro = [r["forward_inputs"][::2] for r in ranks]  # two passes per micro-batch: the first
    assert all(torch.equal(a[0], b[0]) for r in ranks for a, b in zip(r["forward_inputs"][::2],
                                                                         r["forward_inputs"][1::2]))  # fmt: skip
    n = [[label_tokens(lab) for _, lab in m] for m in micro]
    assert n[0] != n[1]  # the ranks see different token counts
    groups = [[micro[0][i], micro[1][i]] for i in range(2)]
    # N as the Trainer counts the label tokens: shifted (transformers 5), every label (4.x)
    total = sum(label_tokens(lab, shifted=not TRANSFORMERS_4) for m in micro for _, lab in m)
    coefs = [(n[0][i] + n[1][i]) / total for i in range(2)]
    model = tiny_lm()
    with torch.no_grad():
        for p, start in zip(model.parameters(), ranks[0]["start_named"].values()):
            p.copy_(start.double())  # the float32 weights the engine started from
    grad, norms = hand_sam_gradient(model, groups, coefs, "ssam", LM_RHO)
    expected = torch.cat([(p.detach() - LM_LR * g).reshape(-1) for p, g in zip(model.parameters(), grad)])
    for r in ranks:
        err = (r["weights"].double() - expected).abs().max().item()
        assert err < TOLERANCE, err
        assert r["logs"][0]["sam/grad_norm"] == pytest.approx(np.mean(norms), rel=1e-5)
    assert (expected - ranks[0]["start"].double()).abs().max() > 1e3 * TOLERANCE


def test_lora_under_zero2_perturbs_and_updates_only_the_adapters(results):
    r = results(LORA["name"])
    assert r["sam_set"] == r["trainable"] and r["trainable"] and all("lora_" in n for n in r["trainable"])
    moved = {n for n, w in r["named_weights"].items() if not torch.equal(w, r["start_named"][n])}
    assert moved <= set(r["trainable"])  # every base weight bitwise unchanged
    assert {n for n in r["trainable"] if "lora_B" in n} <= moved  # the adapters trained (A barely: B starts at 0)
    assert r["backup_numel"] == sum(r["start_named"][n].numel() for n in r["trainable"])  # w saved: adapters only
    assert r["engine_global_steps"] == r["trainer_global_step"] == 2


def test_dropout_masks_are_replayed_in_the_second_pass(results):
    """ρ = 0 with dropout: the second pass sees the same masks, so SSAM is plain DeepSpeed training, bitwise;
    without the replay the second pass draws other masks and the run differs."""
    plain, rho0, noreplay = (results(run["name"])["weights"] for run in DROPOUT)
    assert torch.equal(rho0, plain)
    assert (noreplay - plain).abs().max() > 1e-4


def test_dpo_under_zero2_keeps_the_reference_model_out_of_the_sam_step(results):
    """TRL's DPOTrainer + SSAMMixin under ZeRO-2: ρ = 0 is plain DPO bitwise (weights and every logged metric), the
    metrics of a SAM step are those at w, the policy alone is perturbed and saved, the reference model is never
    changed and runs at its own weights."""
    plain, rho0, ssam = (results(run["name"]) for run in DPO)
    assert all(torch.equal(plain["named_weights"][n], rho0["named_weights"][n]) for n in plain["named_weights"])
    strip = lambda h: {k: v for k, v in h.items() if not k.startswith("sam/")}  # noqa: E731
    assert [strip(h) for h in rho0["logs"]] == [strip(h) for h in plain["logs"]]
    assert any(k.startswith("rewards/") for k in plain["logs"][0])
    at_w = lambda r: {k: v for k, v in strip(r["logs"][0]).items() if k != "grad_norm"}  # noqa: E731
    assert at_w(ssam) == at_w(plain)  # the metrics DPO records are those of the pass at w, not of w + e
    names = plain["named_weights"]
    assert max((ssam["named_weights"][n] - plain["named_weights"][n]).abs().max() for n in names) > 1e-4
    for r in (plain, rho0, ssam):
        assert r["ref_unchanged"] and r["ref_forwards_at_its_weights"] and all(r["ref_forwards_at_its_weights"])
        assert r["engine_global_steps"] == r["trainer_global_step"] == 3
    assert rho0["sam_set_is_policy"] and ssam["sam_set_is_policy"]


@pytest.mark.parametrize("run", FAULT, ids=[r["name"] for r in FAULT])
def test_an_exception_in_the_second_pass_leaves_the_weights_at_w(results, run):
    for rank in (0, 1):
        r = results(run["name"], rank)
        assert r["message"] == "injected fault in the second pass"
        assert r["was_perturbed"] and r["restored"]


CONFIG = {"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": "auto"}


@pytest.mark.parametrize(
    "config, kwargs, match",
    [
        (CONFIG, {}, r"sam_sync_ascent=False is not supported.*ZeRO reduces every gradient inside backward"),
        ({**CONFIG, "zero_optimization": {"stage": 0}}, {}, r"ZeRO stage 0 is not supported.*stages 1, 2 and 3"),
        ({**CONFIG, "fp16": {"enabled": True}}, {}, r"with fp16 is not supported.*loss scaler.*Use bf16"),
        ({**CONFIG, "zero_optimization": {"stage": 3, "offload_param": {"device": "nvme"}}}, {},
         r"offload_param.device='nvme' is not supported"),
        ({**CONFIG, "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}, {},
         r"offload_optimizer.device='cpu' is not supported"),
        (CONFIG, {"sam_reuse": True, "sam_interval": 2}, r"sam_reuse=True is not supported"),
    ],
)  # fmt: skip
def test_deepspeed_settings_the_step_does_not_run_on_are_refused_at_construction(tmp_path, config, kwargs, match):
    from hf_ssam import SSAMTrainingArguments

    sync = {"sam_sync_ascent": True} if "sam_sync_ascent=False" not in match else {}
    with pytest.raises(ValueError, match=match):
        SSAMTrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", deepspeed=config,
                              **sync, **kwargs)  # fmt: skip


def test_a_deepspeed_config_file_is_read_and_quoted(tmp_path):
    from hf_ssam import SSAMTrainingArguments

    path = tmp_path / "ds.json"
    path.write_text(json.dumps({**CONFIG, "fp16": {"enabled": True}}))
    with pytest.raises(ValueError, match=rf"deepspeed='{path}' with fp16 is not supported"):
        SSAMTrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", deepspeed=str(path),
                              sam_sync_ascent=True)  # fmt: skip
    path.write_text(json.dumps(CONFIG))
    args = SSAMTrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", deepspeed=str(path),
                                 sam_sync_ascent=True)  # fmt: skip
    assert args.sam_enabled and args.hf_deepspeed_config.config["zero_optimization"]["stage"] == 2
    args.sam_sync_ascent = False  # changed after construction: train() checks again
    with pytest.raises(ValueError, match="sam_sync_ascent=False is not supported"):
        args.check_sam_settings()


def test_plain_deepspeed_needs_no_sam_setting(tmp_path):
    from hf_ssam import SSAMTrainingArguments

    args = SSAMTrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", sam_variant="none",
                                 deepspeed={**CONFIG, "fp16": {"enabled": True}})  # fmt: skip
    assert not args.sam_enabled
