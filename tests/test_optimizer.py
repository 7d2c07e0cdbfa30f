"""SSAMOptimizer: one step against the float64 hand computation, state dicts, schedulers, bad input."""

import numpy as np
import pytest
import torch
from _reference import data, grad, sam_gradient
from torch import nn

from hf_ssam import VARIANTS, SSAMOptimizer

LR = 0.1


class LinReg(nn.Module):
    def __init__(self, theta):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(theta[:-1]))
        self.b = nn.Parameter(torch.tensor(theta[-1:]))

    def forward(self, x):
        return x @ self.w + self.b


def _loss(model, x, y):
    return ((model(x) - y) ** 2).mean()


def _theta(model):
    return np.concatenate([model.w.detach().numpy(), model.b.detach().numpy()])


VARIANT_RENORM = [(v, None) for v in VARIANTS] + [(v, True) for v in ("sam", "usam", "asam")]


@pytest.mark.parametrize("variant, renormalize", VARIANT_RENORM)
@pytest.mark.parametrize("api", ["two_steps", "closure", "first_step_then_step"])
def test_one_step_matches_hand_computation(variant, renormalize, api):
    theta, x, y = data()
    model = LinReg(theta)
    xt, yt = torch.tensor(x), torch.tensor(y)
    opt = SSAMOptimizer(model.parameters(), torch.optim.SGD, variant=variant, rho=0.2, renormalize=renormalize, lr=LR)
    if api in ("two_steps", "first_step_then_step"):
        _loss(model, xt, yt).backward()
        opt.first_step(zero_grad=True)
        _loss(model, xt, yt).backward()
        if api == "two_steps":
            opt.second_step(zero_grad=True)
        else:
            assert opt.step() is None  # without a closure, step() finishes what first_step() began
    else:

        def closure():
            loss = _loss(model, xt, yt)
            loss.backward()
            return loss

        opt.step(closure)
    g_sam, (g_norm, g_asc_norm, gamma, _) = sam_gradient(variant, theta, x, y, 0.2, renormalize)
    np.testing.assert_allclose(_theta(model), theta - LR * g_sam, rtol=0, atol=1e-10)
    assert opt.last_metrics["grad_norm"] == pytest.approx(g_norm, abs=1e-10)
    assert opt.last_metrics["ascent_grad_norm"] == pytest.approx(g_asc_norm, abs=1e-10)
    assert opt.last_metrics["gamma"] == pytest.approx(gamma, abs=1e-10)


@pytest.mark.parametrize("variant", VARIANTS)
def test_rho_zero_is_the_base_optimizer(variant):
    theta, x, y = data()
    xt, yt = torch.tensor(x), torch.tensor(y)
    a, b = LinReg(theta), LinReg(theta)
    opt_a = SSAMOptimizer(a.parameters(), torch.optim.SGD, variant=variant, rho=0.0, lr=LR, momentum=0.9)
    opt_b = torch.optim.SGD(b.parameters(), lr=LR, momentum=0.9)
    for _ in range(3):
        opt_a.step(lambda: _loss(a, xt, yt).backward())
        opt_b.zero_grad()
        _loss(b, xt, yt).backward()
        opt_b.step()
    assert torch.equal(a.w, b.w) and torch.equal(a.b, b.b)


def test_frozen_parameters_are_never_perturbed():
    theta, x, y = data()
    model = LinReg(theta)
    model.b.requires_grad_(False)
    xt, yt = torch.tensor(x), torch.tensor(y)
    opt = SSAMOptimizer(model.parameters(), torch.optim.SGD, variant="sam", rho=0.5, lr=LR)
    b0 = model.b.detach().clone()
    _loss(model, xt, yt).backward()
    opt.first_step(zero_grad=True)
    assert torch.equal(model.b, b0)  # even transiently, at w + e
    _loss(model, xt, yt).backward()
    opt.second_step()
    assert torch.equal(model.b, b0)


def test_zero_gradient_skips_the_perturbation_without_nan():
    model = LinReg(np.zeros(4))
    x = torch.zeros(4, 3, dtype=torch.float64)
    y = torch.zeros(4, dtype=torch.float64)
    opt = SSAMOptimizer(model.parameters(), torch.optim.SGD, variant="ssam", rho=0.5, lr=LR)
    opt.step(lambda: _loss(model, x, y).backward())
    assert torch.isfinite(model.w).all() and opt.last_metrics["skipped"] == 1.0


