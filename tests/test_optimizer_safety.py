"""SSAMOptimizer after an exception at w + e: the weights are back at w bitwise and the next step is exact.

Each test compares with the float64 hand computation of `_reference` (one SGD-momentum step of the SAM family).
"""

import numpy as np
import pytest
import torch
from _reference import data, sam_gradient
from test_optimizer import LinReg, _theta
from torch import nn

from hf_ssam import VARIANTS, SSAMOptimizer
from hf_ssam import optimizer as optimizer_module

LR = 0.1
RHO = 0.2
OOM = "CUDA out of memory. Tried to allocate 20.00 MiB"


def _weights(model):
    return [p.detach().clone() for p in model.parameters()]


def _assert_bitwise_at(model, weights):
    for p, w in zip(model.parameters(), weights):
        assert torch.equal(p, w)


def _optimizer(model, variant, api):
    if api == "wrap":
        base = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
        return SSAMOptimizer.wrap(base, variant=variant, rho=RHO)
    return SSAMOptimizer(model.parameters(), torch.optim.SGD, variant=variant, rho=RHO, lr=LR, momentum=0.9)


def _expected_one_step(variant, theta, x, y):
    g_sam, _ = sam_gradient(variant, theta, x, y, RHO)  # γ·g_asc (ssam) or g_asc, by hand
    return theta - LR * g_sam  # SGD with momentum: the first step is w − lr·g


def _closure(model, xt, yt, fail_on_call=None, error=None):
    calls = []

    def closure():
        calls.append(1)
        loss = ((model(xt) - yt) ** 2).mean()
        loss.backward()
        if len(calls) == fail_on_call:
            raise error
        return loss

    return closure


@pytest.mark.parametrize("make_error", [KeyboardInterrupt, lambda: RuntimeError(OOM)], ids=["interrupt", "oom"])
@pytest.mark.parametrize("api", ["constructor", "wrap"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_exception_in_the_second_closure_call_leaves_w_and_the_next_step_is_exact(make_error, api, variant):
    theta, x, y = data()
    xt, yt = torch.tensor(x), torch.tensor(y)
    model = LinReg(theta)
    opt = _optimizer(model, variant, api)
    w = _weights(model)
    error = make_error()
    with pytest.raises(type(error)) as raised:
        opt.step(_closure(model, xt, yt, fail_on_call=2, error=error))
    assert raised.value is error  # propagated unchanged
    _assert_bitwise_at(model, w)
    assert all(p.grad is None for p in model.parameters())  # the partial g_asc is dropped
    assert not opt.state and opt.last_metrics == {}  # nothing was stepped (no momentum buffer yet)
    opt.step(_closure(model, xt, yt))
    np.testing.assert_allclose(_theta(model), _expected_one_step(variant, theta, x, y), rtol=0, atol=1e-12)


@pytest.mark.parametrize("variant", VARIANTS)
def test_abandon_step_puts_w_back_and_a_new_step_is_exact(variant):
    theta, x, y = data()
    xt, yt = torch.tensor(x), torch.tensor(y)
    model = LinReg(theta)
    opt = _optimizer(model, variant, "constructor")
    w = _weights(model)
    ((model(xt) - yt) ** 2).mean().backward()
    opt.first_step(zero_grad=True)
    ((model(xt) - yt) ** 2).mean().backward()  # the second pass, then (say) an error before second_step()
    assert not torch.equal(model.w, w[0])  # at w + e
    assert opt.abandon_step() is True
    _assert_bitwise_at(model, w)
    assert all(p.grad is None for p in model.parameters())
    assert opt.abandon_step() is False  # nothing begun: a no-op
    _assert_bitwise_at(model, w)
    ((model(xt) - yt) ** 2).mean().backward()
    opt.first_step(zero_grad=True)  # not "called again"
    ((model(xt) - yt) ** 2).mean().backward()
    opt.second_step(zero_grad=True)
    np.testing.assert_allclose(_theta(model), _expected_one_step(variant, theta, x, y), rtol=0, atol=1e-12)


def test_abandon_step_without_a_begun_step_changes_nothing():
    w = nn.Parameter(torch.ones(3, dtype=torch.float64))
    opt = SSAMOptimizer([w], torch.optim.SGD, lr=LR)
    w.grad = torch.full_like(w, 0.5)
    assert opt.abandon_step() is False
    assert torch.equal(w, torch.ones(3, dtype=torch.float64)) and torch.equal(w.grad, torch.full_like(w, 0.5))


def test_abandon_step_can_keep_the_gradients():
    w = nn.Parameter(torch.ones(3, dtype=torch.float64))
    opt = SSAMOptimizer([w], torch.optim.SGD, variant="usam", rho=RHO, lr=LR)
    w.grad = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)  # g
    opt.first_step()  # zero_grad=False: .grad stays g
    assert torch.equal(w, 1.0 + RHO * torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))  # w + ρ·g
    assert opt.abandon_step(zero_grad=False) is True
    assert torch.equal(w, torch.ones(3, dtype=torch.float64))
    assert torch.equal(w.grad, torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))


