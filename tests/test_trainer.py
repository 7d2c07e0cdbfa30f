"""SSAMTrainer: the step against float64 hand computations, and every Trainer feature users rely on."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _reference import data, sam_gradient
from _versions import TRANSFORMERS_4
from torch import nn
from torch.utils.data import Dataset, SequentialSampler
from transformers import Trainer, TrainingArguments

from hf_ssam import VARIANTS, SSAMMixin, SSAMTrainer, SSAMTrainingArguments

LR = 0.1
VARIANT_RENORM = [(v, None) for v in VARIANTS] + [(v, True) for v in ("sam", "usam", "asam")]


class Pairs(Dataset):
    def __init__(self, x, y):
        self.x, self.y = torch.as_tensor(x), torch.as_tensor(y)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "labels": self.y[i]}


class LinReg(nn.Module):
    """prediction = x·w + b, loss = mean squared error; float64 when built from the numpy reference."""

    def __init__(self, theta):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(theta[:-1]))
        self.b = nn.Parameter(torch.tensor(theta[-1:]))

    def forward(self, x, labels=None):
        pred = x @ self.w + self.b
        return {"loss": ((pred - labels) ** 2).mean(), "logits": pred}


class InOrder(SSAMTrainer):
    """Micro-batches in dataset order, so the hand computation knows which samples go together."""

    def _get_train_sampler(self, *args, **kwargs):
        return SequentialSampler(self.train_dataset)


class _UserTrainer(Trainer):
    """A Trainer subclass with its own training_step wrapper, as TRL's trainers have."""

    def training_step(self, *args, **kwargs):
        return super().training_step(*args, **kwargs)


class MixinInOrder(SSAMMixin, _UserTrainer):
    def _get_train_sampler(self, *args, **kwargs):
        return SequentialSampler(self.train_dataset)


@pytest.fixture(params=[InOrder, MixinInOrder], ids=["SSAMTrainer", "SSAMMixin+subclass"])
def trainer_cls(request):
    """The core guarantees hold for SSAMTrainer and for SSAMMixin composed with another Trainer subclass."""
    return request.param


def _args(tmp_path, **kw) -> SSAMTrainingArguments:
    base = dict(
        output_dir=str(tmp_path),
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        max_grad_norm=0.0,
        lr_scheduler_type="constant",
        learning_rate=LR,
        logging_steps=1,
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
    )
    base.update(kw)
    return SSAMTrainingArguments(**base)


def _theta(model):
    return np.concatenate([model.w.detach().numpy(), model.b.detach().numpy()])


def _sgd_trainer(tmp_path, theta, x, y, cls=InOrder, **kw):
    model = LinReg(theta)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    return cls(model=model, args=_args(tmp_path, **kw), train_dataset=Pairs(x, y), optimizers=(opt, sched))


# ------------------------------------------------------------------------------------------------ 1. maths


@pytest.mark.parametrize("variant, renormalize", VARIANT_RENORM)
def test_one_step_matches_hand_computation(tmp_path, variant, renormalize, trainer_cls):
    theta, x, y = data(n=8)
    trainer = _sgd_trainer(
        tmp_path, theta, x, y, cls=trainer_cls, sam_variant=variant, sam_rho=0.2, sam_renormalize=renormalize,
        per_device_train_batch_size=8, max_steps=1,
    )  # fmt: skip
    trainer.train()
    g_sam, (g_norm, g_asc_norm, gamma, ascent_loss) = sam_gradient(variant, theta, x, y, 0.2, renormalize)
    np.testing.assert_allclose(_theta(trainer.model), theta - LR * g_sam, rtol=0, atol=1e-10)
    log = trainer.state.log_history[0]  # 10. the logged quantities
    assert log["sam/grad_norm"] == pytest.approx(g_norm, abs=1e-10)
    assert log["sam/ascent_grad_norm"] == pytest.approx(g_asc_norm, abs=1e-10)
    assert log["sam/gamma"] == pytest.approx(gamma, abs=1e-10)
    assert log["sam/ascent_loss"] == pytest.approx(ascent_loss, abs=1e-10)
    assert log["sam/skipped"] == 0