def test_state_dict_round_trip_and_scheduler():
    theta, x, y = data()
    xt, yt = torch.tensor(x), torch.tensor(y)

    def run(n_steps, resume_from=None):
        model = LinReg(theta)
        opt = SSAMOptimizer(model.parameters(), torch.optim.AdamW, variant="ssam", rho=0.1, lr=0.05)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
        if resume_from is not None:
            model.load_state_dict(resume_from[0])
            opt.load_state_dict(resume_from[1])
            sched.load_state_dict(resume_from[2])
        for _ in range(n_steps):
            opt.step(lambda: _loss(model, xt, yt).backward())
            sched.step()
        return model, opt, sched

    straight, _, _ = run(4)
    half, opt, sched = run(2)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05 / 4)  # the scheduler drives the base optimizer
    assert opt.base_optimizer.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    sd = opt.state_dict()
    assert sd["state"][0]["exp_avg"].shape == (3,)  # Adam moments are in the checkpoint
    assert sd["param_groups"][0]["rho"] == 0.1
    resumed, _, _ = run(2, resume_from=(half.state_dict(), sd, sched.state_dict()))
    torch.testing.assert_close(resumed.w, straight.w, rtol=0, atol=1e-12)


def test_dropout_masks_are_replayed_in_step():
    model = nn.Sequential(nn.Linear(6, 6), nn.Dropout(0.5), nn.Linear(6, 1))
    masks = []
    model[1].register_forward_hook(lambda m, i, o: masks.append((o == 0).clone()))
    opt = SSAMOptimizer(model.parameters(), torch.optim.SGD, variant="ssam", rho=0.05, lr=0.1)
    x = torch.randn(16, 6)
    opt.step(lambda: model(x).pow(2).mean().backward())
    assert len(masks) == 2 and torch.equal(masks[0], masks[1])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(variant="bogus"), r"variant='bogus'.*\['ssam', 'sam', 'usam', 'asam', 'none'\]"),
        (dict(variant="none"), r"variant='none'"),
        (dict(rho=-0.1), r"rho=-0.1.*>= 0"),
        (dict(variant="ssam", renormalize=False), r"renormalize=False.*ssam"),
        (dict(asam_eta=-1.0), r"asam_eta=-1.0.*>= 0"),
        (dict(max_grad_norm=0.0), r"max_grad_norm=0.0.*None \(no clipping\) or a finite number > 0"),
        (dict(max_grad_norm=float("inf")), r"max_grad_norm=inf"),
        (dict(max_grad_norm=True), r"max_grad_norm=True"),
        (dict(max_grad_norm="1.0"), r"max_grad_norm='1.0'"),
    ],
)
def test_bad_input_is_refused_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SSAMOptimizer([nn.Parameter(torch.zeros(2))], torch.optim.SGD, lr=0.1, **kwargs)


def test_first_step_then_second_step_restores_exactly_in_bf16():
    w = nn.Parameter(torch.randn(257, dtype=torch.bfloat16))
    w0 = w.detach().clone()
    opt = SSAMOptimizer([w], torch.optim.SGD, variant="sam", rho=0.3, lr=0.0)
    w.grad = torch.randn_like(w)
    opt.first_step()
    assert not torch.equal(w, w0)
    w.grad = torch.randn_like(w)
    opt.second_step()
    assert torch.equal(w, w0)


def test_hand_gradient_agrees_with_autograd():  # guards the reference itself
    theta, x, y = data()
    model = LinReg(theta)
    _loss(model, torch.tensor(x), torch.tensor(y)).backward()
    np.testing.assert_allclose(np.concatenate([model.w.grad.numpy(), model.b.grad.numpy()]), grad(theta, x, y))


@pytest.mark.parametrize("variant", VARIANTS)
def test_param_groups_share_global_norms(variant):
    """Two groups (e.g. decay / no-decay) give the same step as one: norms are global over all parameters."""
    theta, x, y = data()
    xt, yt = torch.tensor(x), torch.tensor(y)
    one, two = LinReg(theta), LinReg(theta)
    opt1 = SSAMOptimizer(one.parameters(), torch.optim.SGD, variant=variant, rho=0.2, lr=LR)
    opt2 = SSAMOptimizer([{"params": [two.w]}, {"params": [two.b]}], torch.optim.SGD, variant=variant, rho=0.2, lr=LR)
    for model, opt in ((one, opt1), (two, opt2)):
        opt.step(lambda m=model: _loss(m, xt, yt).backward())
    g_sam, _ = sam_gradient(variant, theta, x, y, 0.2)
    np.testing.assert_allclose(_theta(two), theta - LR * g_sam, rtol=0, atol=1e-10)
    np.testing.assert_allclose(_theta(one), _theta(two), rtol=0, atol=1e-12)


