"""ρ in the units of g when the Trainer normalizes the loss by tokens (``num_items_in_batch``).

``g`` is the gradient of one micro-batch's own mean loss per token, whatever the accumulation steps, the token
counts of the other micro-batches and the number of processes. Checked against `_lm.hand_sam_gradient`
(float64 models; transformers computes the token loss itself in float32, hence the 1e-7 tolerance).
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
from _lm import Sequences, hand_sam_gradient, label_tokens, tiny_lm
from _versions import TRANSFORMERS_4
from torch.utils.data import SequentialSampler

from hf_ssam import SSAMTrainer, SSAMTrainingArguments

LR, RHO = 0.5, 0.05
LENGTHS = [3, 16, 2, 15, 9, 4, 16, 6]  # label tokens per sequence: very unequal micro-batches
WORKER = Path(__file__).with_name("token_worker.py")


class InOrder(SSAMTrainer):
    def _get_train_sampler(self, *args, **kwargs):
        return SequentialSampler(self.train_dataset)


def _flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("k", [2, 4])
@pytest.mark.parametrize("variant", ["usam", "ssam", "sam"])
def test_accumulation_with_unequal_token_counts(tmp_path, kind, k, variant):
    data = Sequences(LENGTHS[: 2 * k])
    model, reference = tiny_lm(kind), tiny_lm(kind)
    args = SSAMTrainingArguments(
        output_dir=str(tmp_path), report_to="none", use_cpu=True, save_strategy="no", disable_tqdm=True,
        logging_steps=1, max_steps=1, per_device_train_batch_size=2, gradient_accumulation_steps=k,
        learning_rate=LR, lr_scheduler_type="constant", max_grad_norm=0.0, sam_variant=variant, sam_rho=RHO,
    )  # fmt: skip
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    trainer = InOrder(model=model, args=args, train_dataset=data, optimizers=(opt, None))
    assert trainer.model_accepts_loss_kwargs
    # How the Trainer counts the label tokens of this model: transformers 5 counts a causal LM's shifted labels
    # (`_loss_shifts_labels`), 4.x counts every label that is not -100.
    shifted = kind == "llama" and hasattr(trainer, "_loss_shifts_labels")
    assert getattr(trainer, "_loss_shifts_labels", False) is shifted
    trainer.train()

    micro = [[(torch.stack([data[i]["input_ids"], data[i + 1]["input_ids"]]),
               torch.stack([data[i]["labels"], data[i + 1]["labels"]]))] for i in range(0, 2 * k, 2)]  # fmt: skip
    # The descent step is the Trainer's: Σ_i ∇S_i / N, with N counted as the Trainer counts (GPT-2, and every model
    # under transformers 4.x: unshifted).
    # ρ is in units of each micro-batch's own mean loss gradient ∇S_i / n_i, n_i the tokens the loss averages over:
    # shifted for both models (GPT-2's loss shifts its labels although the Trainer counts them unshifted).
    total = sum(label_tokens(lab, shifted) for [(_, lab)] in micro)
    coefs = [label_tokens(lab, True) / total for [(_, lab)] in micro]
    grad, norms = hand_sam_gradient(reference, micro, coefs, variant, RHO, shifted=True)
    expected = torch.cat([(p.detach() - LR * g).reshape(-1) for p, g in zip(reference.parameters(), grad)])
    assert len({c for c in coefs}) > 1  # the micro-batches really differ
    torch.testing.assert_close(_flat(model), expected, rtol=0, atol=1e-7)
    log = trainer.state.log_history[0]
    assert log["sam/grad_norm"] == pytest.approx(np.mean(norms), rel=1e-6)  # mean ‖g_i‖, in per-token units


# --------------------------------------------------------------------------------------------- two processes

RUNS = [
    {"name": "local-avg", "sync": False, "average_tokens": True},
    {"name": "local-noavg", "sync": False, "average_tokens": False},
    {"name": "sync-avg", "sync": True, "average_tokens": True},
]


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("tokens")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(WORKER),
           "--out", str(out), "--runs", json.dumps(RUNS), "--lengths", json.dumps(LENGTHS), "--lr", str(LR),
           "--rho", str(RHO)]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return lambda name, rank: torch.load(out / f"{name}.rank{rank}.pt")


@pytest.mark.parametrize("run", RUNS, ids=[r["name"] for r in RUNS])
def test_ddp_with_unequal_token_counts_per_rank(ddp_results, run):
    ranks = [ddp_results(run["name"], r) for r in (0, 1)]
    assert ranks[0]["world_size"] == 2
    micro = [r["micro_batches"] for r in ranks]  # per rank, per micro-batch: (input_ids, labels)
    assert len(micro[0]) == len(micro[1]) == 2
    n = [[label_tokens(lab) for _, lab in m] for m in micro]
    assert n[0] != n[1]  # the ranks see different token counts
    # N as the Trainer counts the label tokens: shifted (transformers 5), every label (4.x)
    counted = [[label_tokens(lab, shifted=not TRANSFORMERS_4) for _, lab in m] for m in micro]
    world, total = 2, sum(map(sum, counted))
    if run["sync"]:  # one global micro-batch per accumulation step: the same g on both ranks
        groups = [[micro[0][i], micro[1][i]] for i in range(2)]
        coefs = [(n[0][i] + n[1][i]) / total for i in range(2)]
    else:  # each rank perturbs with its own micro-batch's g; the SAM gradients are averaged over ranks
        groups = [[micro[r][i]] for r in range(world) for i in range(2)]
        per_rank_total = [sum(counted[r]) for r in range(world)]
        coefs = [n[r][i] / total if run["average_tokens"] else n[r][i] / per_rank_total[r] / world
                 for r in range(world) for i in range(2)]  # fmt: skip
    reference = tiny_lm()
    grad, norms = hand_sam_gradient(reference, groups, coefs, "ssam", RHO)
    expected = torch.cat([(p.detach() - LR * g).reshape(-1) for p, g in zip(reference.parameters(), grad)])
    for r in ranks:
        torch.testing.assert_close(r["weights"], expected, rtol=0, atol=1e-7)
        assert r["logs"][0]["sam/grad_norm"] == pytest.approx(np.mean(norms), rel=1e-6)
