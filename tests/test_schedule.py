"""Which steps are SAM steps (`sam_start`, `sam_interval`) and what the steps between them do (`sam_reuse`).

Checked through `SSAMTrainer` against an independent float64 hand computation of the schedule: a small MLP,
full batch, SGD without momentum, constant learning rate, no clipping.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset, SequentialSampler

from hf_ssam import SSAMTrainer, SSAMTrainingArguments

LR, RHO, ALPHA, STEPS, N = 0.2, 0.3, 0.7, 8, 12


class Points(Dataset):
    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(N, 3, generator=g, dtype=torch.float64)
        self.y = torch.randn(N, generator=g, dtype=torch.float64)

    def __len__(self):
        return N

    def __getitem__(self, i):
        return {"x": self.x[i], "labels": self.y[i]}


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 1)).double()
        self.forwards = 0

    def forward(self, x, labels=None):
        self.forwards += 1
        return {"loss": ((self.net(x).squeeze(-1) - labels) ** 2).mean()}


class InOrder(SSAMTrainer):
    def _get_train_sampler(self, *args, **kwargs):
        return SequentialSampler(self.train_dataset)


def _flat(ts):
    return torch.cat([t.reshape(-1) for t in ts])


def hand_run(variant, start, interval, reuse, steps=STEPS):
    """The schedule written out: SAM at s >= start with (s - start) % interval == 0; reuse or plain otherwise."""
    model, data = MLP(), Points()
    params = list(model.parameters())

    def grad():
        loss = model(data.x, data.y)["loss"]
        return _flat(torch.autograd.grad(loss, params))

    def set_w(flat):
        with torch.no_grad():
            torch.nn.utils.vector_to_parameters(flat, params)

    w = _flat(params).detach().clone()
    v = None
    kinds = []
    for s in range(steps):
        set_w(w)
        g = grad()
        if s >= start and (s - start) % interval == 0:
            e = RHO * g / g.norm() if variant == "sam" else RHO * g  # e = ρ·g/‖g‖ (sam), ρ·g (ssam)
            set_w(w + e)
            g_asc = grad()
            v = g_asc - (g_asc @ g) / (g @ g) * g  # the part of g_asc orthogonal to g
            update = g.norm() / g_asc.norm() * g_asc if variant == "ssam" else g_asc  # γ·g_asc (ssam)
            kinds.append("sam")
        elif s >= start and reuse and v is not None:
            update = g + ALPHA * g.norm() / v.norm() * v  # g + α·(‖g‖/‖v‖)·v
            if variant == "ssam":
                update = g.norm() / update.norm() * update  # rescaled to ‖g‖
            kinds.append("reuse")
        else:
            update = g
            kinds.append("plain")
        w = w - LR * update
    return w, kinds


def _args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), report_to="none", use_cpu=True, save_strategy="no", disable_tqdm=True,
                logging_steps=1, max_steps=STEPS, per_device_train_batch_size=N, learning_rate=LR,
                lr_scheduler_type="constant", max_grad_norm=0.0, sam_rho=RHO, sam_reuse_alpha=ALPHA)  # fmt: skip
    base.update(kw)
    return SSAMTrainingArguments(**base)


def _train(tmp_path, **kw):
    model = MLP()
    trainer = InOrder(model=model, args=_args(tmp_path, **kw), train_dataset=Points(),
                      optimizers=(torch.optim.SGD(model.parameters(), lr=LR), None))  # fmt: skip
    forwards = []
    real = trainer.training_step

    def counted(*a, **k):
        before = model.forwards
        out = real(*a, **k)
        forwards.append(model.forwards - before)
        return out

    trainer.training_step = counted
    trainer.train()
    return model, trainer, forwards


SCHEDULES = [  # (variant, sam_start, start as a step, interval, reuse)
    ("ssam", 3, 3, 1, False),
    ("ssam", 0.3, math.ceil(0.3 * STEPS), 1, False),  # a fraction, rounded up: step 3
    ("sam", 2, 2, 3, False),
    ("ssam", 0, 0, 3, True),
    ("sam", 0, 0, 3, True),
    ("ssam", 0.25, 2, 2, True),
]


@pytest.mark.parametrize("variant, sam_start, start, interval, reuse", SCHEDULES)
def test_schedule_matches_the_hand_computation(tmp_path, variant, sam_start, start, interval, reuse):
    model, trainer, forwards = _train(tmp_path, sam_variant=variant, sam_start=sam_start, sam_interval=interval,
                                      sam_reuse=reuse)  # fmt: skip
    expected, kinds = hand_run(variant, start, interval, reuse)
    torch.testing.assert_close(_flat(model.parameters()).detach(), expected, rtol=0, atol=1e-9)
    assert forwards == [2 if kind == "sam" else 1 for kind in kinds]  # a reuse step is one forward and one backward
    if reuse:
        used = [h["sam/reused"] for h in trainer.state.log_history if "sam/reused" in h]
        assert used == [1.0 if kind == "reuse" else 0.0 for kind in kinds]
        assert "reuse" in kinds


def test_start_zero_is_the_default_schedule(tmp_path):
    a, _, _ = _train(tmp_path, sam_interval=2)
    b, _, _ = _train(tmp_path, sam_interval=2, sam_start=0)
    assert torch.equal(_flat(a.parameters()), _flat(b.parameters()))


def test_reuse_direction_survives_a_checkpoint(tmp_path):
    """Resumed at step 3, whose reuse step needs the direction kept at step 2: the run continues exactly."""
    kw = dict(sam_variant="ssam", sam_interval=2, sam_reuse=True)
    full, _, _ = _train(tmp_path / "full", **kw)
    _train(tmp_path / "cut", save_strategy="steps", save_steps=3, **kw)
    resumed = MLP()
    trainer = InOrder(model=resumed, args=_args(tmp_path / "cut", **kw), train_dataset=Points(),
                      optimizers=(torch.optim.SGD(resumed.parameters(), lr=LR), None))  # fmt: skip
    trainer.train(resume_from_checkpoint=str(tmp_path / "cut" / "checkpoint-3"))
    assert (tmp_path / "cut" / "checkpoint-3" / "sam_direction_0.pt").is_file()
    assert torch.equal(_flat(resumed.parameters()), _flat(full.parameters()))


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("sam_start", -1, r"sam_start=-1 is invalid"),
        ("sam_start", True, r"sam_start=True is invalid"),
        ("sam_start", 1.5, r"sam_start=1.5 is invalid"),
        ("sam_start", "half", r"sam_start='half' is invalid"),
        ("sam_reuse", "yes", r"sam_reuse='yes' is invalid; choose one of \[True, False\]"),
        ("sam_reuse_alpha", -0.1, r"sam_reuse_alpha=-0.1 is invalid"),
        ("sam_reuse_alpha", float("nan"), r"sam_reuse_alpha=nan is invalid"),
    ],
)
def test_bad_values_are_refused_when_built_and_when_training_starts(tmp_path, field, value, message):
    with pytest.raises(ValueError, match=message):
        _args(tmp_path, sam_interval=2, **{field: value})
    args = _args(tmp_path, sam_interval=2)
    setattr(args, field, value)
    model = MLP()
    trainer = InOrder(model=model, args=args, train_dataset=Points())
    with pytest.raises(ValueError, match=message):
        trainer.train()


def test_reuse_needs_steps_between_sam_steps(tmp_path):
    with pytest.raises(ValueError, match=r"sam_reuse=True with sam_interval=1 is invalid"):
        _args(tmp_path, sam_reuse=True)


def test_start_values_that_are_accepted(tmp_path):
    assert _args(tmp_path, sam_start=100.0).sam_start_step(1000) == 100  # a whole float: a step
    assert _args(tmp_path, sam_start="0.5").sam_start_step(7) == 4  # YAML's string, a fraction rounded up
    assert _args(tmp_path, sam_start=0.75).sam_start_step(200) == 150


@pytest.mark.parametrize("variant", ["ssam", "sam"])
def test_reuse_with_accumulation_keeps_the_mean_direction_of_the_micro_batches(tmp_path, variant):
    """Two micro-batches per step: v is the mean of their v_i, and each micro-batch's g_i gets the direction."""
    start, interval, k = 1, 2, 2
    model, trainer, forwards = _train(tmp_path, sam_variant=variant, sam_start=start, sam_interval=interval,
                                      sam_reuse=True, per_device_train_batch_size=N // k,
                                      gradient_accumulation_steps=k)  # fmt: skip
    ref, data = MLP(), Points()
    params = list(ref.parameters())
    halves = [(data.x[i * N // k : (i + 1) * N // k], data.y[i * N // k : (i + 1) * N // k]) for i in range(k)]

    def grad(x, y):
        return _flat(torch.autograd.grad(ref(x, y)["loss"], params))

    def set_w(flat):
        with torch.no_grad():
            torch.nn.utils.vector_to_parameters(flat, params)

    w, v, kinds = _flat(params).detach().clone(), None, []
    for s in range(STEPS):
        updates, vs = [], []
        sam = s >= start and (s - start) % interval == 0
        for x, y in halves:
            set_w(w)
            g = grad(x, y)
            if sam:
                set_w(w + (RHO * g / g.norm() if variant == "sam" else RHO * g))
                g_asc = grad(x, y)
                vs.append(g_asc - (g_asc @ g) / (g @ g) * g)
                updates.append(g.norm() / g_asc.norm() * g_asc if variant == "ssam" else g_asc)
            elif s >= start and v is not None:
                u = g + ALPHA * g.norm() / v.norm() * v
                updates.append(g.norm() / u.norm() * u if variant == "ssam" else u)
            else:
                updates.append(g)
        if sam:
            v = sum(vs) / k  # the mean of the micro-batches' v_i
        kinds.append("sam" if sam else "reuse" if s >= start and v is not None else "plain")
        w = w - LR * sum(updates) / k
    torch.testing.assert_close(_flat(model.parameters()).detach(), w, rtol=0, atol=1e-9)
    assert forwards == [2 if kind == "sam" else 1 for kind in kinds for _ in range(k)]
    assert "reuse" in kinds