def test_per_group_settings_are_checked_too():
    with pytest.raises(ValueError, match=r"rho=-1"):
        SSAMOptimizer([{"params": [nn.Parameter(torch.zeros(2))], "rho": -1}], torch.optim.SGD, lr=0.1)


def test_schedulers_see_second_step_as_the_optimizer_step(recwarn):
    model = nn.Linear(3, 1)
    opt = SSAMOptimizer(model.parameters(), torch.optim.SGD, lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1)
    model(torch.randn(4, 3)).sum().backward()
    opt.first_step(zero_grad=True)
    model(torch.randn(4, 3)).sum().backward()
    opt.second_step(zero_grad=True)
    sched.step()
    assert not [w for w in recwarn if "lr_scheduler.step()" in str(w.message)]


def test_base_optimizer_cls_must_be_a_class():
    w = nn.Parameter(torch.zeros(2))
    with pytest.raises(TypeError, match=r"=a built SGD instance is not a.*subclass.*SSAMOptimizer.wrap"):
        SSAMOptimizer([w], torch.optim.SGD([w], lr=0.1))
    with pytest.raises(TypeError, match=r"base_optimizer_cls='sgd' is not a torch.optim.Optimizer subclass"):
        SSAMOptimizer([w], "sgd")


# ------------------------------------------------------------------------------------ clipping the final g


def _clip(g, max_norm):
    """torch.nn.utils.clip_grad_norm_'s rule: g·min(1, c/(‖g‖ + 1e-6))."""
    return g * min(1.0, max_norm / (np.linalg.norm(g) + 1e-6))


@pytest.mark.parametrize("variant, renormalize", VARIANT_RENORM)
def test_max_grad_norm_clips_the_final_gradient(variant, renormalize):
    theta, x, y = data()
    xt, yt = torch.tensor(x), torch.tensor(y)
    g_sam, (g_norm, g_asc_norm, gamma, _) = sam_gradient(variant, theta, x, y, 0.2, renormalize)
    max_norm = 0.5 * np.linalg.norm(g_sam)  # bites
    model = LinReg(theta)
    settings = dict(variant=variant, rho=0.2, renormalize=renormalize, max_grad_norm=max_norm)
    opt = SSAMOptimizer(model.parameters(), torch.optim.SGD, lr=LR, **settings)
    opt.step(lambda: _loss(model, xt, yt).backward())
    np.testing.assert_allclose(_theta(model), theta - LR * _clip(g_sam, max_norm), rtol=0, atol=1e-10)
    if gamma != 1.0 and (renormalize or variant == "ssam"):  # clip(γ·g_asc) is not γ·clip(g_asc)
        g_asc = g_sam / gamma
        wrong = theta - LR * gamma * _clip(g_asc, max_norm)
        assert np.abs(_theta(model) - wrong).max() > 1e-4


# ------------------------------------------------------------------------------------- groups without grads


def test_group_without_gradients_is_skipped():
    """A frozen backbone in its own group (default ssam): the trainable group steps as by hand."""
    theta, x, y = data()
    model = LinReg(theta)
    model.w.requires_grad_(False)
    xt, yt = torch.tensor(x), torch.tensor(y)
    opt = SSAMOptimizer(
        [{"params": [model.w], "lr": 0.0}, {"params": [model.b]}], torch.optim.SGD, rho=0.2, lr=LR, momentum=0.9
    )
    opt.step(lambda: _loss(model, xt, yt).backward())
    g = grad(theta, x, y)[-1:]  # only b has a gradient
    theta_asc = theta.copy()
    theta_asc[-1:] += 0.2 * g  # e = ρ·g on b, nothing on w
    g_asc = grad(theta_asc, x, y)[-1:]
    gamma = np.linalg.norm(g) / np.linalg.norm(g_asc)
    np.testing.assert_allclose(
        _theta(model), np.concatenate([theta[:-1], theta[-1:] - LR * gamma * g_asc]), atol=1e-12
    )
    assert opt.last_metrics["gamma"] == pytest.approx(gamma, abs=1e-12)