@pytest.mark.parametrize("variant", [*VARIANTS, "none"])
def test_rho_zero_reproduces_the_base_optimizer_exactly(tmp_path, variant):
    theta, x, y = data(n=16)
    runs = []
    for v, rho in ((variant, 0.0), ("none", 0.05)):
        model = LinReg(theta)
        args = _args(
            tmp_path,
            sam_variant=v,
            sam_rho=rho,
            per_device_train_batch_size=4,
            max_steps=6,
            gradient_accumulation_steps=2,
            max_grad_norm=1.0,
            lr_scheduler_type="linear",
            learning_rate=0.05,
        )
        trainer = SSAMTrainer(model=model, args=args, train_dataset=Pairs(x, y))  # AdamW, shuffled data
        trainer.train()
        runs.append((_theta(model), [h.get("loss") for h in trainer.state.log_history]))
    assert np.array_equal(runs[0][0], runs[1][0])
    assert runs[0][1] == runs[1][1]


# --------------------------------------------------------------------------------------- 2. frozen weights


class Frozen(nn.Module):
    """A frozen 'encoder' and a trainable head; records the encoder weight seen by every forward pass."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.encoder = nn.Linear(4, 4)
        self.head = nn.Linear(4, 1)
        self.encoder.requires_grad_(False)
        self.seen_encoder, self.seen_head = [], []

    def forward(self, x, labels=None):
        self.seen_encoder.append(self.encoder.weight.detach().clone())
        self.seen_head.append(self.head.weight.detach().clone())
        pred = self.head(torch.tanh(self.encoder(x))).squeeze(-1)
        return {"loss": ((pred - labels) ** 2).mean()}


def test_only_trainable_parameters_are_perturbed(tmp_path):
    _, x, y = data(n=8, d=4)
    model = Frozen()
    enc0 = model.encoder.weight.detach().clone()
    trainer = SSAMTrainer(
        model=model, args=_args(tmp_path, sam_variant="sam", sam_rho=0.5, per_device_train_batch_size=4, max_steps=3),
        train_dataset=Pairs(x.astype(np.float32), y.astype(np.float32)),
    )  # fmt: skip
    trainer.train()
    assert len(model.seen_encoder) == 6
    assert all(torch.equal(w, enc0) for w in model.seen_encoder)  # never perturbed, not even transiently
    assert torch.equal(model.encoder.weight, enc0)
    assert not torch.equal(model.seen_head[0], model.seen_head[1])  # the head is perturbed in the second pass
    assert not torch.equal(model.head.weight, model.seen_head[0])  # and trained


# ------------------------------------------------------------------------------------------ 3. exact restore


@pytest.mark.parametrize("bf16", [False, True])
def test_restore_is_exact(tmp_path, bf16):
    _, x, y = data(n=8, d=4)
    model = Frozen()
    model.encoder.requires_grad_(True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # the step changes nothing: only the restore shows
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    args = _args(tmp_path, sam_variant="usam", sam_rho=0.37, per_device_train_batch_size=4, max_steps=2, bf16=bf16)
    trainer = SSAMTrainer(
        model=model, args=args, train_dataset=Pairs(x.astype(np.float32), y.astype(np.float32)),
        optimizers=(opt, sched),
    )  # fmt: skip
    trainer.train()
    assert any(not torch.equal(w, before["head.weight"]) for w in model.seen_head)  # it was perturbed
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_bf16_trains_and_matches_the_hand_computation_within_bf16_tolerance(tmp_path, trainer_cls):
    theta, x, y = data(n=8)
    theta32, x32, y32 = theta.astype(np.float32), x.astype(np.float32), y.astype(np.float32)
    trainer = _sgd_trainer(tmp_path, theta32, x32, y32, cls=trainer_cls, sam_variant="ssam", sam_rho=0.2,
                           per_device_train_batch_size=8, max_steps=1, bf16=True)  # fmt: skip
    trainer.train()
    g_sam, _ = sam_gradient("ssam", theta, x, y, 0.2)
    assert np.isfinite(trainer.state.log_history[0]["loss"])
    np.testing.assert_allclose(_theta(trainer.model), theta - LR * g_sam, rtol=0, atol=3e-2)


# ----------------------------------------------------------------------------------- 4. gradient accumulation


@pytest.mark.parametrize("k", [1, 2, 4])
@pytest.mark.parametrize("variant", ["ssam", "usam", "sam", "asam"])
def test_gradient_accumulation_averages_per_micro_batch_sam_gradients(tmp_path, k, variant, trainer_cls):
    theta, x, y = data(n=8)
    b = 8 // k
    trainer = _sgd_trainer(tmp_path, theta, x, y, cls=trainer_cls, sam_variant=variant, sam_rho=0.2,
                           per_device_train_batch_size=b, gradient_accumulation_steps=k, max_steps=1)  # fmt: skip
    trainer.train()
    per_micro = [sam_gradient(variant, theta, x[i * b : (i + 1) * b], y[i * b : (i + 1) * b], 0.2) for i in range(k)]
    expected = theta - LR * np.mean([g for g, _ in per_micro], axis=0)
    np.testing.assert_allclose(_theta(trainer.model), expected, rtol=0, atol=1e-10)
    log = trainer.state.log_history[0]
    assert log["sam/gamma"] == pytest.approx(np.mean([m[2] for _, m in per_micro]), abs=1e-10)
    assert log["sam/ascent_loss"] == pytest.approx(np.mean([m[3] for _, m in per_micro]), abs=1e-10)
    # the reported loss is the plain Trainer's (kept in float32 by the Trainer): the mean loss at w
    residuals = [x[i * b : (i + 1) * b] @ theta[:-1] + theta[-1] - y[i * b : (i + 1) * b] for i in range(k)]
    loss_digits = 5e-5 if TRANSFORMERS_4 else 1e-6  # transformers 4.x logs the loss rounded to 4 digits
    assert log["loss"] == pytest.approx(np.mean([np.mean(r**2) for r in residuals]), abs=loss_digits)


def _tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=2, n_head=2, resid_pdrop=0.1,
                     embd_pdrop=0.1, attn_pdrop=0.1)  # fmt: skip
    return GPT2LMHeadModel(cfg)


class Tokens(Dataset):
    """Variable-length token sequences, padded labels = -100, so num_items_in_batch matters."""

    def __init__(self, n=16):
        g = torch.Generator().manual_seed(1)
        self.items = []
        for i in range(n):
            length = 4 + i % 9
            ids = torch.randint(0, 64, (12,), generator=g)
            labels = ids.clone()
            labels[length:] = -100
            self.items.append({"input_ids": ids, "labels": labels})

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def test_loss_reporting_matches_trainer_with_loss_kwargs(tmp_path):
    """A model accepting loss kwargs (num_items_in_batch path): logged losses equal the plain Trainer's."""
    runs = []
    for variant, rho in (("none", 0.05), ("ssam", 0.0), ("ssam", 0.05)):
        model = _tiny_gpt2()
        args = _args(tmp_path, sam_variant=variant, sam_rho=rho, per_device_train_batch_size=2,
                     gradient_accumulation_steps=2, max_steps=4, learning_rate=1e-3)  # fmt: skip
        trainer = SSAMTrainer(model=model, args=args, train_dataset=Tokens())
        assert trainer.model_accepts_loss_kwargs
        trainer.train()
        runs.append(([h["loss"] for h in trainer.state.log_history if "loss" in h], model.lm_head.weight.clone()))
    assert runs[1][0] == runs[0][0]  # rho = 0, with dropout and accumulation: identical run
    assert torch.equal(runs[1][1], runs[0][1])
    assert runs[2][0][0] == runs[0][0][0]  # first step: the reported loss is the loss at w
    assert not torch.equal(runs[2][1], runs[0][1])


