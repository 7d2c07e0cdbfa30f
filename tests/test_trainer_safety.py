"""An exception inside a Trainer's SAM step leaves the weights at w, bitwise, and the trainer ready to go on.

The second pass runs at w + e; whatever raises there (an out-of-memory error, ``KeyboardInterrupt``, a bug in a
`compute_loss`) propagates unchanged, and the weights, the gradient of earlier micro-batches and the trainer's
state are as they were before the micro-batch. `auto_find_batch_size` retries from w.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from hf_ssam import SSAMTrainer, SSAMTrainingArguments

OOM = "CUDA out of memory. Tried to allocate 2.00 GiB"  # what accelerate's batch-size finder looks for


class Pairs(Dataset):
    def __init__(self, n=16):
        g = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(n, 4, generator=g), torch.randn(n, generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "labels": self.y[i]}


class Failing(nn.Module):
    """An MLP whose forward raises ``error`` at the forward calls listed in ``fail_at`` (1-based)."""

    def __init__(self, error, fail_at):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
        self.error, self.fail_at, self.calls, self.weights_seen = error, set(fail_at), 0, []

    def forward(self, x, labels=None):
        self.calls += 1
        self.weights_seen.append(self.net[0].weight.detach().clone())
        if self.calls in self.fail_at:
            raise self.error
        return {"loss": ((self.net(x).squeeze(-1) - labels) ** 2).mean()}


def _args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), report_to="none", use_cpu=True, save_strategy="no", disable_tqdm=True,
                per_device_train_batch_size=4, max_steps=2, learning_rate=0.1, sam_rho=0.5,
                logging_steps=1)  # fmt: skip
    base.update(kw)
    return SSAMTrainingArguments(**base)


def _weights(model):
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("error", [RuntimeError(OOM), KeyboardInterrupt(), ValueError("a bug in compute_loss")])
@pytest.mark.parametrize("k", [1, 2])
def test_an_exception_in_the_second_pass_leaves_w(tmp_path, error, k):
    fail_at = 2 * k  # the second pass of the last micro-batch of the first step
    model = Failing(error, [fail_at])
    w0 = _weights(model)
    trainer = SSAMTrainer(model=model, args=_args(tmp_path, gradient_accumulation_steps=k), train_dataset=Pairs())
    with pytest.raises(type(error)) as raised:
        trainer.train()
    assert raised.value is error  # unchanged
    assert not torch.equal(model.weights_seen[fail_at - 1], w0[0])  # it really was raised at w + e
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), w0))  # w, bitwise: save_model saves w
    if k == 2:  # the first micro-batch's SAM gradient is still there, as it was before the failing one
        assert all(p.grad is not None for p in model.parameters())


def test_a_trainer_that_raised_trains_on_like_a_fresh_one(tmp_path):
    model = Failing(KeyboardInterrupt(), [2])
    trainer = SSAMTrainer(model=model, args=_args(tmp_path), train_dataset=Pairs())
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    model.fail_at = set()
    trainer.train()  # the user re-runs the cell
    fresh = Failing(None, [])
    SSAMTrainer(model=fresh, args=_args(tmp_path), train_dataset=Pairs()).train()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), fresh.parameters()))


def test_auto_find_batch_size_retries_from_w(tmp_path):
    """An out-of-memory error in the second pass shrinks the batch and starts again: from w, not from w + e."""
    model = Failing(RuntimeError(OOM), [2])
    w0 = _weights(model)
    args = _args(tmp_path, auto_find_batch_size=True, per_device_train_batch_size=8, learning_rate=0.0,
                 lr_scheduler_type="constant")  # fmt: skip
    trainer = SSAMTrainer(model=model, args=args, train_dataset=Pairs())
    trainer.train()
    assert trainer._train_batch_size < 8  # the finder made the batch smaller once
    assert model.calls > 2 and trainer.state.global_step == 2  # and trained on
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), w0))  # lr = 0: w bitwise
