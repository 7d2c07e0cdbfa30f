"""SSAMMixin composed with the Trainer subclasses users run: TRL SFT/DPO, PEFT LoRA, Seq2Seq, sentence-transformers.

Each step is checked against a SAM update computed by hand with the trainer's own `compute_loss` (and its loss
normalizer), and each first log against the plain trainer's.
"""

from __future__ import annotations

import copy

import pytest
import torch
from _versions import TRANSFORMERS_4
from datasets import Dataset
from torch import nn
from transformers import Trainer

from hf_ssam import SSAMMixin, SSAMTrainer, sam_arguments

trl = pytest.importorskip("trl")
peft = pytest.importorskip("peft")

LR, RHO = 0.1, 0.05
WORDS = "the a cat dog sat ran on under mat log big small red blue and then good bad".split()
TEXTS = ["the cat sat on the mat", "a big dog ran", "the small red cat sat under the log and then ran", "blue dog"]
COMMON = dict(report_to="none", use_cpu=True, save_strategy="no", disable_tqdm=True, logging_steps=1,
              learning_rate=LR, lr_scheduler_type="constant", max_grad_norm=0.0, seed=0)  # fmt: skip


def word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "<eos>", "<unk>", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def tiny_llama(dtype=torch.float64):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(WORDS) + 3, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32, pad_token_id=0,
                      eos_token_id=1, bos_token_id=None)  # fmt: skip
    return LlamaForCausalLM(cfg).to(dtype)


class Capture:
    """Wraps a trainer class: records the inputs and normalizer of every `compute_loss` call."""

    @staticmethod
    def of(base):
        class Captured(SSAMMixin, base):
            calls: list = []  # on the class: the trainer's own attributes are put back after the second pass

            def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
                if torch.is_grad_enabled():  # the two passes, not the once-per-run loss probe (under no_grad)
                    type(self).calls.append((copy.copy(inputs), num_items_in_batch))
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

        return Captured


def hand_step(trainer, reference, inputs, num_items_in_batch, variant="ssam", unit=1.0):
    """w − lr·γ·g_asc with g, g_asc from the trainer's own compute_loss at w and at w + e (e = ρ·unit·g).

    ``unit``: the factor from compute_loss's gradient to the gradient of the micro-batch's own mean loss."""
    params = [p for p in reference.parameters() if p.requires_grad]

    def grad():
        loss = trainer.compute_loss(reference, copy.copy(inputs), num_items_in_batch=num_items_in_batch)
        grads = torch.autograd.grad(loss, params, allow_unused=True)  # e.g. a pooler the loss does not use
        return [torch.zeros_like(p) if t is None else t for p, t in zip(params, grads)]

    w0 = [p.detach().clone() for p in params]
    g = grad()
    g_norm = torch.sqrt(sum((t.double() ** 2).sum() for t in g))
    with torch.no_grad():
        for p, t in zip(params, g):
            p.add_(RHO * unit * t)  # w + e, e = ρ·unit·g
    g_asc = grad()
    with torch.no_grad():
        for p, w in zip(params, w0):
            p.copy_(w)
    gamma = g_norm / torch.sqrt(sum((t.double() ** 2).sum() for t in g_asc)) if variant == "ssam" else 1.0
    return [w - LR * (gamma * t).to(w.dtype) for w, t in zip(w0, g_asc)]


def _sft_args(tmp_path, **kw):
    from trl import SFTConfig

    base = dict(output_dir=str(tmp_path), bf16=False, gradient_checkpointing=False, max_steps=1,
                per_device_train_batch_size=4, dataset_num_proc=None, **COMMON)  # fmt: skip
    base.update(kw)
    return sam_arguments(SFTConfig)(**base)


# ------------------------------------------------------------------------------------------ the arguments