# ------------------------------------------------------------------------------------------------ 5. dropout


class DropoutNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 16), nn.Dropout(0.5), nn.Linear(16, 1))
        self.masks = []
        self.net[1].register_forward_hook(lambda m, i, o: self.masks.append(o == 0))

    def forward(self, x, labels=None):
        return {"loss": ((self.net(x).squeeze(-1) - labels) ** 2).mean()}


@pytest.mark.parametrize("replay", [True, False])
def test_both_passes_see_the_same_dropout_masks(tmp_path, replay):
    _, x, y = data(n=8, d=4)
    model = DropoutNet()
    args = _args(tmp_path, sam_variant="ssam", sam_rho=0.1, per_device_train_batch_size=8, max_steps=3,
                 sam_replay_rng=replay)  # fmt: skip
    SSAMTrainer(model=model, args=args, train_dataset=Pairs(x.astype(np.float32), y.astype(np.float32))).train()
    pairs = [(model.masks[2 * i], model.masks[2 * i + 1]) for i in range(3)]
    same = [torch.equal(a, b) for a, b in pairs]
    assert all(same) if replay else not any(same)
    assert not torch.equal(model.masks[0], model.masks[2])  # masks still change from step to step


# ---------------------------------------------------------------------------------------------- 6. BatchNorm


class BNNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(1, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 2)

    def forward(self, x, labels=None):
        h = torch.relu(self.bn(self.conv(x))).mean((2, 3))
        return {"loss": nn.functional.cross_entropy(self.fc(h), labels)}


class Images(Dataset):
    def __init__(self, n=8):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 1, 6, 6, generator=g)
        self.y = torch.randint(0, 2, (n,), generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "labels": self.y[i]}


def test_batchnorm_statistics_are_updated_once_per_step(tmp_path):
    ds = Images()
    model = BNNet()
    reference = BNNet()  # same init; one plain forward of the batch at w in train mode
    reference.train()
    with torch.no_grad():
        reference(ds.x, ds.y)
    trainer = InOrder(model=model, args=_args(tmp_path, sam_variant="ssam", sam_rho=0.5, per_device_train_batch_size=8,
                                              max_steps=1), train_dataset=ds)  # fmt: skip
    trainer.train()
    assert model.bn.num_batches_tracked.item() == 1
    torch.testing.assert_close(model.bn.running_mean, reference.bn.running_mean, rtol=0, atol=1e-7)
    torch.testing.assert_close(model.bn.running_var, reference.bn.running_var, rtol=0, atol=1e-7)


# -------------------------------------------------------------------------- 7. fp16 loss scaling, 8. bad norms


def _manual_step_trainer(tmp_path, theta, x, y, variant="usam", rho=0.2):
    trainer = _sgd_trainer(tmp_path, theta, x, y, sam_variant=variant, sam_rho=rho, per_device_train_batch_size=8,
                           max_steps=1)  # fmt: skip
    trainer.create_optimizer_and_scheduler(num_training_steps=1)
    trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    trainer.accelerator.gradient_state._set_sync_gradients(True)
    trainer.current_gradient_accumulation_steps = 1  # set by the training loop otherwise
    return trainer


@pytest.mark.parametrize("variant", ["usam", "ssam", "sam"])
def test_fp16_loss_scale_is_removed_before_perturbing(tmp_path, variant):
    theta, x, y = data(n=8)
    trainer = _manual_step_trainer(tmp_path, theta, x, y, variant=variant)
    model = trainer.model
    batch = {"x": torch.tensor(x), "labels": torch.tensor(y)}
    trainer.training_step(model, batch)
    g_sam, _ = sam_gradient(variant, theta, x, y, 0.2)
    got = np.concatenate([model.w.grad.numpy(), model.b.grad.numpy()])
    np.testing.assert_allclose(got, 2.0**12 * g_sam, rtol=1e-10)  # still in scaled units for the scaler
    np.testing.assert_array_equal(_theta(model), theta)  # weights restored
    scaler = trainer.accelerator.scaler
    scaler.step(trainer.optimizer)
    scaler.update()
    np.testing.assert_allclose(_theta(model), theta - LR * g_sam, rtol=0, atol=1e-10)


