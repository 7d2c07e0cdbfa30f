"""ρ in units of each micro-batch's own mean-loss gradient, whatever the Trainer believes about the loss.

transformers' Trainer treats the loss of any model whose ``forward`` takes ``**kwargs`` as normalized by
``num_items_in_batch``. BERT's and T5's losses take the keyword and ignore it (a per-micro-batch mean); a Llama's
divides by it. The loss probe measures which, once per model. Each run is checked against a float64 hand
computation that uses only the model's own mean loss and autograd: for each micro-batch, ``g`` = ∇ of its mean
loss, ``e = ρ·g`` (``ρ·g/‖g‖`` for sam), ``g_asc`` at ``w + e``, ``γ = ‖g‖/‖g_asc‖``; the descent step is the
Trainer's own (for BERT/T5 with accumulation: the *sum* of the micro-batches' gradients, the Trainer's behaviour).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from _lm import Sequences, label_tokens, tiny_lm
from _versions import TRANSFORMERS_4
from torch.utils.data import Dataset, SequentialSampler
from transformers import BertConfig, BertForSequenceClassification, Seq2SeqTrainer, Seq2SeqTrainingArguments, Trainer

from hf_ssam import SSAMMixin, SSAMTrainer, SSAMTrainingArguments, sam_arguments
from hf_ssam.normalization import LossKind

LR, RHO, VOCAB, LENGTH = 0.5, 0.05, 32, 8


def tiny_bert() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
                     max_position_embeddings=LENGTH, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                     num_labels=3)  # fmt: skip
    return BertForSequenceClassification(cfg).double()


def tiny_t5() -> torch.nn.Module:
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    cfg = T5Config(vocab_size=VOCAB, d_model=8, d_kv=4, d_ff=16, num_layers=1, num_heads=2, dropout_rate=0.0,
                   decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)  # fmt: skip
    return T5ForConditionalGeneration(cfg).double()


class Classified(Dataset):
    def __init__(self, n: int):
        g = torch.Generator().manual_seed(3)
        self.items = [
            {"input_ids": torch.randint(1, VOCAB, (LENGTH,), generator=g), "labels": i % 3} for i in range(n)
        ]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


class Translated(Dataset):
    """Source/target pairs whose target lengths differ a lot (padding labelled -100)."""

    def __init__(self, n: int):
        g = torch.Generator().manual_seed(4)
        lengths = [1, 7, 2, 6, 5, 3, 7, 1][:n]
        self.items = []
        for length in lengths:
            labels = torch.randint(2, VOCAB, (LENGTH,), generator=g)
            labels[length:] = -100
            self.items.append({"input_ids": torch.randint(2, VOCAB, (LENGTH,), generator=g), "labels": labels})

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


class InOrder(SSAMTrainer):
    def _get_train_sampler(self, *args, **kwargs):
        return SequentialSampler(self.train_dataset)


class PlainInOrder(Trainer):
    def _get_train_sampler(self, *args, **kwargs):
        return SequentialSampler(self.train_dataset)


class InOrderSeq2Seq(SSAMMixin, Seq2SeqTrainer):
    def _get_train_sampler(self, *args, **kwargs):
        return SequentialSampler(self.train_dataset)


KINDS = {
    "bert": (tiny_bert, lambda n: Classified(n)),
    "t5": (tiny_t5, lambda n: Translated(n)),
    "llama": (tiny_lm, lambda n: Sequences([3, 16, 2, 15, 9, 4, 16, 6][:n])),
}


def _trainer(tmp_path, kind, k, variant="ssam", rho=RHO, **kw):
    build, dataset = KINDS[kind]
    model = build()
    common = dict(output_dir=str(tmp_path), report_to="none", use_cpu=True, save_strategy="no", disable_tqdm=True,
                  logging_steps=1, max_steps=1, per_device_train_batch_size=2, gradient_accumulation_steps=k,
                  learning_rate=LR, lr_scheduler_type="constant", max_grad_norm=0.0, sam_variant=variant,
                  sam_rho=rho)  # fmt: skip
    common.update(kw)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    if kind == "t5":
        args = sam_arguments(Seq2SeqTrainingArguments)(**common)
        trainer = InOrderSeq2Seq(model=model, args=args, train_dataset=dataset(2 * k), optimizers=(opt, None))
    else:
        args = SSAMTrainingArguments(**common)
        trainer = InOrder(model=model, args=args, train_dataset=dataset(2 * k), optimizers=(opt, None))
    return trainer, model


def _micro_batches(dataset, k):
    return [
        {key: torch.stack([torch.as_tensor(dataset[i][key]), torch.as_tensor(dataset[i + 1][key])])
         for key in dataset[i]}
        for i in range(0, 2 * k, 2)
    ]  # fmt: skip


def _norm(ts):
    return torch.sqrt(sum((t**2).sum() for t in ts))


def hand_sam(model, batches, variant, rho):
    """Per micro-batch: the SAM gradient (γ·g_asc for ssam) of its own mean loss, and ‖g‖."""
    params = list(model.parameters())
    w0 = [p.detach().clone() for p in params]

    def grad(batch):
        loss = model(**batch).loss  # the model's own mean over the micro-batch (per token for a causal LM)
        return [torch.zeros_like(p) if t is None else t for p, t in
                zip(params, torch.autograd.grad(loss, params, allow_unused=True))]  # fmt: skip

    out = []
    for batch in batches:
        g = grad(batch)
        g_norm = _norm(g)
        scale = rho / g_norm if variant == "sam" else rho  # e = ρ·g/‖g‖ (sam) or ρ·g
        with torch.no_grad():
            for p, t in zip(params, g):
                p.add_(scale * t)  # w + e
        g_asc = grad(batch)
        with torch.no_grad():
            for p, w in zip(params, w0):
                p.copy_(w)
        gamma = g_norm / _norm(g_asc) if variant == "ssam" else 1.0  # γ = ‖g‖/‖g_asc‖
        out.append(([gamma * t for t in g_asc], float(g_norm)))
    return out


@pytest.mark.parametrize("variant", ["ssam", "sam"])
@pytest.mark.parametrize("k", [1, 2, 4])
@pytest.mark.parametrize("kind", ["bert", "t5", "llama"])
def test_rho_is_in_units_of_each_micro_batch_gradient(tmp_path, kind, k, variant):
    trainer, model = _trainer(tmp_path, kind, k, variant)
    reference = KINDS[kind][0]()
    per_item = kind == "llama"
    # Whether the Trainer believes the loss divides by N: transformers 5 for every one of these models (their forwards
    # take **kwargs; BERT's and T5's losses ignore it, which the probe measures), 4.x for the causal LM only.
    believed = trainer.model_accepts_loss_kwargs
    assert believed is (per_item or not TRANSFORMERS_4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    if believed:
        assert trainer._sam_loss_kind[1] == LossKind(per_item=per_item, shifted=True if per_item else None)
    else:  # taken from the Trainer's flags, nothing probed: the Trainer divides each micro-batch's loss by k
        assert trainer._sam_loss_kind is None
    warned = [w for w in caught if "ignores num_items_in_batch" in str(w.message)]
    assert len(warned) == (0 if per_item or k == 1 or not believed else 1)

    batches = _micro_batches(trainer.train_dataset, k)
    sam = hand_sam(reference, batches, variant, RHO)
    if per_item:  # Σ_i n_i·(SAM gradient of the mean)_i / N: the token-weighted mean over the accumulated batch
        counts = [label_tokens(b["labels"]) for b in batches]
        # N as the Trainer counts it: shifted labels (transformers 5), every label (4.x)
        total = sum(label_tokens(b["labels"], shifted=not TRANSFORMERS_4) for b in batches)
        coefs = [n / total for n in counts]
    elif believed:  # the Trainer sums the micro-batches' mean-loss gradients (it does not divide by k for them)
        coefs = [1.0] * k
    else:  # the Trainer averages them (transformers 4.x divides each micro-batch's loss by k)
        coefs = [1.0 / k] * k
    expected = [p.detach() - LR * sum(c * s[0][j] for c, s in zip(coefs, sam)) for j, p in
                enumerate(reference.parameters())]  # fmt: skip
    for p, e in zip(model.parameters(), expected):
        torch.testing.assert_close(p.detach(), e, rtol=0, atol=1e-7)
    log = trainer.state.log_history[0]
    assert log["sam/grad_norm"] == pytest.approx(np.mean([s[1] for s in sam]), rel=1e-6)  # mean ‖g_i‖


@pytest.mark.parametrize("kind", ["bert", "t5"])
def test_rho_zero_equals_the_plain_trainer_for_a_loss_that_ignores_the_item_count(tmp_path, kind):
    runs = []
    for variant, rho in (("none", RHO), ("ssam", 0.0)):
        trainer, model = _trainer(tmp_path, kind, 2, variant, rho, max_steps=2)
        trainer.train()
        runs.append(([h["loss"] for h in trainer.state.log_history if "loss" in h], list(model.parameters())))
    assert runs[0][0] == runs[1][0]
    assert all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1]))  # the descent step is the Trainer's


@pytest.mark.skipif(TRANSFORMERS_4, reason="loss_is_scaled_for_ga is a Trainer attribute of transformers >= 5.19")
def test_the_probe_leaves_no_trace(tmp_path):
    """Dropout on: the run with the probe draws the same masks as one that declares the loss (no probe)."""
    results = []
    for declare in (False, True):
        torch.manual_seed(0)
        model = tiny_lm()
        model.config.attention_dropout = 0.5
        for m in model.modules():
            if hasattr(m, "attention_dropout"):
                m.attention_dropout = 0.5
        args = SSAMTrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True, save_strategy="no",
                                     disable_tqdm=True, logging_steps=1, max_steps=2, per_device_train_batch_size=2,
                                     gradient_accumulation_steps=2, seed=0)  # fmt: skip
        trainer = InOrder(model=model, args=args, train_dataset=Sequences([3, 16, 2, 15, 9, 4, 16, 6]))
        if declare:
            trainer.loss_is_scaled_for_ga = True  # the Trainer's own switch: declared, so nothing is probed
        trainer.train()
        assert (trainer._sam_loss_kind is None) is declare
        results.append((torch.cat([p.reshape(-1) for p in model.parameters()]), trainer.state.log_history[:2]))
    assert torch.equal(results[0][0], results[1][0])
    assert results[0][1] == results[1][1]


def test_a_plain_trainer_over_bert_with_accumulation_is_what_the_warning_says(tmp_path):
    """The upstream behaviour the warning describes: the same 8 examples, a 2× larger update with 2 micro-batches."""
    updates = []
    for k, batch in ((1, 8), (2, 4)):
        model = tiny_bert()
        before = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        args = SSAMTrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True, save_strategy="no",
                                     disable_tqdm=True, max_steps=1, per_device_train_batch_size=batch,
                                     gradient_accumulation_steps=k, learning_rate=1e-3, lr_scheduler_type="constant",
                                     max_grad_norm=0.0, sam_variant="none")  # fmt: skip
        trainer = PlainInOrder(model=model, args=args, train_dataset=Classified(8),
                               optimizers=(torch.optim.SGD(model.parameters(), lr=1e-3), None))  # fmt: skip
        trainer.train()
        updates.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]) - before)
    ratio = float(updates[1].norm() / updates[0].norm())
    # transformers 4.x: BERT's forward takes no **kwargs, so the Trainer divides by k and there is nothing to warn of
    assert ratio == pytest.approx(1.0 if TRANSFORMERS_4 else 2.0, rel=0.05)