def test_first_step_called_again_points_to_abandon_step():
    w = nn.Parameter(torch.ones(3))
    opt = SSAMOptimizer([w], torch.optim.SGD, lr=LR)
    w.grad = torch.ones(3)
    opt.first_step()
    with pytest.raises(RuntimeError, match=r"first_step\(\) called again.*abandon_step\(\)"):
        opt.first_step()


@pytest.mark.parametrize("unscaled_before_the_error", [False, True])
@pytest.mark.parametrize("variant", ["ssam", "usam"])
def test_abandon_step_with_a_grad_scaler(variant, unscaled_before_the_error):
    """The dropped step leaves no trace in the scaler either: the next scaled step is the hand computation."""
    theta, x, y = data()
    xt, yt = torch.tensor(x), torch.tensor(y)
    model = LinReg(theta)
    opt = _optimizer(model, variant, "wrap")
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    w = _weights(model)
    scaler.scale(((model(xt) - yt) ** 2).mean()).backward()
    opt.first_step(zero_grad=True, grad_scaler=scaler)
    scaler.scale(((model(xt) - yt) ** 2).mean()).backward()
    if unscaled_before_the_error:
        scaler.unscale_(opt)  # e.g. to log the gradient norm; then the error
    assert opt.abandon_step() is True
    _assert_bitwise_at(model, w)
    scaler.scale(((model(xt) - yt) ** 2).mean()).backward()
    opt.first_step(zero_grad=True, grad_scaler=scaler)
    scaler.scale(((model(xt) - yt) ** 2).mean()).backward()
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() == 2.0**10  # no overflow was recorded
    np.testing.assert_allclose(_theta(model), _expected_one_step(variant, theta, x, y), rtol=0, atol=1e-12)


@pytest.mark.parametrize("make_error", [KeyboardInterrupt, lambda: RuntimeError(OOM)], ids=["interrupt", "oom"])
def test_exception_during_the_climb_leaves_w(monkeypatch, make_error):
    """The first parameter group moved to w + e, the second raised: first_step() puts the first one back."""
    theta, x, y = data()
    xt, yt = torch.tensor(x), torch.tensor(y)
    model = LinReg(theta)
    opt = SSAMOptimizer(
        [{"params": [model.w]}, {"params": [model.b]}], torch.optim.SGD, variant="asam", rho=RHO, lr=LR, momentum=0.9
    )
    w = _weights(model)
    real_ascend = optimizer_module.functional.ascend_
    error = make_error()

    def ascend_then_fail(params, *args, **kwargs):
        if params[0] is model.b:
            raise error
        real_ascend(params, *args, **kwargs)

    monkeypatch.setattr(optimizer_module.functional, "ascend_", ascend_then_fail)
    ((model(xt) - yt) ** 2).mean().backward()
    with pytest.raises(type(error)) as raised:
        opt.first_step(zero_grad=True)
    assert raised.value is error
    _assert_bitwise_at(model, w)
    assert all(p.grad is None for p in model.parameters())  # .grad held part of e
    monkeypatch.undo()
    opt.step(_closure(model, xt, yt))  # not "called again"
    np.testing.assert_allclose(_theta(model), _expected_one_step("asam", theta, x, y), rtol=0, atol=1e-12)
