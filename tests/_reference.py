"""Independent float64 reference for one SAM-family step on linear least squares, in numpy.

Model: prediction = X·w + b, loss F = mean((X·w + b − y)²). Gradients are written out by hand
(∂F/∂w = 2/n·Xᵀr, ∂F/∂b = 2/n·Σr with r = X·w + b − y), not taken from torch autograd.
Parameters are treated as one vector θ = (w, b) for the global norms.
"""

from __future__ import annotations

import numpy as np

ETA = 0.01


def loss(theta: np.ndarray, x: np.ndarray, y: np.ndarray) -> float:
    r = x @ theta[:-1] + theta[-1] - y
    return float(np.mean(r**2))


def grad(theta: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    r = x @ theta[:-1] + theta[-1] - y
    n = len(y)
    return np.concatenate([2.0 / n * x.T @ r, [2.0 / n * r.sum()]])


def perturbation(variant: str, theta: np.ndarray, g: np.ndarray, rho: float, eta: float = ETA) -> np.ndarray:
    if variant == "sam":
        return rho * g / np.linalg.norm(g)
    if variant in ("usam", "ssam"):
        return rho * g
    if variant == "asam":
        t = np.abs(theta) + eta
        return rho * t * t * g / np.linalg.norm(t * g)
    raise ValueError(variant)


def sam_gradient(variant: str, theta, x, y, rho: float, renormalize: bool | None = None, eta: float = ETA):
    """The gradient the base optimizer sees for one micro-batch; also returns (‖g‖, ‖g_asc‖, γ, F(w+e))."""
    g = grad(theta, x, y)
    e = perturbation(variant, theta, g, rho, eta)
    g_asc = grad(theta + e, x, y)
    gamma = np.linalg.norm(g) / np.linalg.norm(g_asc)
    renorm = variant == "ssam" if renormalize is None else renormalize
    out = gamma * g_asc if renorm else g_asc
    return out, (np.linalg.norm(g), np.linalg.norm(g_asc), gamma, loss(theta + e, x, y))


def data(n: int = 8, d: int = 3, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d))
    y = rng.normal(size=n)
    theta = rng.normal(size=d + 1) * 0.5
    return theta, x, y
