"""`SSAMBackward` in hand-written loops (Accelerate, plain PyTorch), against float64 hand computations.

The reference (`_reference`, numpy) computes each micro-batch's SAM gradient of its own mean loss; the accumulated
gradient is their mean, the base optimizer is SGD with momentum, written out by hand.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _reference import data, sam_gradient
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from test_host_sync import no_host_sync
from test_trainer import LinReg, Pairs, _theta
from torch.utils.data import DataLoader, SequentialSampler

from hf_ssam import VARIANTS, SSAMBackward, SSAMOptimizer, SSAMTrainer, SSAMTrainingArguments

LR, MOMENTUM, RHO, BATCH, STEPS = 0.1, 0.9, 0.2, 2, 3


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Each test builds its own Accelerator (the state is process-wide otherwise)."""
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def hand_run(variant, theta, x, y, k, steps=STEPS, rho=RHO):
    """SGD with momentum on the mean of the micro-batches' SAM gradients, in float64 numpy."""
    buf = None
    for s in range(steps):
        grads = []
        for i in range(k):
            lo = (s * k + i) * BATCH
            grads.append(sam_gradient(variant, theta, x[lo : lo + BATCH], y[lo : lo + BATCH], rho)[0])
        g = np.mean(grads, axis=0)
        buf = g if buf is None else MOMENTUM * buf + g  # torch's SGD: the first step's buffer is the gradient
        theta = theta - LR * buf
    return theta


def accelerate_run(variant, theta, x, y, k, **kw):
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=k)
    model = LinReg(theta)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    loader = DataLoader(Pairs(x, y), batch_size=BATCH, shuffle=False)
    model, opt, loader = accelerator.prepare(model, opt, loader)
    sam_backward = SSAMBackward(model, opt, accelerator=accelerator, variant=variant, rho=RHO, **kw)
    logs = []
    for batch in loader:
        with accelerator.accumulate(model):
            sam_backward(lambda batch=batch: model(**batch)["loss"])
            opt.step()
            opt.zero_grad()
        if accelerator.sync_gradients:
            logs.append(sam_backward.metrics())
    return model, logs


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("k", [1, 2, 4])
def test_accelerate_loop_matches_the_hand_computation(variant, k):
    theta, x, y = data(n=BATCH * k * STEPS, d=3)
    model, logs = accelerate_run(variant, theta, x, y, k)
    np.testing.assert_allclose(_theta(model), hand_run(variant, theta, x, y, k), rtol=0, atol=1e-10)
    assert len(logs) == STEPS and set(logs[0]) == {"sam/grad_norm", "sam/ascent_grad_norm", "sam/gamma",
                                                    "sam/ascent_loss", "sam/skipped"}  # fmt: skip
    norms = [np.linalg.norm(sam_gradient(variant, theta, x[i : i + BATCH], y[i : i + BATCH], RHO)[1][0])
             for i in range(0, BATCH * k, BATCH)]  # fmt: skip
    assert logs[0]["sam/grad_norm"] == pytest.approx(np.mean(norms), rel=1e-10)  # ‖g‖ of each micro-batch's mean


class InOrder(SSAMTrainer):
    def _get_train_sampler(self, *args, **kwargs):
        return SequentialSampler(self.train_dataset)


@pytest.mark.parametrize("variant", ["ssam", "sam"])
@pytest.mark.parametrize("k", [1, 2])
def test_accelerate_loop_equals_ssam_trainer(tmp_path, variant, k):
    theta, x, y = data(n=BATCH * k * STEPS, d=3)
    loop_model, _ = accelerate_run(variant, theta, x, y, k)
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    model = LinReg(theta)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    args = SSAMTrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True, save_strategy="no",
                                 max_grad_norm=0.0, per_device_train_batch_size=BATCH, gradient_accumulation_steps=k,
                                 max_steps=STEPS, sam_variant=variant, sam_rho=RHO, disable_tqdm=True)  # fmt: skip
    trainer = InOrder(model=model, args=args, train_dataset=Pairs(x, y),
                      optimizers=(opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)))  # fmt: skip
    trainer.train()
    np.testing.assert_allclose(_theta(loop_model), _theta(model), rtol=0, atol=1e-12)