def test_fp16_overflow_in_the_ascent_pass_skips_the_perturbation_and_the_step(tmp_path):
    theta, x, y = data(n=8)
    trainer = _manual_step_trainer(tmp_path, theta, x, y, variant="ssam")
    model = trainer.model
    seen = []
    model.register_forward_pre_hook(lambda m, a, kw: seen.append(m.w.detach().clone()), with_kwargs=True)
    handle = model.w.register_hook(lambda g: torch.full_like(g, float("inf")))  # planted overflow
    trainer.training_step(model, {"x": torch.tensor(x), "labels": torch.tensor(y)})
    handle.remove()
    assert all(torch.equal(w, torch.tensor(theta[:-1])) for w in seen)  # no inf written into the weights
    scaler = trainer.accelerator.scaler
    scaler.step(trainer.optimizer)
    scaler.update()
    np.testing.assert_array_equal(_theta(model), theta)  # the scaler skipped the step
    assert scaler.get_scale() == 2.0**11  # and backed off
    assert trainer.sam_metrics()["sam/skipped"] == 1


def test_fp16_overflow_in_the_first_pass_alone_still_skips_the_step(tmp_path):
    """g overflowed, g_asc (at w: e = 0) did not: the scaler must still see the overflow and skip the step."""
    theta, x, y = data(n=8)
    trainer = _manual_step_trainer(tmp_path, theta, x, y, variant="ssam")
    model = trainer.model
    backwards = []

    def plant(g):
        backwards.append(1)
        return torch.full_like(g, float("inf")) if len(backwards) == 1 else g

    handle = model.w.register_hook(plant)
    trainer.training_step(model, {"x": torch.tensor(x), "labels": torch.tensor(y)})
    handle.remove()
    assert len(backwards) == 2
    scaler = trainer.accelerator.scaler
    scaler.step(trainer.optimizer)
    scaler.update()
    np.testing.assert_array_equal(_theta(model), theta)  # skipped
    assert scaler.get_scale() == 2.0**11


def test_zero_gradient_never_produces_nan(tmp_path):
    theta = np.zeros(4)
    x, y = np.zeros((8, 3)), np.zeros(8)
    trainer = _sgd_trainer(tmp_path, theta, x, y, sam_variant="ssam", sam_rho=0.5, per_device_train_batch_size=8,
                           max_steps=2)  # fmt: skip
    trainer.train()
    assert np.isfinite(_theta(trainer.model)).all()
    assert trainer.state.log_history[0]["sam/skipped"] == 1
    assert trainer.state.log_history[0]["sam/gamma"] == 1.0


# ------------------------------------------------------------------------------------------- 9. resume


def test_checkpoint_resume_continues_exactly(tmp_path, trainer_cls):
    _, x, y = data(n=32, d=4)
    cls = SSAMTrainer if trainer_cls is InOrder else MixinInOrder
    ds = Pairs(x.astype(np.float32), y.astype(np.float32))

    def run(out, max_steps, resume=None, save_steps=None):
        model = DropoutNet()
        args = _args(out, sam_variant="ssam", sam_rho=0.1, per_device_train_batch_size=4, max_steps=max_steps,
                     learning_rate=0.01, lr_scheduler_type="linear", save_strategy="steps" if save_steps else "no",
                     save_steps=save_steps or 500, gradient_accumulation_steps=2)  # fmt: skip
        trainer = cls(model=model, args=args, train_dataset=ds)
        trainer.train(resume_from_checkpoint=resume)
        return model

    straight = run(tmp_path / "a", 6)
    run(tmp_path / "b", 6, save_steps=3)  # writes checkpoint-3 (and checkpoint-6)
    resumed = run(tmp_path / "c", 6, resume=str(tmp_path / "b" / "checkpoint-3"))
    for (k, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=k)


# ------------------------------------------------------------------------------------ 12. what users pass


def _tiny_bert(**kw):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=16, num_labels=2, **kw)  # fmt: skip
    return BertForSequenceClassification(cfg)