def test_sam_arguments_keeps_the_class_and_its_fields():
    from transformers import HfArgumentParser, Seq2SeqTrainingArguments
    from trl import DPOConfig, SFTConfig

    made = sam_arguments(SFTConfig)
    assert made.__name__ == "SSAMSFTConfig" and issubclass(made, SFTConfig) and sam_arguments(SFTConfig) is made
    assert sam_arguments(DPOConfig).__name__ == "SSAMDPOConfig" and sam_arguments(made) is made
    (args,) = HfArgumentParser(sam_arguments(Seq2SeqTrainingArguments)).parse_args_into_dataclasses(
        ["--output_dir", "o", "--predict_with_generate", "--sam_variant", "sam", "--sam_rho", "0.2"]
    )
    assert args.predict_with_generate and (args.sam_variant, args.sam_rho) == ("sam", 0.2)
    with pytest.raises(ValueError, match=r"sam_rho=-1.0 is invalid"):
        made(output_dir="o", bf16=False, use_cpu=True, sam_rho=-1.0)


def test_mixin_promotes_args_without_down_casting(tmp_path):
    from trl import SFTConfig, SFTTrainer

    class SSAMSFTTrainer(SSAMMixin, SFTTrainer):
        pass

    plain = SFTConfig(output_dir=str(tmp_path), bf16=False, max_length=17, dataset_num_proc=None, **COMMON)
    trainer = SSAMSFTTrainer(model=tiny_llama(), args=plain, train_dataset=Dataset.from_dict({"text": TEXTS}),
                             processing_class=word_tokenizer())  # fmt: skip
    assert isinstance(trainer.args, SFTConfig) and type(trainer.args).__name__ == "SSAMSFTConfig"
    assert trainer.args.max_length == 17 and trainer.args.sam_variant == "ssam"


# ----------------------------------------------------------------------------------------------- TRL SFT


def test_sft_one_step_equals_the_hand_update(tmp_path):
    from trl import SFTTrainer

    model = tiny_llama()
    trainer = Capture.of(SFTTrainer)(
        model=model, args=_sft_args(tmp_path), train_dataset=Dataset.from_dict({"text": TEXTS}),
        processing_class=word_tokenizer(), optimizers=(torch.optim.SGD(model.parameters(), lr=LR), None),
    )  # fmt: skip
    reference = copy.deepcopy(model)  # as SFTTrainer prepared it (its fused LM head included)
    trainer.train()
    (inputs, n_items), _ = trainer.calls  # two compute_loss calls: at w and at w + e
    assert n_items is not None  # the token-normalized path
    # g in units of the micro-batch's own mean loss, over its shifted labels; N is the Trainer's count (the same
    # with transformers 5, every label with 4.x)
    unit = float(n_items) / int(inputs["labels"][..., 1:].ne(-100).sum()) if TRANSFORMERS_4 else 1.0
    expected = hand_step(trainer, reference, inputs, n_items, unit=unit)
    for p, e in zip(model.parameters(), expected):
        torch.testing.assert_close(p.detach(), e, rtol=0, atol=1e-9)


def _first_record(trainer):
    trainer.train()
    skip = ("grad_norm", "runtime", "per_second")
    return {k: v for k, v in trainer.state.log_history[0].items() if not k.startswith("sam/") and not k.endswith(skip)}


def test_sft_metrics_are_counted_once_from_the_pass_at_w(tmp_path):
    from trl import SFTTrainer

    records = []
    for cls in (SFTTrainer, Capture.of(SFTTrainer)):
        model = tiny_llama()
        args = _sft_args(tmp_path, include_num_input_tokens_seen=True, per_device_train_batch_size=2, max_steps=2)
        trainer = cls(model=model, args=args, train_dataset=Dataset.from_dict({"text": TEXTS}),
                      processing_class=word_tokenizer(),
                      optimizers=(torch.optim.SGD(model.parameters(), lr=LR), None))  # fmt: skip
        records.append(_first_record(trainer))
    plain, sam = records
    assert {"num_tokens", "mean_token_accuracy", "entropy", "num_input_tokens_seen"} <= set(plain)
    assert sam == plain  # key by key, values included


# ----------------------------------------------------------------------------------------------- TRL DPO


def _dpo_data():
    return Dataset.from_dict(
        {
            "prompt": ["the cat", "a dog", "the big", "red"],
            "chosen": [" sat on the mat", " ran", " dog ran", " cat sat"],
            "rejected": [" bad bad", " the the", " mat mat log", " and and"],
        }
    )


