"""Each pass gets its own copy of the batch, whatever mapping the collator returns.

`DataCollatorWithPadding` and `DataCollatorForSeq2Seq` return a `BatchEncoding` (a `UserDict`, not a `dict`).
With label smoothing `Trainer.compute_loss` pops ``labels`` from the batch it is given; a user's `compute_loss`
may pop keys of its own. The second pass must see the batch the first pass saw.
"""

from __future__ import annotations

from collections import UserDict

import pytest
import torch
from torch.utils.data import Dataset, SequentialSampler
from transformers import (
    BatchEncoding,
    BertConfig,
    BertForSequenceClassification,
    DataCollatorForSeq2Seq,
    DataCollatorWithPadding,
    Seq2SeqTrainer,
    Seq2SeqTrainingArguments,
    default_data_collator,
)

from hf_ssam import SSAMMixin, SSAMTrainer, SSAMTrainingArguments, sam_arguments
from hf_ssam.passes import shallow_copy

WORDS = "the a cat dog sat ran on under mat log big small red blue and then good bad".split()
RHO = 0.05


def word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "<eos>", "<unk>", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


class Texts(Dataset):
    """Tokenized sentences of different lengths (the collator pads), with a class label or a target sentence."""

    def __init__(self, tokenizer, seq2seq=False):
        sentences = ["the cat sat", "a big dog ran on the mat", "red cat", "the small blue dog sat under the log",
                     "good dog", "the bad cat ran", "a log", "the mat and then the dog"]  # fmt: skip
        self.items = []
        for i, s in enumerate(sentences):
            item = dict(tokenizer(s))
            if seq2seq:
                item["labels"] = tokenizer(sentences[(i + 3) % 8])["input_ids"]
            else:
                item["labels"] = i % 2
            self.items.append(item)

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def tiny_bert():
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(WORDS) + 3, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=16, max_position_embeddings=16, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0, num_labels=2)  # fmt: skip
    return BertForSequenceClassification(cfg).double()


def tiny_t5():
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    cfg = T5Config(vocab_size=len(WORDS) + 3, d_model=8, d_kv=4, d_ff=16, num_layers=1, num_heads=2,
                   dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)  # fmt: skip
    return T5ForConditionalGeneration(cfg).double()


class InOrder(SSAMTrainer):
    def _get_train_sampler(self, *args, **kwargs):
        return SequentialSampler(self.train_dataset)


class InOrderSeq2Seq(SSAMMixin, Seq2SeqTrainer):
    def _get_train_sampler(self, *args, **kwargs):
        return SequentialSampler(self.train_dataset)


COMMON = dict(report_to="none", use_cpu=True, save_strategy="no", disable_tqdm=True, logging_steps=1, max_steps=2,
              per_device_train_batch_size=2, gradient_accumulation_steps=2, learning_rate=0.1,
              lr_scheduler_type="constant", max_grad_norm=0.0, label_smoothing_factor=0.1, seed=0)  # fmt: skip


@pytest.mark.parametrize("mapping", [dict, UserDict, BatchEncoding])
def test_each_pass_gets_its_own_mapping_of_the_same_type(mapping):
    labels = torch.tensor([1, 0])
    batch = mapping({"input_ids": torch.ones(2, 3), "labels": labels})
    copy = shallow_copy(batch)
    assert type(copy) is mapping and copy is not batch
    copy.pop("labels")
    assert batch["labels"] is labels  # the other pass still has it; the tensors themselves are shared


def test_batch_encoding_keeps_its_attributes():
    tok = word_tokenizer()
    batch = tok(["the cat sat", "a dog"], padding=True, return_tensors="pt")
    copy = shallow_copy(batch)
    assert copy.encodings is not None and copy.encodings == batch.encodings and copy.n_sequences == batch.n_sequences


def _train(tmp_path, kind, variant, rho):
    tok = word_tokenizer()
    if kind == "seq2seq":
        model = tiny_t5()
        args = sam_arguments(Seq2SeqTrainingArguments)(output_dir=str(tmp_path), sam_variant=variant, sam_rho=rho,
                                                       **COMMON)  # fmt: skip
        trainer = InOrderSeq2Seq(model=model, args=args, train_dataset=Texts(tok, seq2seq=True),
                                 data_collator=DataCollatorForSeq2Seq(tok, model=model))  # fmt: skip
    else:
        model = tiny_bert()
        args = SSAMTrainingArguments(output_dir=str(tmp_path), sam_variant=variant, sam_rho=rho, **COMMON)
        trainer = InOrder(model=model, args=args, train_dataset=Texts(tok), data_collator=DataCollatorWithPadding(tok))
    trainer.train()
    return trainer, model


@pytest.mark.parametrize("kind", ["padding", "seq2seq"])
def test_label_smoothing_with_a_batch_encoding_collator(tmp_path, kind):
    plain, plain_model = _train(tmp_path, kind, "none", RHO)
    zero, zero_model = _train(tmp_path, kind, "ssam", 0.0)  # ρ = 0: the plain run, bitwise
    assert all(torch.equal(p, q) for p, q in zip(plain_model.parameters(), zero_model.parameters()))
    sam, _ = _train(tmp_path, kind, "ssam", RHO)
    log = sam.state.log_history[0]
    # The loss at w + e is the smoothed loss of the same batch: close to the loss at w, and above it (an ascent).
    assert log["loss"] < log["sam/ascent_loss"] < 1.5 * log["loss"]


def test_a_compute_loss_that_pops_its_own_key_sees_it_in_both_passes(tmp_path):
    """γ = ‖g‖/‖g_asc‖ of the weighted loss in both passes (a second pass without the weight would give 10× γ)."""

    class Weighted(InOrder):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            weight = inputs.pop("weight")  # popped before the model sees the batch
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            return loss * weight.mean()

    class WithWeights(Dataset):
        def __init__(self):
            g = torch.Generator().manual_seed(0)
            self.x, self.y = torch.randn(4, 3, generator=g, dtype=torch.float64), torch.randn(4, generator=g).double()

        def __len__(self):
            return 4

        def __getitem__(self, i):
            return {"x": self.x[i], "labels": self.y[i], "weight": torch.tensor(10.0, dtype=torch.float64)}

    class Linear(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.lin = torch.nn.Linear(3, 1).double()

        def forward(self, x, labels=None):
            return {"loss": ((self.lin(x).squeeze(-1) - labels) ** 2).mean()}

    model, reference = Linear(), Linear()
    args = SSAMTrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True, save_strategy="no",
                                 disable_tqdm=True, logging_steps=1, max_steps=1, per_device_train_batch_size=4,
                                 max_grad_norm=0.0, sam_rho=RHO, remove_unused_columns=False)  # fmt: skip
    collator = lambda features: BatchEncoding(default_data_collator(features))  # noqa: E731  (as tokenizers return)
    trainer = Weighted(model=model, args=args, train_dataset=WithWeights(), data_collator=collator)
    trainer.train()
    data = WithWeights()
    params = list(reference.parameters())

    def grad():
        return torch.autograd.grad(10.0 * reference(data.x, data.y)["loss"], params)

    g = grad()
    g_norm = torch.sqrt(sum((t**2).sum() for t in g))
    with torch.no_grad():
        for p, t in zip(params, g):
            p.add_(RHO * t)  # w + e, e = ρ·g
    g_asc = grad()
    gamma = float(g_norm / torch.sqrt(sum((t**2).sum() for t in g_asc)))  # γ = ‖g‖/‖g_asc‖
    assert trainer.state.log_history[0]["sam/gamma"] == pytest.approx(gamma, rel=1e-9)
