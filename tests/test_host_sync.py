"""The SAM step never waits for the host: no `bool()`, `.item()` or `.cpu()` on a tensor inside a step.

On a GPU each of those stalls the stream until the queued kernels finish. They are patched to raise while
`training_step` runs (CPU tensors stand in for device tensors here: the calls are what is checked).
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
from _reference import data
from test_trainer import LinReg, Pairs, _args, _manual_step_trainer

from hf_ssam import VARIANTS, SSAMTrainer


@contextlib.contextmanager
def no_host_sync():
    def refuse(name):
        def call(self, *args, **kwargs):
            raise AssertionError(f"Tensor.{name} called inside the step (a host synchronisation)")

        return call

    saved = {name: getattr(torch.Tensor, name) for name in ("__bool__", "item", "cpu", "tolist", "__float__")}
    for name in saved:
        setattr(torch.Tensor, name, refuse(name))
    try:
        yield
    finally:
        for name, method in saved.items():
            setattr(torch.Tensor, name, method)


def test_the_patch_catches_a_sync():
    with no_host_sync(), pytest.raises(AssertionError, match="Tensor.__bool__"):
        bool(torch.ones(()) > 0)


@pytest.mark.parametrize("renormalize", [None, True])
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("k", [1, 2])
def test_training_step_has_no_host_sync(tmp_path, variant, renormalize, k):
    theta, x, y = data(n=8)
    model = LinReg(theta)
    args = _args(tmp_path, sam_variant=variant, sam_renormalize=renormalize, per_device_train_batch_size=8 // k,
                 gradient_accumulation_steps=k, max_steps=1)  # fmt: skip
    trainer = SSAMTrainer(model=model, args=args, train_dataset=Pairs(x, y))
    trainer.create_optimizer_and_scheduler(num_training_steps=1)
    trainer.current_gradient_accumulation_steps = k
    batches = [{"x": torch.tensor(x[i::k]), "labels": torch.tensor(y[i::k])} for i in range(k)]
    with no_host_sync():
        for i, batch in enumerate(batches):
            trainer.accelerator.gradient_state._set_sync_gradients(i == k - 1)
            trainer.training_step(trainer.model, batch)
    assert np.isfinite(trainer.sam_metrics()["sam/gamma"])  # the metrics are read later, at logging time


def test_fp16_step_and_overflow_skip_have_no_host_sync(tmp_path):
    theta, x, y = data(n=8)
    trainer = _manual_step_trainer(tmp_path, theta, x, y, variant="ssam")
    model = trainer.model
    batch = {"x": torch.tensor(x), "labels": torch.tensor(y)}
    with no_host_sync():
        trainer.training_step(model, batch)  # a normal fp16 step
    handle = model.w.register_hook(lambda g: torch.full_like(g, float("inf")))  # planted overflow
    with no_host_sync():
        trainer.training_step(model, batch)
    handle.remove()
    assert trainer.sam_metrics()["sam/skipped"] == 1
