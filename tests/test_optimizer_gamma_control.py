"""SSAMOptimizer's experimental γ-control options against float64 hand computations (numpy reference)."""

import numpy as np
import pytest
import torch
from _reference import data, grad, perturbation
from torch import nn

from hf_ssam import SSAMOptimizer

LR = 0.1


class LinReg(nn.Module):
    def __init__(self, theta):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(theta[:-1]))
        self.b = nn.Parameter(torch.tensor(theta[-1:]))

    def forward(self, x):
        return x @ self.w + self.b


def _theta(model):
    return np.concatenate([model.w.detach().numpy(), model.b.detach().numpy()])


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
        rho_t = rho * previous_gamma if scale_rho else rho
        g_asc = grad(theta + perturbation(variant, theta, g, rho_t), x, y)
        gamma = np.linalg.norm(g) / np.linalg.norm(g_asc)
        applied = gamma if bounds is None else min(max(gamma, bounds[0]), bounds[1])
        theta = theta - LR * (applied * g_asc if renormalize else g_asc)
        previous_gamma = gamma
    return theta


@pytest.mark.parametrize("bounds", [(0.9, 1.05), (0.5, 2.0), (1.0, 1.0), (1e-3, float("inf"))])
def test_gamma_bounds_match_hand_computation(bounds):
    theta, x, y = data()
    model = LinReg(theta)
    opt = SSAMOptimizer(model.parameters(), torch.optim.SGD, variant="ssam", rho=0.5, gamma_bounds=bounds, lr=LR)
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
    runs = []
    for variant, bounds in (("ssam", (1.0, 1.0)), ("usam", None)):
        model = LinReg(theta)
        opt = SSAMOptimizer(model.parameters(), torch.optim.SGD, variant=variant, rho=0.5, gamma_bounds=bounds, lr=LR)
        _steps(opt, model, x, y, 4)
        runs.append(_theta(model))
    np.testing.assert_array_equal(runs[0], runs[1])


@pytest.mark.parametrize("variant, renormalize", [("usam", False), ("sam", False), ("ssam", True), ("asam", False)])
def test_scale_rho_by_gamma_matches_hand_computation(variant, renormalize):
    theta, x, y = data()
    model = LinReg(theta)
    opt = SSAMOptimizer(model.parameters(), torch.optim.SGD, variant=variant, rho=0.5, scale_rho_by_gamma=True, lr=LR)
    _steps(opt, model, x, y, 3)
    expected = _reference_steps(variant, theta, x, y, 0.5, 3, renormalize=renormalize, scale_rho=True)
    np.testing.assert_allclose(_theta(model), expected, rtol=0, atol=1e-12)
    fixed = _reference_steps(variant, theta, x, y, 0.5, 3, renormalize=renormalize)
    assert np.abs(expected - fixed).max() > 1e-4  # ρ really changed after the first step
    assert opt.last_metrics["gamma"] != pytest.approx(1.0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(variant="ssam", gamma_bounds=(0.0, 2.0)), "gamma_min"),
        (dict(variant="ssam", gamma_bounds=(0.5, 0.8)), "gamma_max"),
        (dict(variant="ssam", gamma_bounds=0.5), "gamma_bounds"),
        (dict(variant="usam", gamma_bounds=(0.5, 2.0)), "needs renormalization"),
        (dict(variant="ssam", scale_rho_by_gamma="yes"), "scale_rho_by_gamma"),
    ],
)
def test_bad_gamma_control_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SSAMOptimizer([nn.Parameter(torch.zeros(2))], torch.optim.SGD, lr=LR, **kwargs)