@pytest.mark.parametrize("variant", ["ssam", "usam"])
@pytest.mark.parametrize("scaled", [False, True])
def test_plain_loop_with_accumulation_matches_the_hand_computation(variant, scaled):
    k = 4
    theta, x, y = data(n=BATCH * k * STEPS, d=3)
    model = LinReg(theta)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10) if scaled else None
    sam_backward = SSAMBackward(model, opt, variant=variant, rho=RHO, accumulation_steps=k, grad_scaler=scaler)
    xs, ys = torch.tensor(x), torch.tensor(y)
    for i in range(k * STEPS):
        xb, yb = xs[i * BATCH : (i + 1) * BATCH], ys[i * BATCH : (i + 1) * BATCH]
        sam_backward(lambda xb=xb, yb=yb: model(xb, yb)["loss"])
        if (i + 1) % k == 0:
            if scaler is None:
                opt.step()
            else:
                scaler.step(opt)
                scaler.update()
            opt.zero_grad()
    np.testing.assert_allclose(_theta(model), hand_run(variant, theta, x, y, k), rtol=0, atol=1e-10)


def test_accelerate_fp16_scaler_equals_the_unscaled_run_and_skips_an_overflow():
    k = 2
    theta, x, y = data(n=BATCH * k * STEPS, d=3)
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=k)
    accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)  # what fp16 on a GPU installs
    model = LinReg(theta)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    loader = DataLoader(Pairs(x, y), batch_size=BATCH, shuffle=False)
    model, opt, loader = accelerator.prepare(model, opt, loader)
    sam_backward = SSAMBackward(model, opt, accelerator=accelerator, variant="ssam", rho=RHO)
    seen = []
    model.register_forward_pre_hook(lambda m, a, kw: seen.append(m.w.detach().clone()), with_kwargs=True)
    for step, batch in enumerate(loader):
        with accelerator.accumulate(model):
            handle = model.w.register_hook(lambda g: torch.full_like(g, float("inf"))) if step == 0 else None
            sam_backward(lambda batch=batch: model(**batch)["loss"])  # the first micro-batch overflows
            if handle is not None:
                handle.remove()
            opt.step()
            opt.zero_grad()
    assert all(torch.isfinite(w).all() for w in seen)  # no inf ever written into the weights
    assert accelerator.scaler.get_scale() == 2.0**11  # the first update was skipped, and the scale backed off
    # The skipped update leaves w; the two later updates are the hand computation's first two steps from w.
    expected = hand_run("ssam", theta, x[BATCH * k :], y[BATCH * k :], k, steps=STEPS - 1)
    np.testing.assert_allclose(_theta(model), expected, rtol=0, atol=1e-10)
    assert sam_backward.metrics()["sam/skipped"] == 1


@pytest.mark.parametrize("overflow_in", ["first", "second"])
def test_plain_loop_grad_scaler_skips_an_overflow_in_either_pass(overflow_in):
    theta, x, y = data(n=8, d=3)
    model = LinReg(theta)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    sam_backward = SSAMBackward(model, opt, variant="ssam", rho=RHO, grad_scaler=scaler)
    backwards = []

    def plant(g):
        backwards.append(1)
        return torch.full_like(g, float("nan")) if len(backwards) == (1 if overflow_in == "first" else 2) else g

    handle = model.w.register_hook(plant)
    sam_backward(lambda: model(torch.tensor(x), torch.tensor(y))["loss"])
    handle.remove()
    np.testing.assert_array_equal(_theta(model), theta)  # w restored after the passes
    scaler.step(opt)
    scaler.update()
    np.testing.assert_array_equal(_theta(model), theta)  # the scaler skipped the step
    assert scaler.get_scale() == 2.0**11


def test_bf16_autocast_is_within_bf16_tolerance_of_fp32():
    k = 2
    theta, x, y = data(n=BATCH * k * STEPS, d=3)
    fp32, _ = accelerate_run("ssam", theta.astype(np.float32), x.astype(np.float32), y.astype(np.float32), k)
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=k, mixed_precision="bf16")
    model = LinReg(theta.astype(np.float32))
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    loader = DataLoader(Pairs(x.astype(np.float32), y.astype(np.float32)), batch_size=BATCH, shuffle=False)
    model, opt, loader = accelerator.prepare(model, opt, loader)
    sam_backward = SSAMBackward(model, opt, accelerator=accelerator, variant="ssam", rho=RHO)
    for batch in loader:
        with accelerator.accumulate(model):
            with accelerator.autocast():
                sam_backward(lambda batch=batch: model(**batch)["loss"])
            opt.step()
            opt.zero_grad()
    # One autocast region around both passes (a common way to write it): the second pass must not reuse autocast's
    # bf16 copies of w (its cast cache), or it runs at w, not at w + e (0.2 off here).
    np.testing.assert_allclose(_theta(model), _theta(fp32), rtol=0, atol=1e-2)
    assert not np.array_equal(_theta(model), _theta(fp32))  # autocast really ran in bf16


