"""Measuring sharpness: the top Hessian eigenvalues and the SAM sharpness of a model's loss.

Both measurements look at the deterministic function the model computes in evaluation mode (dropout off,
BatchNorm with its running statistics) and leave everything as they found it: weights, ``.grad``, BatchNorm
buffers, the train/eval mode of every module and the random number generators. `SharpnessCallback` logs them
at each evaluation of a `transformers.Trainer` (an `SSAMTrainer` included).

The eigenvalues come from a thick-restart Lanczos iteration on Hessian-vector products (double backward),
written here rather than taken from ``pyhessian`` or ``hessian-eigenthings``: both default to deflated power
iteration, which finds the k largest eigenvalues *in magnitude* (a large negative eigenvalue away from a minimum
is reported instead of the top one) with no error bound, and neither restores BatchNorm statistics, train/eval
mode or RNG state (docs/sharpness.md).
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback

from .passes import RNGState, freeze_batchnorm_stats

__all__ = ["SharpnessCallback", "sam_sharpness", "top_hessian_eigenvalues"]

LossFn = Callable[[nn.Module, Any], torch.Tensor]

#: Krylov vectors kept in memory beyond the k wanted ones: the basis holds ``k + _KRYLOV_EXTRA`` vectors.
_KRYLOV_EXTRA = 16
#: Seed of the private generator that draws the Lanczos start vector (the global RNGs are not touched).
_START_SEED = 0
#: β below this fraction of the largest Ritz value: the Krylov space is invariant, start a fresh direction.
_BREAKDOWN = 1e-10


# ------------------------------------------------------------------------------------------------ helpers


def _trainable(model: nn.Module) -> list[nn.Parameter]:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"{type(model).__name__} has no parameter with requires_grad=True to measure.")
    return params


def _as_list(batches: Iterable[Any]) -> list[Any]:
    batches = list(batches)
    if not batches:
        raise ValueError("batches is empty; give at least one batch to measure the loss on.")
    return batches


def _vector_dtype(params: list[nn.Parameter]) -> torch.dtype:
    """Float64 if any parameter is float64, else float32 (half-precision weights get float32 vectors)."""
    return torch.float64 if any(p.dtype == torch.float64 for p in params) else torch.float32


@contextlib.contextmanager
def _measuring(model: nn.Module) -> Iterator[None]:
    """Evaluation mode, gradients on, RNGs and BatchNorm statistics restored afterwards, double-backward attention."""
    modes = [(m, m.training) for m in model.modules()]
    rng = RNGState.capture()
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        attention = sdpa_kernel([SDPBackend.MATH])  # the fused attention kernels have no double backward
    except ImportError:  # pragma: no cover - older PyTorch
        attention = contextlib.nullcontext()
    try:
        model.eval()
        with freeze_batchnorm_stats(model), torch.enable_grad(), attention:
            yield
    finally:
        for module, training in modes:
            module.training = training
        rng.restore()


def _loss(model: nn.Module, loss_fn: LossFn, batch: Any) -> torch.Tensor:
    loss = loss_fn(model, batch)
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else ""
        raise ValueError(f"loss_fn must return a scalar tensor, got {type(loss).__name__} {shape}.")
    return loss.reshape(())


def _flat(tensors: Iterable[torch.Tensor | None], params: list[nn.Parameter], dtype: torch.dtype) -> torch.Tensor:
    """Concatenate per-parameter tensors (None: zeros) into one vector."""
    device = params[0].device
    return torch.cat(
        [
            (torch.zeros(p.numel(), dtype=dtype, device=device) if t is None else t.reshape(-1).to(device, dtype))
            for t, p in zip(tensors, params)
        ]
    )


def _split(vector: torch.Tensor, params: list[nn.Parameter]) -> list[torch.Tensor]:
    """The inverse of `_flat`: views shaped (and cast) like the parameters."""
    out, start = [], 0
    for p in params:
        out.append(vector[start : start + p.numel()].view(p.shape).to(p.device, p.dtype))
        start += p.numel()
    return out


def _hvp(
    model: nn.Module, loss_fn: LossFn, batches: list[Any], params: list[nn.Parameter], v: torch.Tensor
) -> torch.Tensor:
    """H·v for H the Hessian of mean over batches of loss_fn (one forward, backward and double backward per batch)."""
    vs = _split(v, params)
    total = torch.zeros_like(v)
    for batch in batches:
        loss = _loss(model, loss_fn, batch)
        grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
        terms = [(g * u).sum() for g, u in zip(grads, vs) if g is not None and g.requires_grad]
        if terms:  # g·v; without terms the loss is at most linear in the weights and H·v = 0
            hv = torch.autograd.grad(torch.stack(terms).sum(), params, allow_unused=True)
            total += _flat(hv, params, v.dtype)
    return total / len(batches)


# ------------------------------------------------------------------------------------------------ Lanczos


def _lanczos_top(
    matvec: Callable[[torch.Tensor], torch.Tensor],
    n: int,
    k: int,
    max_iter: int,
    tol: float,
    dtype: torch.dtype,
    device: torch.device,
    deadline: float | None,
) -> tuple[list[float], float, int]:
    """The k largest eigenvalues of a symmetric operator, by thick-restart Lanczos with full reorthogonalization.

    T = Vᵀ·H·V is kept as a dense matrix filled from the Gram-Schmidt coefficients of each new product H·v, so
    after a restart (V ← the best Ritz vectors plus the last residual direction) its arrowhead shape comes for
    free. Ritz pair (θ, V·s) has residual ‖H·y − θ·y‖ = β·|s_last|; the iteration stops when the k largest have
    residual ≤ tol·max|θ| (then |λ − θ| ≤ tol·max|θ|), after max_iter products, or past the deadline.
    Returns the values, the largest relative residual and the number of products.
    """
    size = min(n, k + _KRYLOV_EXTRA)
    keep = min(size - 1, 2 * k)
    generator = torch.Generator().manual_seed(_START_SEED)
    basis = torch.empty(size, n, dtype=dtype, device=device)
    projected = torch.zeros(size, size, dtype=torch.float64)
    start = torch.randn(n, generator=generator, dtype=torch.float64).to(device, dtype)
    basis[0] = start / start.norm()
    filled, products = 0, 0  # basis[:filled] have their column of T; basis[filled] is the next to multiply
    while True:
        w = matvec(basis[filled])
        products += 1
        if not bool(torch.isfinite(w).all()):  # diverged weights: there is no meaningful spectrum to report
            return [math.nan] * k, 0.0, products
        current = basis[: filled + 1]
        h = current @ w
        w -= current.T @ h
        again = current @ w  # second Gram-Schmidt pass: keeps the basis orthogonal to working precision
        w -= current.T @ again
        column = (h + again).double().cpu()
        projected[: filled + 1, filled] = column
        projected[filled, : filled + 1] = column
        filled += 1
        beta = float(w.norm())
        theta, s = torch.linalg.eigh(projected[:filled, :filled])  # ascending
        top = torch.arange(filled - 1, max(filled - 1 - k, -1), -1)
        scale = float(theta.abs().max()) if filled else 0.0
        residual = beta * s[filled - 1, top].abs().max().item()
        relative = residual / scale if scale > 0 else 0.0 if residual == 0 else math.inf
        values = theta[top].tolist()
        done = len(values) == k and relative <= tol
        if done or products >= max_iter or filled == n or (deadline is not None and time.perf_counter() > deadline):
            return values, relative, products
        if beta <= _BREAKDOWN * max(scale, 1.0):  # invariant subspace: its Ritz values are exact, look elsewhere
            w = torch.randn(n, generator=generator, dtype=torch.float64).to(device, dtype)
            for _ in range(2):
                w -= basis[:filled].T @ (basis[:filled] @ w)
            beta = float(w.norm())
        if filled == size:  # thick restart: keep the best Ritz vectors, continue from the residual direction
            best = torch.arange(filled - 1, filled - 1 - keep, -1)
            basis[:keep] = s[:, best].T.to(device, dtype) @ basis[:filled]
            projected.zero_()
            projected[:keep, :keep] = torch.diag(theta[best])
            filled = keep
        basis[filled] = w / beta


# ------------------------------------------------------------------------------------------------ public API


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_lanczos_options(k: Any, max_iter: Any, tol: Any, max_seconds: Any) -> None:
    if not _is_int(k) or k < 1:
        raise ValueError(f"k={k!r} is invalid; it must be an integer >= 1.")
    if not _is_int(max_iter) or max_iter < 1:
        raise ValueError(f"max_iter={max_iter!r} is invalid; it must be an integer >= 1.")
    if not _is_number(tol) or tol <= 0:
        raise ValueError(f"tol={tol!r} is invalid; it must be a finite number > 0.")
    if max_seconds is not None and (not _is_number(max_seconds) or max_seconds < 0):
        raise ValueError(f"max_seconds={max_seconds!r} is invalid; it must be None or a finite number >= 0.")


def top_hessian_eigenvalues(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[Any],
    k: int = 1,
    *,
    max_iter: int = 100,
    tol: float = 1e-3,
    max_seconds: float | None = None,
) -> list[float]:
    r"""The k largest (most positive) eigenvalues of the loss Hessian, in descending order.

    The Hessian is that of ``mean over batches of loss_fn(model, batch)`` with respect to the parameters with
    ``requires_grad=True``, in evaluation mode. It is never formed: a thick-restart Lanczos iteration uses
    Hessian-vector products (one forward, backward and double backward per batch each). Lanczos was chosen over
    power iteration with deflation because it finds the *algebraically* largest eigenvalues (power iteration
    finds the largest in magnitude, which can be a negative one away from a minimum) and needs far fewer
    products when eigenvalues are close: all k values come from one Krylov space, typically 20 to 60 products in
    all for k = 1 at ``tol=1e-3``. Memory: ``k + 16`` vectors of the size of the trainable parameters.

    Weights, ``.grad``, BatchNorm buffers, the train/eval mode of every module and the RNG state are left exactly
    as they were. The start vector comes from a private, fixed-seed generator, so the result is deterministic.

    Args:
        model (`nn.Module`): Any module, a `transformers` model included; float32 or float64, CPU or CUDA.
        loss_fn (`Callable[[nn.Module, Any], torch.Tensor]`): Returns the scalar loss of a batch, e.g.
            ``lambda m, b: m(**b).loss``. It must not call ``backward()``.
        batches (`Iterable`): The batches, already on the model's device; iterated once and kept in a list.
        k (`int`, *optional*, defaults to 1): How many eigenvalues.
        max_iter (`int`, *optional*, defaults to 100): Most Hessian-vector products in all.
        tol (`float`, *optional*, defaults to 1e-3): Stop when every Ritz residual is below ``tol`` times the
            largest Ritz value; each returned value is then within that of an eigenvalue.
        max_seconds (`float`, *optional*): Stop after this much wall time (at least one product is made).

    Returns:
        `list[float]`: k eigenvalue estimates, descending (NaN where the loss or its Hessian is not finite, as
        after divergence). A `RuntimeWarning` says when ``max_iter`` or ``max_seconds`` stopped the iteration
        before ``tol`` was reached.
    """
    _check_lanczos_options(k, max_iter, tol, max_seconds)
    params = _trainable(model)
    n = sum(p.numel() for p in params)
    if k > n:
        raise ValueError(f"k={k} is larger than the number of trainable parameters ({n}).")
    batches = _as_list(batches)
    deadline = None if max_seconds is None else time.perf_counter() + max_seconds
    with _measuring(model):
        values, relative, products = _lanczos_top(
            lambda v: _hvp(model, loss_fn, batches, params, v),
            n,
            k,
            max_iter,
            tol,
            _vector_dtype(params),
            params[0].device,
            deadline,
        )
    if relative > tol:
        warnings.warn(
            f"top_hessian_eigenvalues stopped after {products} Hessian-vector products with relative residual "
            f"{relative:.2e} > tol={tol:g}; raise max_iter or max_seconds for converged values.",
            RuntimeWarning,
            stacklevel=2,
        )
    return values


def sam_sharpness(model: nn.Module, loss_fn: LossFn, batches: Iterable[Any], rho: float) -> float:
    r"""SAM's sharpness ``L(w + ρ·g/‖g‖) − L(w)``: the rise of the loss at the first-order worst point of the ρ-ball.

    ``L`` is the mean of ``loss_fn(model, batch)`` over ``batches`` in evaluation mode and ``g = ∇L(w)`` with
    respect to the trainable parameters. Costs one forward and backward plus one forward per batch. Weights,
    ``.grad``, BatchNorm buffers, train/eval mode and RNG state are left exactly as they were (the weights are
    copied back, bit for bit). Returns 0 where ``‖g‖ = 0`` and NaN where the loss or ``g`` is not finite.

    Args:
        model (`nn.Module`): Any module.
        loss_fn (`Callable[[nn.Module, Any], torch.Tensor]`): The scalar loss of a batch, e.g.
            ``lambda m, b: m(**b).loss``.
        batches (`Iterable`): The batches, on the model's device.
        rho (`float`): Radius ρ of the ball, ``>= 0``.
    """
    if not _is_number(rho) or rho < 0:
        raise ValueError(f"rho={rho!r} is invalid; it must be a finite number >= 0.")
    params = _trainable(model)
    batches = _as_list(batches)
    with _measuring(model):
        loss, grads = 0.0, [torch.zeros_like(p) for p in params]
        for batch in batches:
            value = _loss(model, loss_fn, batch)
            for acc, g in zip(grads, torch.autograd.grad(value, params, allow_unused=True)):
                if g is not None:
                    acc += g
            loss += float(value.detach())
        loss /= len(batches)
        norm = math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads)) / len(batches)  # ‖g‖
        if not (math.isfinite(norm) and math.isfinite(loss)):
            return math.nan
        if norm == 0.0 or rho == 0:
            return 0.0
        backup = [p.detach().clone() for p in params]
        try:
            with torch.no_grad():
                for p, g in zip(params, grads):
                    p.add_(g, alpha=rho / (norm * len(batches)))  # w + ρ·g/‖g‖
                perturbed = sum(float(_loss(model, loss_fn, batch)) for batch in batches) / len(batches)
        finally:
            with torch.no_grad():
                for p, saved in zip(params, backup):
                    p.copy_(saved)
    return perturbed - loss


# ------------------------------------------------------------------------------------------------ Trainer callback


def _default_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    """``model(**batch)`` for a mapping, ``model(*batch)`` for a tuple or list; the ``loss`` of the output."""
    if isinstance(batch, Mapping):
        out = model(**batch)
    elif isinstance(batch, (tuple, list)):
        out = model(*batch)
    else:
        out = model(batch)
    if isinstance(out, Mapping) or hasattr(out, "loss"):
        return out["loss"] if isinstance(out, Mapping) else out.loss
    return out


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return type(batch)({key: _to_device(value, device) for key, value in batch.items()})
    if isinstance(batch, (tuple, list)):
        return type(batch)(_to_device(value, device) for value in batch)
    return batch


class SharpnessCallback(TrainerCallback):
    r"""A `transformers.TrainerCallback` that measures sharpness at each evaluation and logs it.

    Logs ``sharpness/hessian_top_1`` … ``sharpness/hessian_top_{k}`` (`top_hessian_eigenvalues`) and
    ``sharpness/sam_rho`` (`sam_sharpness` at radius ``rho``) on the fixed ``batches``, at the current
    weights, after the Trainer's evaluation. They are logged through the Trainer under these names, so they reach
    ``trainer.state.log_history``, TensorBoard, W&B and every other ``report_to`` integration as a log row of their
    own. They are also added to the metrics that ``trainer.evaluate()`` returns, under the evaluation's prefix like
    the Trainer's own metrics (``eval_sharpness/hessian_top_1``; ``eval_{name}_sharpness/…`` for a dict of
    evaluation datasets), which is where the Trainer looks for ``metric_for_best_model``: either
    ``metric_for_best_model="sharpness/hessian_top_1"`` (the Trainer adds ``eval_``) or
    ``"eval_sharpness/hessian_top_1"`` selects the best checkpoint (``load_best_model_at_end=True`` included). Set
    ``greater_is_better=False`` to keep the flattest checkpoint: the Trainer's default for a name that does not end
    in ``loss`` is ``True``. Under DDP every rank computes on its own copy and rank 0's values are broadcast: all
    ranks log the same.

    Cost per measurement: up to ``max_iter`` Hessian-vector products for all k eigenvalues together (Lanczos;
    each product is one forward, one backward and one double backward per batch, about 3 to 4 times a training
    forward/backward; typically 20 to 60 products reach ``tol`` for k = 1), plus one forward/backward and one
    forward per batch for the SAM sharpness. ``max_seconds`` caps the eigenvalue part; ``every_n_evals`` thins it.

    Args:
        batches (`Iterable`): The batches to measure on (kept in a list and moved to the model's device), e.g. a
            few training batches. Use the same batches on every rank.
        k (`int`, *optional*, defaults to 1): How many top Hessian eigenvalues to log.
        rho (`float`, *optional*): Radius of the SAM sharpness; default: the run's ``sam_rho``
            (`SSAMTrainingArguments`), else 0.05.
        every_n_evals (`int`, *optional*, defaults to 1): Measure at every n-th evaluation only.
        loss_fn (`Callable`, *optional*): ``loss_fn(model, batch)``; default ``model(**batch).loss``.
        max_iter (`int`, *optional*, defaults to 100): Most Hessian-vector products per measurement.
        tol (`float`, *optional*, defaults to 1e-3): Lanczos tolerance (see `top_hessian_eigenvalues`).
        max_seconds (`float`, *optional*): Time cap for the eigenvalues of one measurement.
        trainer (`transformers.Trainer`, *optional*): The Trainer to log through. Without it the values are
            still added to the evaluation's metrics and to its row of ``trainer.state.log_history``, but the
            ``report_to`` integrations do not see them. Set it here or with `bind`.

    Example:

    ```python
    # doc: fragment
    callback = SharpnessCallback(train_batches, k=3).bind(trainer)  # or callbacks=[...] and trainer=...
    trainer.add_callback(callback)
    ```
    """

    def __init__(
        self,
        batches: Iterable[Any],
        *,
        k: int = 1,
        rho: float | None = None,
        every_n_evals: int = 1,
        loss_fn: LossFn | None = None,
        max_iter: int = 100,
        tol: float = 1e-3,
        max_seconds: float | None = None,
        trainer: Any = None,
    ) -> None:
        if not _is_int(every_n_evals) or every_n_evals < 1:
            raise ValueError(f"every_n_evals={every_n_evals!r} is invalid; it must be an integer >= 1.")
        _check_lanczos_options(k, max_iter, tol, max_seconds)
        if rho is not None and (not _is_number(rho) or rho < 0):
            raise ValueError(f"rho={rho!r} is invalid; it must be None or a finite number >= 0.")
        self.batches = _as_list(batches)
        self.k, self.rho, self.every_n_evals = k, rho, every_n_evals
        self.loss_fn = loss_fn or _default_loss
        self.max_iter, self.tol, self.max_seconds = max_iter, tol, max_seconds
        self.trainer = trainer
        self._evaluations = 0

    def bind(self, trainer: Any) -> SharpnessCallback:
        """Log through ``trainer`` (so the ``report_to`` integrations see the values); returns self."""
        self.trainer = trainer
        return self

    def measure(self, model: nn.Module, rho: float) -> dict[str, float]:
        """The values this callback logs, for ``model`` as it is now (no distributed exchange)."""
        device = next(model.parameters()).device
        batches = [_to_device(batch, device) for batch in self.batches]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a time cap is a choice, not an accident here
            eigenvalues = top_hessian_eigenvalues(
                model,
                self.loss_fn,
                batches,
                self.k,
                max_iter=self.max_iter,
                tol=self.tol,
                max_seconds=self.max_seconds,
            )
        values = {f"sharpness/hessian_top_{i + 1}": value for i, value in enumerate(eigenvalues)}
        values["sharpness/sam_rho"] = sam_sharpness(model, self.loss_fn, batches, rho)
        return values

    def on_evaluate(self, args, state, control, metrics=None, model=None, **kwargs):  # noqa: ANN001
        self._evaluations += 1
        if model is None or (self._evaluations - 1) % self.every_n_evals != 0:
            return
        rho = self.rho if self.rho is not None else getattr(args, "sam_rho", 0.05)
        values = _broadcast_from_rank0(self.measure(model, rho), args.device)
        if metrics is not None:  # under the evaluation's prefix, as the Trainer looks up `metric_for_best_model`
            prefix = _metric_prefix(metrics)
            metrics.update({f"{prefix}_{name}": value for name, value in values.items()})
        if self.trainer is not None:
            self.trainer.log(dict(values))
        elif state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(values)  # the row of this evaluation, logged just before
        else:
            state.log_history.append({**values, "step": state.global_step})


def _metric_prefix(metrics: Mapping[str, Any]) -> str:
    """The prefix of an evaluation's metrics: ``eval`` (``eval_{name}`` for a dict of datasets, or what
    ``trainer.evaluate(metric_key_prefix=...)`` was given), read from the ``{prefix}_runtime`` the Trainer adds."""
    prefixes = {key[: -len("_runtime")] for key in metrics if key.endswith("_runtime")}
    return prefixes.pop() if len(prefixes) == 1 else "eval"


def _broadcast_from_rank0(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Rank 0's values on every rank (a no-op without torch.distributed)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    backend_device = device if dist.get_backend() != "gloo" else torch.device("cpu")
    tensor = torch.tensor(list(values.values()), dtype=torch.float64, device=backend_device)
    dist.broadcast(tensor, src=0)
    return dict(zip(values, tensor.tolist()))
