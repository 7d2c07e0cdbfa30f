"""The γ controls of the paper experiment (``bench/paper/gamma_control.py``) against float64 hand computations."""

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from _reference import data, grad, perturbation
from test_optimizer import LinReg, _theta
from torch import nn

from hf_ssam import VARIANTS, SSAMOptimizer

LR = 0.1
_SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "paper" / "gamma_control.py"


def _load_experiment():
    spec = importlib.util.spec_from_file_location("gamma_control", _SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, module)
    spec.loader.exec_module(module)
    return module


GammaControlledSAM = _load_experiment().GammaControlledSAM


def _steps(opt, model, x, y, n):
    xt, yt = torch.tensor(x), torch.tensor(y)
    for _ in range(n):
        ((model(xt) - yt) ** 2).mean().backward()
        opt.first_step(zero_grad=True)
        ((model(xt) - yt) ** 2).mean().backward()
        opt.second_step(zero_grad=True)


def _reference_steps(variant, theta, x, y, rho, n, bounds=None, renormalize=True, scale_rho=False):
    """n SGD steps of the SAM family with γ clipped to ``bounds`` and/or ρ_t = ρ·γ_{t−1}, in numpy."""
    previous_gamma = 1.0
    for _ in range(n):
        g = grad(theta, x, y)
        rho_t = rho * previous_gamma if scale_rho else rho  # ρ_t = ρ·γ_{t−1}
        g_asc = grad(theta + perturbation(variant, theta, g, rho_t), x, y)
        gamma = np.linalg.norm(g) / np.linalg.norm(g_asc)  # γ = ‖g‖/‖g_asc‖
        applied = gamma if bounds is None else min(max(gamma, bounds[0]), bounds[1])  # γ ∈ [γ_min, γ_max]
        theta = theta - LR * (applied * g_asc if renormalize else g_asc)
        previous_gamma = gamma
    return theta


@pytest.mark.parametrize("bounds", [(0.9, 1.05), (0.5, 2.0), (1.0, 1.0), (1e-3, float("inf"))])
def test_gamma_bounds_match_hand_computation(bounds):
    theta, x, y = data()
    model = LinReg(theta)
    opt = GammaControlledSAM(model.parameters(), variant="ssam", rho=0.5, gamma_bounds=bounds, lr=LR)
    _steps(opt, model, x, y, 3)
    expected = _reference_steps("ssam", theta, x, y, 0.5, 3, bounds=bounds)
    np.testing.assert_allclose(_theta(model), expected, rtol=0, atol=1e-12)


def test_gamma_bounds_are_active_in_the_test_problem():
    """The raw γ of the test problem lies outside (0.9, 1.05): the bounded run differs from plain SSAM."""
    theta, x, y = data()
    clipped = _reference_steps("ssam", theta, x, y, 0.5, 3, bounds=(0.9, 1.05))
    plain = _reference_steps("ssam", theta, x, y, 0.5, 3)
    assert np.abs(clipped - plain).max() > 1e-3


def test_unit_bounds_reduce_ssam_to_usam():
    theta, x, y = data()
    bounded, plain = LinReg(theta), LinReg(theta)
    _steps(
        GammaControlledSAM(bounded.parameters(), variant="ssam", rho=0.5, gamma_bounds=(1.0, 1.0), lr=LR),
        bounded,
        x,
        y,
        4,
    )
    _steps(SSAMOptimizer(plain.parameters(), torch.optim.SGD, variant="usam", rho=0.5, lr=LR), plain, x, y, 4)
    np.testing.assert_array_equal(_theta(bounded), _theta(plain))


@pytest.mark.parametrize("variant, renormalize", [("usam", False), ("sam", False), ("ssam", True), ("asam", False)])
def test_scale_rho_by_gamma_matches_hand_computation(variant, renormalize):
    theta, x, y = data()
    model = LinReg(theta)
    opt = GammaControlledSAM(model.parameters(), variant=variant, rho=0.5, scale_rho_by_gamma=True, lr=LR)
    _steps(opt, model, x, y, 3)
    expected = _reference_steps(variant, theta, x, y, 0.5, 3, renormalize=renormalize, scale_rho=True)
    np.testing.assert_allclose(_theta(model), expected, rtol=0, atol=1e-12)
    fixed = _reference_steps(variant, theta, x, y, 0.5, 3, renormalize=renormalize)
    assert np.abs(expected - fixed).max() > 1e-4  # ρ really changed after the first step
    assert opt.previous_gamma.item() != pytest.approx(1.0)


@pytest.mark.parametrize("variant", VARIANTS)
def test_without_controls_it_is_ssam_optimizer_bitwise(variant):
    """The experiment's controlled runs differ from its plain (SSAMOptimizer) runs by the control alone."""
    torch.manual_seed(0)
    ours = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
    theirs = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
    theirs.load_state_dict(ours.state_dict())
    start = ours[0].weight.detach().clone()
    x, y = torch.randn(16, 5), torch.randint(0, 3, (16,))
    base = dict(lr=0.3, momentum=0.9, weight_decay=5e-4)
    optimizers = [
        (ours, GammaControlledSAM(ours.parameters(), variant=variant, rho=0.3, **base)),
        (theirs, SSAMOptimizer(theirs.parameters(), torch.optim.SGD, variant=variant, rho=0.3, **base)),
    ]
    for model, opt in optimizers:
        for _ in range(4):
            nn.functional.cross_entropy(model(x), y).backward()
            opt.first_step(zero_grad=True)
            nn.functional.cross_entropy(model(x), y).backward()
            opt.second_step(zero_grad=True)
    for a, b in zip(ours.parameters(), theirs.parameters()):
        assert torch.equal(a, b)
    assert (ours[0].weight - start).abs().max() > 1e-3  # the steps moved the weights


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(variant="ssam", gamma_bounds=(0.0, 2.0)), "gamma_min"),
        (dict(variant="ssam", gamma_bounds=(0.5, 0.8)), "gamma_max"),
        (dict(variant="ssam", gamma_bounds=0.5), "gamma_bounds"),
        (dict(variant="usam", gamma_bounds=(0.5, 2.0)), "needs renormalization"),
        (dict(variant="ssam", scale_rho_by_gamma="yes"), "scale_rho_by_gamma"),
        (dict(variant="none"), "not a SAM variant"),
        (dict(variant="ssam", rho=-1.0), "rho=-1.0 is invalid"),
    ],
)
def test_bad_gamma_control_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GammaControlledSAM([nn.Parameter(torch.zeros(2))], lr=LR, **kwargs)