def _dpo_trainer(tmp_path, cls, rho, steps=3, **kw):
    from trl import DPOConfig

    model, ref = tiny_llama(), tiny_llama()
    args = sam_arguments(DPOConfig)(output_dir=str(tmp_path), bf16=False, max_steps=steps,
                                    per_device_train_batch_size=2, sam_rho=rho, dataset_num_proc=None,
                                    **COMMON)  # fmt: skip
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    trainer = cls(model=model, ref_model=ref, args=args, train_dataset=_dpo_data(), processing_class=word_tokenizer(),
                  optimizers=(opt, None), **kw)  # fmt: skip
    return trainer, model, ref


def test_dpo_rho_zero_is_plain_dpo_and_the_reference_is_never_touched(tmp_path):
    from trl import DPOTrainer

    class SSAMDPOTrainer(SSAMMixin, DPOTrainer):
        pass

    plain, plain_model, _ = _dpo_trainer(tmp_path, DPOTrainer, 0.0)
    plain.train()
    sam, sam_model, ref = _dpo_trainer(tmp_path, SSAMDPOTrainer, 0.0)
    ref_before = [p.detach().clone() for p in ref.parameters()]
    seen = []
    ref.register_forward_pre_hook(lambda m, a: seen.append(torch.equal(m.model.embed_tokens.weight, ref_before[0])))
    sam.train()
    for p, q in zip(plain_model.parameters(), sam_model.parameters()):
        assert torch.equal(p, q)
    assert all(torch.equal(p, q) for p, q in zip(ref.parameters(), ref_before)) and seen and all(seen)
    strip = lambda h: {k: v for k, v in h.items() if not k.startswith("sam/") and "runtime" not in k  # noqa: E731
                       and "per_second" not in k}  # fmt: skip
    assert [strip(h) for h in sam.state.log_history] == [strip(h) for h in plain.state.log_history]


def test_dpo_metrics_are_those_at_w(tmp_path):
    from trl import DPOTrainer

    class SSAMDPOTrainer(SSAMMixin, DPOTrainer):
        pass

    plain, _, _ = _dpo_trainer(tmp_path, DPOTrainer, RHO, steps=1)
    sam, _, _ = _dpo_trainer(tmp_path, SSAMDPOTrainer, RHO, steps=1)
    first_plain, first_sam = _first_record(plain), _first_record(sam)
    assert any(k.startswith("rewards/") for k in first_plain) and any(k.startswith("logps/") for k in first_plain)
    assert first_sam == first_plain


# ---------------------------------------------------------------------------------------------- PEFT LoRA


def _lora():
    from peft import LoraConfig

    return LoraConfig(r=2, lora_alpha=4, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")


def test_lora_through_sft_perturbs_and_updates_only_the_adapter(tmp_path):
    from trl import SFTTrainer

    model = tiny_llama()
    base_before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    trainer = Capture.of(SFTTrainer)(model=model, args=_sft_args(tmp_path, max_steps=2),
                                     train_dataset=Dataset.from_dict({"text": TEXTS}),
                                     processing_class=word_tokenizer(), peft_config=_lora())  # fmt: skip
    peft_model = trainer.model
    adapter = {n: p.detach().clone() for n, p in peft_model.named_parameters() if p.requires_grad}
    assert adapter and all("lora_" in n for n in adapter)
    seen_base = []
    peft_model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.register_forward_pre_hook(
        lambda m, a: seen_base.append(m.weight.clone()) if torch.is_grad_enabled() else None  # not the probe
    )
    trainer.train()
    assert len(seen_base) == 4 and all(torch.equal(w, seen_base[0]) for w in seen_base)  # never perturbed
    for name, value in peft_model.base_model.model.state_dict().items():
        if "lora_" not in name:
            key = name.replace(".base_layer", "")
            assert torch.equal(value, base_before[key]), name  # bitwise unchanged
    after = dict(peft_model.named_parameters())
    assert all(not torch.equal(after[n], v) for n, v in adapter.items())  # adapters trained
    backup_bytes = sum(b.numel() * b.element_size() for b in trainer._sam_backup)
    adapter_bytes = sum(v.numel() * v.element_size() for v in adapter.values())
    model_bytes = sum(v.numel() * v.element_size() for v in base_before.values())
    assert backup_bytes == adapter_bytes < model_bytes / 10


def test_get_peft_model_through_ssam_trainer(tmp_path):
    from _lm import Sequences, tiny_lm
    from peft import get_peft_model

    from hf_ssam import SSAMTrainingArguments

    model = get_peft_model(tiny_lm(), _lora())
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    args = SSAMTrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, **COMMON)
    trainer = SSAMTrainer(model=model, args=args, train_dataset=Sequences([5, 9, 12, 3]))
    trainer.train()
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    assert len(trainer._sam_backup) == sum(p.requires_grad for p in model.parameters())


