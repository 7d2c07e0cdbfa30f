"""Which parameters a Trainer step perturbs, and what every other parameter's gradient is.

The SAM set is what the optimizer updates and requires a gradient, read at every step. Every parameter that
receives a gradient ends the step with exactly what plain training gives it, except the SAM set, which gets the SAM
gradient: gradual unfreezing is seen at the next step, and a parameter outside the optimizer keeps its plain
gradient (it enters clipping as in plain training).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset, SequentialSampler
from transformers import TrainerCallback

from hf_ssam import SSAMTrainer, SSAMTrainingArguments

LR, RHO = 0.1, 0.2


class Pairs(Dataset):
    def __init__(self, n=16):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 4, generator=g, dtype=torch.float64)
        self.y = torch.randn(n, generator=g, dtype=torch.float64)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "labels": self.y[i]}


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Linear(4, 8).double()
        self.head = nn.Linear(8, 1).double()

    def forward(self, x, labels=None):
        pred = self.head(torch.tanh(self.body(x))).squeeze(-1)
        return {"loss": ((pred - labels) ** 2).mean()}


class InOrder(SSAMTrainer):
    def _get_train_sampler(self, *args, **kwargs):
        return SequentialSampler(self.train_dataset)


class Unfreeze(TrainerCallback):
    """Gradual unfreezing: the body starts to train after the first optimizer step."""

    def __init__(self, model, add_group=None):
        self.model, self.add_group = model, add_group

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 1:
            self.model.body.requires_grad_(True)
            if self.add_group is not None:
                self.add_group(list(self.model.body.parameters()))


class ConstantLR:
    def step(self):
        pass

    def get_last_lr(self):
        return [LR]

    def state_dict(self):
        return {}


def _args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), report_to="none", use_cpu=True, save_strategy="no", disable_tqdm=True,
                logging_steps=1, max_steps=3, per_device_train_batch_size=4, learning_rate=LR,
                lr_scheduler_type="constant", max_grad_norm=0.0)  # fmt: skip
    base.update(kw)
    return SSAMTrainingArguments(**base)


def _run(tmp_path, scenario, variant, rho, k=1, clip=0.0):
    model = MLP()
    if scenario == "unfreeze":  # the optimizer holds every parameter; the body is frozen at first
        model.body.requires_grad_(False)
        opt = torch.optim.SGD(model.parameters(), lr=LR)
        callbacks = [Unfreeze(model)]
    elif scenario == "unfreeze-add-group":  # the body joins the optimizer when it is unfrozen
        model.body.requires_grad_(False)
        opt = torch.optim.SGD(model.head.parameters(), lr=LR)
        callbacks = [Unfreeze(model, lambda params: opt.add_param_group({"params": params}))]
    else:  # "head-only": the optimizer updates the head; the body requires grad and is never stepped
        opt = torch.optim.SGD(model.head.parameters(), lr=LR)
        callbacks = []
    args = _args(tmp_path, sam_variant=variant, sam_rho=rho, gradient_accumulation_steps=k, max_grad_norm=clip)
    sched = ConstantLR()  # torch's schedulers do not take groups added later
    trainer = InOrder(model=model, args=args, train_dataset=Pairs(), optimizers=(opt, sched), callbacks=callbacks)
    grads = []  # every parameter's gradient as the optimizer sees it, at every step
    real_step = opt.step

    def step(*a, **kw):
        grads.append({n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()})
        return real_step(*a, **kw)

    opt.step = step
    trainer.train()
    return model, grads


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("scenario, clip", [("unfreeze", 0.0), ("unfreeze-add-group", 0.0), ("head-only", 0.0),
                                            ("head-only", 0.05)])  # fmt: skip
def test_rho_zero_equals_plain_training_bitwise(tmp_path, scenario, clip, k):
    plain, plain_grads = _run(tmp_path, scenario, "none", RHO, k, clip)
    sam, sam_grads = _run(tmp_path, scenario, "ssam", 0.0, k, clip)
    assert plain_grads == [] or len(plain_grads) == 3
    for a, b in zip(plain_grads, sam_grads):
        for name in a:
            assert (a[name] is None) == (b[name] is None), name
            if a[name] is not None:
                assert torch.equal(a[name], b[name]), name
    for (name, p), q in zip(plain.named_parameters(), sam.parameters()):
        assert torch.equal(p, q), name


def _hand_ssam(model, batch, params, rho):
    """γ·g_asc over ``params`` (perturbed alone), and the plain gradient of every other parameter."""
    named = dict(model.named_parameters())
    everything = list(named.values())

    def grads():
        loss = model(**batch)["loss"]
        return dict(zip(named, torch.autograd.grad(loss, everything)))

    g = grads()
    w0 = {n: named[n].detach().clone() for n in params}
    g_norm = torch.sqrt(sum((g[n] ** 2).sum() for n in params))  # ‖g‖ over the SAM set
    with torch.no_grad():
        for n in params:
            named[n].add_(rho * g[n])  # w + e, e = ρ·g
    g_asc = grads()
    with torch.no_grad():
        for n in params:
            named[n].copy_(w0[n])
    gamma = g_norm / torch.sqrt(sum((g_asc[n] ** 2).sum() for n in params))  # γ = ‖g‖/‖g_asc‖
    return {n: gamma * g_asc[n] if n in params else g[n] for n in named}


def test_head_only_optimizer_with_clipping_matches_the_hand_computation(tmp_path):
    """The body's plain gradient (not g + g_asc) enters the clipping norm of the head's SAM gradient."""
    clip = 0.05
    model, grads = _run(tmp_path, "head-only", "ssam", RHO, 1, clip)
    reference = MLP()
    data = Pairs()
    head = ["head.weight", "head.bias"]
    for step in range(3):
        batch = {"x": data.x[4 * step : 4 * step + 4], "labels": data.y[4 * step : 4 * step + 4]}
        expected = _hand_ssam(reference, batch, head, RHO)
        total = torch.sqrt(sum((t**2).sum() for t in expected.values()))
        coef = min(1.0, clip / (float(total) + 1e-6))  # torch's clip_grad_norm_
        assert coef < 1.0  # clipping is active
        for name, t in expected.items():
            torch.testing.assert_close(grads[step][name], t * coef, rtol=0, atol=1e-12)
        with torch.no_grad():
            for name in head:
                dict(reference.named_parameters())[name].sub_(LR * coef * expected[name])
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-12)


def test_unfrozen_parameters_join_the_sam_set_at_the_next_step(tmp_path):
    model, grads = _run(tmp_path, "unfreeze", "ssam", RHO)
    reference = MLP()
    data = Pairs()
    for step in range(3):
        batch = {"x": data.x[4 * step : 4 * step + 4], "labels": data.y[4 * step : 4 * step + 4]}
        trained = ["head.weight", "head.bias"] + (["body.weight", "body.bias"] if step >= 1 else [])
        expected = _hand_ssam(reference, batch, trained, RHO)
        for name in trained:
            torch.testing.assert_close(grads[step][name], expected[name], rtol=0, atol=1e-12)
        with torch.no_grad():
            for name in trained:
                dict(reference.named_parameters())[name].sub_(LR * expected[name])
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-12)


@pytest.mark.parametrize("key, value", [("rho", 0.1), ("variant", "sam"), ("asam_eta", 0.1)])
def test_per_group_sam_settings_are_refused(tmp_path, key, value):
    model = MLP()
    opt = torch.optim.SGD([{"params": model.body.parameters()}, {"params": model.head.parameters(), key: value}],
                          lr=LR)  # fmt: skip
    with pytest.raises(ValueError, match=rf"parameter group 1 sets {key}={value!r}: SSAMTrainer and SSAMMixin take"):
        InOrder(model=model, args=_args(tmp_path), train_dataset=Pairs(), optimizers=(opt, None))


def test_a_base_optimizers_own_rho_is_not_a_sam_setting(tmp_path):
    model = MLP()
    opt = torch.optim.Adadelta(model.parameters(), lr=LR, rho=0.8)  # Adadelta's own ρ, in every group
    trainer = InOrder(model=model, args=_args(tmp_path, max_steps=1), train_dataset=Pairs(), optimizers=(opt, None))
    trainer.train()
    assert trainer.state.global_step == 1