def test_a_step_without_any_gradient_is_refused():
    model = LinReg(np.zeros(4))
    opt = SSAMOptimizer(model.parameters(), torch.optim.SGD, lr=LR)
    x, y = torch.zeros(4, 3, dtype=torch.float64), torch.zeros(4, dtype=torch.float64)
    with pytest.raises(RuntimeError, match=r"no parameter has a gradient.*2 parameters.*closure must call"):
        opt.step(lambda: _loss(model, x, y))  # forgot backward()
    with pytest.raises(RuntimeError, match=r"first_step\(\): no parameter has a gradient"):
        opt.first_step()
    _loss(model, x, y).backward()
    opt.first_step(zero_grad=True)
    with pytest.raises(RuntimeError, match=r"second_step\(\): no parameter has a gradient.*at w \+ e"):
        opt.second_step()


# -------------------------------------------------------------------------------------------- misuse


def test_step_without_closure_before_first_step():
    opt = SSAMOptimizer([nn.Parameter(torch.zeros(2))], torch.optim.SGD, lr=LR)
    with pytest.raises(RuntimeError, match=r"step\(\) was called with closure=None before first_step\(\)"):
        opt.step()
    with pytest.raises(RuntimeError, match=r"second_step\(\) called before first_step\(\)"):
        opt.second_step()


def test_first_step_twice_is_refused():
    w = nn.Parameter(torch.ones(3))
    opt = SSAMOptimizer([w], torch.optim.SGD, lr=LR)
    w.grad = torch.ones(3)
    opt.first_step()
    with pytest.raises(RuntimeError, match=r"first_step\(\) called again.*w \+ e"):
        opt.first_step()


BAD_GROUP_SETTINGS = [
    ({"rho": -1.0}, r"param_groups\[1\]: rho=-1.0 is invalid; it must be a finite number >= 0"),
    ({"variant": "SSAM"}, r"param_groups\[1\]: variant='SSAM' is not supported; choose one of \['ssam', 'sam'"),
    ({"variant": "none"}, r"param_groups\[1\]: variant='none' is not supported by SSAMOptimizer.*\['ssam', 'sam'"),
    ({"renormalize": 0}, r"param_groups\[1\]: renormalize=0 is invalid; choose one of \[None, True, False\]"),
    ({"asam_eta": float("nan")}, r"param_groups\[1\]: asam_eta=nan is invalid; it must be a finite number >= 0"),
    ({"rho": "0.1"}, r"param_groups\[1\]: rho='0.1' is invalid; .*>= 0 \(an int or float, not str\)"),
]


@pytest.mark.parametrize("settings, match", BAD_GROUP_SETTINGS)
def test_bad_group_is_refused_by_the_constructor_and_by_add_param_group(settings, match):
    w, b = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(1))
    with pytest.raises(ValueError, match=match):
        SSAMOptimizer([{"params": [w]}, {"params": [b], **settings}], torch.optim.SGD, lr=0.1)
    opt = SSAMOptimizer([w], torch.optim.SGD, lr=0.1)
    with pytest.raises(ValueError, match=match):
        opt.add_param_group({"params": [b], **settings})
    assert len(opt.param_groups) == 1 and len(opt.base_optimizer.param_groups) == 1  # nothing was added


def test_added_group_gets_the_default_settings_and_the_step_is_the_hand_computation():
    theta, x, y = data()
    model = LinReg(theta)
    xt, yt = torch.tensor(x), torch.tensor(y)
    opt = SSAMOptimizer([model.w], torch.optim.SGD, variant="sam", rho=0.2, renormalize=True, asam_eta=0.02, lr=LR)
    opt.add_param_group({"params": [model.b]})  # e.g. a layer unfrozen later
    assert opt.param_groups is opt.base_optimizer.param_groups and len(opt.param_groups) == 2
    added = opt.param_groups[1]
    assert (added["variant"], added["rho"], added["renormalize"], added["asam_eta"], added["lr"]) == (
        "sam", 0.2, True, 0.02, LR
    )  # fmt: skip
    opt.step(lambda: _loss(model, xt, yt).backward())
    g_sam, _ = sam_gradient("sam", theta, x, y, 0.2, True)  # one θ = (w, b): the norms span both groups
    np.testing.assert_allclose(_theta(model), theta - LR * g_sam, rtol=0, atol=1e-10)


def test_added_group_keeps_its_own_settings():
    w, b = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(1))
    opt = SSAMOptimizer([w], torch.optim.SGD, rho=0.2, lr=0.1)
    opt.add_param_group({"params": [b], "rho": 0.0, "variant": "usam", "lr": 0.3})
    assert [(g["variant"], g["rho"], g["lr"]) for g in opt.param_groups] == [("ssam", 0.2, 0.1), ("usam", 0.0, 0.3)]