class Sentences(Dataset):
    def __init__(self, n=16):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(1, 50, (n, 8), generator=g)
        self.labels = torch.randint(0, 2, (n,), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": torch.ones(8, dtype=torch.long), "labels": self.labels[i]}


@pytest.mark.parametrize("gradient_checkpointing", [False, True])
def test_transformers_model_with_labels(tmp_path, gradient_checkpointing):
    model = _tiny_bert()
    w0 = model.classifier.weight.detach().clone()
    args = _args(tmp_path, sam_variant="ssam", per_device_train_batch_size=4, max_steps=3, learning_rate=1e-3,
                 gradient_checkpointing=gradient_checkpointing, max_grad_norm=1.0)  # fmt: skip
    trainer = SSAMTrainer(model=model, args=args, train_dataset=Sentences())
    out = trainer.train()
    assert np.isfinite(out.training_loss)
    assert not torch.equal(model.classifier.weight, w0)
    assert all(np.isfinite(h["sam/gamma"]) for h in trainer.state.log_history if "loss" in h)


def test_gradient_checkpointing_gives_the_same_step(tmp_path):
    weights = []
    for gc in (False, True):
        model = _tiny_bert(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        args = _args(tmp_path, sam_variant="ssam", sam_rho=0.1, per_device_train_batch_size=4, max_steps=2,
                     learning_rate=1e-3, gradient_checkpointing=gc)  # fmt: skip
        SSAMTrainer(model=model, args=args, train_dataset=Sentences()).train()
        weights.append(model.classifier.weight.detach().clone())
    torch.testing.assert_close(weights[0], weights[1], rtol=0, atol=1e-6)


def test_custom_compute_loss_override(tmp_path):
    theta, x, y = data(n=8)

    class AbsLoss(InOrder):
        calls = 0

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            AbsLoss.calls += 1
            labels = inputs.pop("labels")  # pops: each pass must get its own copy of the batch
            pred = model(x=inputs["x"], labels=labels)["logits"]
            return ((pred - labels) ** 2).mean()

    trainer = _sgd_trainer(tmp_path, theta, x, y, cls=AbsLoss, sam_variant="ssam", sam_rho=0.2,
                           per_device_train_batch_size=8, max_steps=1)  # fmt: skip
    trainer.train()
    assert AbsLoss.calls == 2
    g_sam, _ = sam_gradient("ssam", theta, x, y, 0.2)
    np.testing.assert_allclose(_theta(trainer.model), theta - LR * g_sam, rtol=0, atol=1e-10)


def test_max_grad_norm_clips_the_final_gradient_once(tmp_path):
    theta, x, y = data(n=8)
    clip = 0.05
    trainer = _sgd_trainer(tmp_path, theta, x, y, sam_variant="ssam", sam_rho=0.2, per_device_train_batch_size=4,
                           gradient_accumulation_steps=2, max_steps=1, max_grad_norm=clip)  # fmt: skip
    trainer.train()
    g = np.mean([sam_gradient("ssam", theta, x[i * 4 : i * 4 + 4], y[i * 4 : i * 4 + 4], 0.2)[0] for i in range(2)], 0)
    g_clipped = g * min(1.0, clip / (np.linalg.norm(g) + 1e-6))  # torch's clip_grad_norm_ formula
    np.testing.assert_allclose(_theta(trainer.model), theta - LR * g_clipped, rtol=0, atol=1e-10)
    assert trainer.state.log_history[0]["grad_norm"] == pytest.approx(np.linalg.norm(g), abs=1e-10)


def test_optim_argument_and_momentum_state(tmp_path):
    theta, x, y = data(n=8)
    model = LinReg(theta)
    # AdamW's first moment is the momentum (transformers 4.x does not pass optim_args to optim="sgd")
    args = _args(tmp_path, sam_variant="ssam", per_device_train_batch_size=8, max_steps=2, optim="adamw_torch",
                 adam_beta1=0.8)  # fmt: skip
    trainer = SSAMTrainer(model=model, args=args, train_dataset=Pairs(x, y))
    trainer.train()
    opt = trainer.optimizer.optimizer
    assert isinstance(opt, torch.optim.AdamW) and opt.param_groups[0]["betas"][0] == 0.8
    assert "exp_avg" in opt.state[model.w] and opt.state[model.w]["step"] == 2


@pytest.mark.slow
def test_torch_compile(tmp_path):
    model = _tiny_bert()
    args = _args(tmp_path, sam_variant="ssam", per_device_train_batch_size=4, max_steps=2, torch_compile=True,
                 learning_rate=1e-3)  # fmt: skip
    out = SSAMTrainer(model=model, args=args, train_dataset=Sentences()).train()
    assert np.isfinite(out.training_loss)


def test_plain_training_arguments_are_promoted(tmp_path):
    theta, x, y = data(n=8)
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True, max_steps=1, logging_steps=1,
                             per_device_train_batch_size=8, learning_rate=LR, save_strategy="no")  # fmt: skip
    trainer = SSAMTrainer(model=LinReg(theta), args=args, train_dataset=Pairs(x, y))
    assert isinstance(trainer.args, SSAMTrainingArguments)
    assert trainer.args.sam_variant == "ssam" and trainer.args.sam_rho == 0.05
    assert trainer.args.learning_rate == LR and trainer.args.max_steps == 1
    trainer.train()
    assert "sam/gamma" in trainer.state.log_history[0]


# ------------------------------------------------------------------------------------------- sam_interval


def test_sam_interval_runs_two_passes_every_n_steps(tmp_path):
    _, x, y = data(n=32, d=4)
    calls = []

    class Counting(SSAMTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            calls.append(self.state.global_step)
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    model = DropoutNet()
    args = _args(tmp_path, sam_variant="ssam", sam_interval=3, per_device_train_batch_size=4,
                 gradient_accumulation_steps=2, max_steps=7)  # fmt: skip
    Counting(model=model, args=args, train_dataset=Pairs(x.astype(np.float32), y.astype(np.float32))).train()
    per_step = [calls.count(s) for s in range(7)]
    assert per_step == [4, 2, 2, 4, 2, 2, 4]  # 2 micro-batches × (2 passes on SAM steps, 1 otherwise)


def test_sam_interval_one_is_the_default_step(tmp_path):
    _, x, y = data(n=16, d=4)
    ds = Pairs(x.astype(np.float32), y.astype(np.float32))
    weights = []
    for extra in ({}, {"sam_interval": 1}):
        model = DropoutNet()
        args = _args(tmp_path, sam_variant="ssam", per_device_train_batch_size=4, max_steps=4, **extra)
        SSAMTrainer(model=model, args=args, train_dataset=ds).train()
        weights.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    assert torch.equal(weights[0], weights[1])


def test_sam_interval_pattern_survives_resume(tmp_path):
    _, x, y = data(n=32, d=4)
    ds = Pairs(x.astype(np.float32), y.astype(np.float32))
    calls = []

    class Counting(SSAMTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            calls.append(self.state.global_step)
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    def run(out, resume=None, save=False):
        calls.clear()
        model = DropoutNet()
        args = _args(out, sam_variant="ssam", sam_interval=3, per_device_train_batch_size=4, max_steps=7,
                     gradient_accumulation_steps=2, save_strategy="steps" if save else "no", save_steps=4)  # fmt: skip
        Counting(model=model, args=args, train_dataset=ds).train(resume_from_checkpoint=resume)
        return torch.cat([p.detach().reshape(-1) for p in model.parameters()]), list(calls)

    straight, _ = run(tmp_path / "a", save=True)
    resumed, resumed_calls = run(tmp_path / "b", resume=str(tmp_path / "a" / "checkpoint-4"))
    assert [resumed_calls.count(s) for s in range(4, 7)] == [2, 2, 4]  # steps 4, 5 plain; step 6 two-pass
    torch.testing.assert_close(resumed, straight, rtol=0, atol=1e-6)