# ------------------------------------------------------------------------------------------------ Seq2Seq


def _tiny_bart():
    from transformers import BartConfig, BartForConditionalGeneration

    torch.manual_seed(0)
    cfg = BartConfig(vocab_size=len(WORDS) + 3, d_model=8, encoder_layers=1, decoder_layers=1,
                     encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=16, decoder_ffn_dim=16,
                     max_position_embeddings=32, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
                     pad_token_id=0, eos_token_id=1, bos_token_id=1, decoder_start_token_id=1,
                     forced_eos_token_id=None)  # fmt: skip
    return BartForConditionalGeneration(cfg).double()


def _pairs():
    tok = word_tokenizer()
    src = tok(["the cat sat", "a big dog ran on the mat", "red", "blue dog"], padding="max_length", max_length=8)
    tgt = tok(["cat", "dog ran", "red red", "dog"], padding="max_length", max_length=4)
    labels = [[t if m else -100 for t, m in zip(ids, mask)] for ids, mask in zip(tgt["input_ids"],
                                                                             tgt["attention_mask"])]  # fmt: skip
    return Dataset.from_dict({"input_ids": src["input_ids"], "attention_mask": src["attention_mask"],
                              "labels": labels})  # fmt: skip


def test_seq2seq_one_step_equals_the_hand_update_and_generation_still_works(tmp_path):
    from transformers import Seq2SeqTrainer, Seq2SeqTrainingArguments

    model, reference = _tiny_bart(), _tiny_bart()
    args_cls = sam_arguments(Seq2SeqTrainingArguments)
    args = args_cls(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=4, predict_with_generate=True,
                    generation_max_length=5, per_device_eval_batch_size=4, **COMMON)  # fmt: skip
    data = _pairs()
    trainer = Capture.of(Seq2SeqTrainer)(model=model, args=args, train_dataset=data, eval_dataset=data,
                                         optimizers=(torch.optim.SGD(model.parameters(), lr=LR), None))  # fmt: skip
    trainer.train()
    (inputs, n_items), _ = trainer.calls[:2]
    expected = hand_step(trainer, reference, inputs, n_items)
    for p, e in zip(model.parameters(), expected):
        torch.testing.assert_close(p.detach(), e, rtol=0, atol=1e-9)
    out = trainer.predict(data)
    assert out.predictions.shape[0] == 4 and out.predictions.dtype.kind == "i"  # generated token ids
    assert "test_loss" in out.metrics


# ------------------------------------------------------------------------------------- sentence-transformers