def test_a_call_has_no_host_sync():
    theta, x, y = data(n=8, d=3)
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    model = LinReg(theta)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    model, opt = accelerator.prepare(model, opt)
    for variant in VARIANTS:
        sam_backward = SSAMBackward(model, opt, accelerator=accelerator, variant=variant, rho=RHO)
        xb, yb = torch.tensor(x[:4]), torch.tensor(y[:4])
        with accelerator.accumulate(model), no_host_sync():
            sam_backward(lambda xb=xb, yb=yb: model(xb, yb)["loss"])
        assert sam_backward.metrics()["sam/gamma"] > 0  # read when asked


@pytest.mark.parametrize("error", [KeyboardInterrupt(), RuntimeError("CUDA out of memory. Tried to allocate 2 GiB")])
def test_an_exception_in_the_second_pass_leaves_w_and_the_earlier_gradient(error):
    theta, x, y = data(n=8, d=3)
    model = LinReg(theta)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    sam_backward = SSAMBackward(model, opt, variant="ssam", rho=RHO, accumulation_steps=2)
    xs, ys = torch.tensor(x), torch.tensor(y)
    sam_backward(lambda: model(xs[:2], ys[:2])["loss"])  # micro-batch 1 of 2: completes
    earlier = [p.grad.clone() for p in model.parameters()]
    calls = []

    def failing():
        calls.append(1)
        if len(calls) == 2:
            raise error  # in the second pass, at w + e
        return model(xs[2:4], ys[2:4])["loss"]

    with pytest.raises(type(error)) as raised:
        sam_backward(failing)
    assert raised.value is error  # propagates unchanged
    np.testing.assert_array_equal(_theta(model), theta)  # w, bitwise
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), earlier))  # the earlier micro-batch's
    sam_backward(lambda: model(xs[2:4], ys[2:4])["loss"])  # ready: the step goes on as if nothing happened
    opt.step()
    np.testing.assert_allclose(_theta(model), hand_run("ssam", theta, x, y, 2, steps=1), rtol=0, atol=1e-12)


def test_bad_settings_are_refused_naming_the_field():
    model = LinReg(data(n=4)[0])
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    with pytest.raises(ValueError, match=r"variant='SSAM' is not supported; choose one of"):
        SSAMBackward(model, opt, variant="SSAM")
    with pytest.raises(ValueError, match=r"rho=-1.0 is invalid"):
        SSAMBackward(model, opt, rho=-1.0)
    with pytest.raises(ValueError, match=r"sync_ascent='false' is invalid; choose one of \[True, False\]"):
        SSAMBackward(model, opt, sync_ascent="false")
    with pytest.raises(ValueError, match=r"accumulation_steps=0 is invalid"):
        SSAMBackward(model, opt, accumulation_steps=0)
    with pytest.raises(ValueError, match=r"takes the \*base\* optimizer"):
        SSAMBackward(model, SSAMOptimizer(model.parameters(), torch.optim.SGD, lr=LR))
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    with pytest.raises(ValueError, match=r"accumulation_steps=2 is for a loop without an accelerator"):
        SSAMBackward(model, opt, accelerator=accelerator, accumulation_steps=2)


def test_variant_none_is_the_plain_backward():
    theta, x, y = data(n=8, d=3)
    runs = []
    for variant in ("none", "ssam"):
        model = LinReg(theta)
        opt = torch.optim.SGD(model.parameters(), lr=LR)
        sam_backward = SSAMBackward(model, opt, variant=variant, rho=0.0, accumulation_steps=2)
        for i in range(2):
            sam_backward(
                lambda i=i, m=model: m(torch.tensor(x[4 * i : 4 * i + 4]), torch.tensor(y[4 * i : 4 * i + 4]))["loss"]
            )
        opt.step()
        runs.append(_theta(model))
    np.testing.assert_array_equal(runs[0], runs[1])  # ρ = 0 is the plain loop, bitwise