def test_sentence_transformers_one_step_equals_the_hand_update(tmp_path):
    st = pytest.importorskip("sentence_transformers")
    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments
    from sentence_transformers.losses import MultipleNegativesRankingLoss

    from recipes._data import bundled_model_path

    def load():
        model = st.SentenceTransformer(str(bundled_model_path("sentence-transformers/all-MiniLM-L6-v2")),
                                       device="cpu")  # fmt: skip
        for m in model.modules():
            if isinstance(m, nn.Dropout):
                m.p = 0.0
            if hasattr(m, "dropout_prob"):  # transformers 4.x: BERT's SDPA attention keeps its own dropout rate
                m.dropout_prob = 0.0
        return model

    model, reference = load(), load()
    pairs = Dataset.from_dict({"anchor": ["a cat sat", "dogs run fast", "the sky is blue", "I like tea"],
                               "positive": ["a kitten rested", "a dog runs", "blue sky", "tea is nice"]})  # fmt: skip
    args = sam_arguments(SentenceTransformerTrainingArguments)(output_dir=str(tmp_path), max_steps=1,
                                                               per_device_train_batch_size=4, **COMMON)  # fmt: skip
    trainer = Capture.of(SentenceTransformerTrainer)(
        model=model,
        args=args,
        train_dataset=pairs,
        loss=MultipleNegativesRankingLoss(model),
        optimizers=(torch.optim.SGD(model.parameters(), lr=LR), None),
    )
    trainer.train()
    (inputs, n_items), _ = trainer.calls
    trainer.loss = MultipleNegativesRankingLoss(reference)  # the same loss, on the reference copy
    expected = hand_step(trainer, reference, inputs, n_items)
    for p, e in zip(model.parameters(), expected):
        torch.testing.assert_close(p.detach(), e, rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), reference.parameters()))


# ----------------------------------------------------------------------------- subclasses, MRO, online RL


def test_custom_subclass_overriding_compute_loss_and_training_step_composes(tmp_path):
    from _lm import Sequences, tiny_lm

    from hf_ssam import SSAMTrainingArguments

    class Mine(Trainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            self.steps_seen = getattr(self, "steps_seen", 0) + 1
            return super().training_step(model, inputs, num_items_in_batch)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            self.loss_calls = getattr(self, "loss_calls", 0) + 1
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    class SSAMMine(SSAMMixin, Mine):
        pass

    args = SSAMTrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, **COMMON)
    trainer = SSAMMine(model=tiny_lm(), args=args, train_dataset=Sequences([5, 9, 12, 3]))
    trainer.train()
    assert trainer.state.global_step == 2 and "sam/gamma" in trainer.state.log_history[0]
    assert trainer.loss_calls == 2 and trainer.steps_seen == 2  # counters kept by the subclass: the first pass's


def test_mixin_after_the_trainer_is_refused_with_where_to_put_it():
    with pytest.raises(TypeError, match=r"SSAMMixin must come before the Trainer class.*class Wrong\(SSAMMixin, "):

        class Wrong(Trainer, SSAMMixin):
            pass


def test_inputs_are_prepared_once_per_micro_batch(tmp_path):
    """A trainer that generates while preparing inputs must not generate again for the second pass."""
    from _lm import Sequences, tiny_lm

    from hf_ssam import SSAMTrainingArguments

    class Generating(SSAMMixin, Trainer):
        def _prepare_inputs(self, inputs):
            self.generated = getattr(self, "generated", 0) + 1  # stands for sampling completions
            inputs = super()._prepare_inputs(inputs)
            inputs["labels"] = inputs["labels"].roll(self.generated, dims=-1)  # a batch that depends on the call
            return inputs

    seen = []
    model = tiny_lm()
    model.register_forward_pre_hook(  # the passes, not the once-per-run loss probe (under no_grad)
        lambda m, a, kw: seen.append(kw["labels"].clone()) if torch.is_grad_enabled() else None, with_kwargs=True
    )
    args = SSAMTrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2,
                                 gradient_accumulation_steps=2, **COMMON)  # fmt: skip
    trainer = Generating(model=model, args=args, train_dataset=Sequences([5, 9, 12, 3, 7, 8, 2, 16]))
    trainer.train()
    assert len(seen) == 8 and all(torch.equal(seen[i], seen[i + 1]) for i in range(0, 8, 2))
    assert not hasattr(type(trainer), "generated") and trainer.__dict__.get("_prepare_inputs") is None


def test_online_rl_trainers_are_refused_naming_the_class():
    from trl import GRPOTrainer

    class SSAMGRPO(SSAMMixin, GRPOTrainer):
        pass

    with pytest.raises(ValueError, match=r"SSAMGRPO builds on GRPOTrainer, which generates"):
        SSAMGRPO(model=None, reward_funcs=[], args=None)
