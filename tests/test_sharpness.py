"""hf_ssam.sharpness: top Hessian eigenvalues against exact Hessians, SAM sharpness by hand, the Trainer callback.

Exact references: ``torch.autograd.functional.hessian`` of the loss as a function of the flat parameters
(float64, tiny models) and least-squares problems whose Hessian ``XᵀX/N`` has eigenvalues chosen in advance.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import BertConfig, BertForSequenceClassification, TrainerCallback

from hf_ssam import SSAMTrainer, SSAMTrainingArguments
from hf_ssam.sharpness import SharpnessCallback, sam_sharpness, top_hessian_eigenvalues

KEYS = ("sharpness/hessian_top_1", "sharpness/hessian_top_2", "sharpness/sam_rho")


class MLP(nn.Module):
    def __init__(self, dtype: torch.dtype = torch.float64, batchnorm: bool = False):
        super().__init__()
        torch.manual_seed(0)
        layers = [nn.Linear(3, 5)] + ([nn.BatchNorm1d(5)] if batchnorm else []) + [nn.Tanh(), nn.Dropout(0.2)]
        self.net = nn.Sequential(*layers, nn.Linear(5, 2)).to(dtype)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        logits = self.net(x)
        return {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits}


def _mlp_batches(dtype: torch.dtype = torch.float64, n_batches: int = 2) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [
        {"x": torch.randn(16, 3, generator=g, dtype=dtype), "labels": torch.randint(0, 2, (16,), generator=g)}
        for _ in range(n_batches)
    ]


def _loss(model: nn.Module, batch: dict) -> torch.Tensor:
    return model(**batch)["loss"]


def _exact_eigenvalues(model: nn.Module, loss_fn, batches: list) -> torch.Tensor:
    """Descending eigenvalues of the exact Hessian of the mean loss (eval mode), float64."""
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    shapes = [p.shape for p in model.parameters() if p.requires_grad]
    flat0 = torch.cat([p.detach().reshape(-1).double() for p in model.parameters() if p.requires_grad])
    model.eval()

    def mean_loss(flat: torch.Tensor) -> torch.Tensor:
        params, start = {}, 0
        for name, shape in zip(names, shapes):
            size = shape.numel()
            params[name] = flat[start : start + size].view(shape)
            start += size
        return sum(loss_fn(_Functional(model, params), b) for b in batches) / len(batches)

    with sdpa_kernel([SDPBackend.MATH]):  # the fused CPU attention kernel has no double backward
        hessian = torch.autograd.functional.hessian(mean_loss, flat0)
    model.train()
    return torch.linalg.eigvalsh((hessian + hessian.T) / 2).flip(0)


class _Functional(nn.Module):
    """Calls ``model`` with the given parameters (so ``loss_fn(model, batch)`` can be reused as is)."""

    def __init__(self, model: nn.Module, params: dict[str, torch.Tensor]):
        super().__init__()
        self.model, self.params = model, params

    def forward(self, *args, **kwargs):
        return functional_call(self.model, self.params, args, kwargs)


# ------------------------------------------------------------------------------------------------ eigenvalues


@pytest.mark.parametrize("k", [1, 3])
def test_eigenvalues_match_the_exact_hessian_of_an_mlp(k: int) -> None:
    model, batches = MLP(), _mlp_batches()
    exact = _exact_eigenvalues(model, _loss, batches)[:k]
    found = top_hessian_eigenvalues(model, _loss, batches, k=k, tol=1e-6, max_iter=300)
    found = torch.tensor(found, dtype=torch.float64)
    assert found.shape == (k,) and torch.all(found[:-1] >= found[1:])
    assert torch.allclose(found, exact, rtol=1e-4, atol=1e-6 * exact[0]), (found, exact)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("k", [1, 3])
def test_eigenvalues_of_a_least_squares_problem_with_known_spectrum(k: int, dtype: torch.dtype) -> None:
    # L(w) = mean_i ½(xᵢ·w − yᵢ)², so H = XᵀX/N; with X = U·diag(s)·Vᵀ its eigenvalues are s²/N.
    g = torch.Generator().manual_seed(0)
    n_rows, dim = 64, 40
    u, _ = torch.linalg.qr(torch.randn(n_rows, dim, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))
    s = torch.linspace(1.0, 3.0, dim, dtype=torch.float64)
    s[-3:] = torch.tensor([4.0, 5.0, 6.0], dtype=torch.float64)
    x = (u * s) @ v.T
    y = torch.randn(n_rows, generator=g, dtype=torch.float64)
    expected = sorted((s**2 / n_rows).tolist(), reverse=True)[:k]
    model = nn.Linear(dim, 1, bias=False).to(dtype)
    batches = [(x[:32].to(dtype), y[:32].to(dtype)), (x[32:].to(dtype), y[32:].to(dtype))]

    def loss_fn(m, batch):
        inputs, targets = batch
        return 0.5 * ((m(inputs).squeeze(-1) - targets) ** 2).mean()

    found = top_hessian_eigenvalues(model, loss_fn, batches, k=k)
    assert found == pytest.approx(expected, rel=1e-2)  # the documented guarantee at the default tol
    assert found == pytest.approx(expected, rel=2e-3)  # and in fact within tol·λ₁/λₖ


def test_restarts_converge_on_a_dense_spectrum() -> None:
    # 300 evenly spaced eigenvalues in [-1, 1]: the top gap is 0.0067, far more products than the 19-vector basis.
    dim, g = 300, torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))
    spectrum = torch.linspace(-1.0, 1.0, dim, dtype=torch.float64)
    a = (q * spectrum) @ q.T
    model = nn.Linear(dim, 1, bias=False).double()
    calls = []

    def loss_fn(m, _):
        calls.append(1)
        return 0.5 * m.weight[0] @ a @ m.weight[0]

    found = top_hessian_eigenvalues(model, loss_fn, [None], k=3, tol=1e-6, max_iter=1000)
    assert len(calls) > 3 * (3 + 16)  # several thick restarts
    assert found == pytest.approx(spectrum.flip(0)[:3].tolist(), abs=1e-6)


def test_the_most_positive_eigenvalue_is_found_when_a_negative_one_is_larger_in_magnitude() -> None:
    # L(w) = ½ wᵀ·diag(−10, 3, 2, 1, 0.5)·w: power iteration would report −10.
    diag = torch.tensor([-10.0, 3.0, 2.0, 1.0, 0.5], dtype=torch.float64)
    model = nn.Linear(5, 1, bias=False).double()
    found = top_hessian_eigenvalues(model, lambda m, _: 0.5 * (m.weight[0] ** 2 * diag).sum(), [None], k=2)
    assert found == pytest.approx([3.0, 2.0], rel=1e-6)


def test_a_transformers_model_with_loss_from_its_output() -> None:
    config = BertConfig(vocab_size=12, hidden_size=4, num_hidden_layers=1, num_attention_heads=1,
                        intermediate_size=4, max_position_embeddings=6, type_vocab_size=1, num_labels=2)  # fmt: skip
    torch.manual_seed(0)
    model = BertForSequenceClassification(config).double()
    g = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(1, 12, (4, 5), generator=g), "labels": torch.tensor([0, 1, 1, 0])}]
    loss_fn = lambda m, b: m(**b).loss  # noqa: E731 - the documented one-liner
    exact = _exact_eigenvalues(model, loss_fn, batches)[:2]
    found = top_hessian_eigenvalues(model, loss_fn, batches, k=2, tol=1e-6, max_iter=400)
    assert found == pytest.approx(exact.tolist(), rel=1e-3)
    assert model.training


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_float32_matches_cpu() -> None:
    model, batches = MLP(torch.float32), _mlp_batches(torch.float32)
    cpu = top_hessian_eigenvalues(model, _loss, batches, k=2, tol=1e-5, max_iter=300)
    model.cuda()
    gpu_batches = [{key: value.cuda() for key, value in b.items()} for b in batches]
    gpu = top_hessian_eigenvalues(model, _loss, gpu_batches, k=2, tol=1e-5, max_iter=300)
    assert gpu == pytest.approx(cpu, rel=1e-3)
    assert sam_sharpness(model, _loss, gpu_batches, 0.1) == pytest.approx(
        sam_sharpness(model.cpu(), _loss, batches, 0.1), rel=1e-3
    )


def test_time_cap_and_max_iter_stop_early_with_a_warning() -> None:
    model, batches = MLP(), _mlp_batches()
    calls = []

    def counting(m, b):
        calls.append(1)
        return _loss(m, b)

    with pytest.warns(RuntimeWarning, match="1 Hessian-vector products"):
        top_hessian_eigenvalues(model, counting, batches, max_seconds=0.0)
    assert len(calls) == len(batches)  # exactly one product: one pass per batch
    calls.clear()
    with pytest.warns(RuntimeWarning, match="5 Hessian-vector products"):
        top_hessian_eigenvalues(model, counting, batches, max_iter=5, tol=1e-12)
    assert len(calls) == 5 * len(batches)


# ------------------------------------------------------------------------------------------------ untouched model


@pytest.mark.parametrize("measure", ["eigenvalues", "sam_sharpness"])
def test_the_model_is_left_exactly_as_it_was(measure: str) -> None:
    model, batches = MLP(batchnorm=True), _mlp_batches()
    model.train()
    model.net[3].eval()  # a mixed mode must come back mixed
    model(**batches[0])["loss"].backward()  # BatchNorm statistics and .grad that are not zero
    for p in model.parameters():
        p.grad.mul_(3.0)
    weights = {k: v.clone() for k, v in model.state_dict().items()}  # BatchNorm buffers included
    grads = [(p.grad, p.grad.clone()) for p in model.parameters()]
    modes = [m.training for m in model.modules()]
    torch.manual_seed(123)
    expected_draw = torch.rand(5)
    torch.manual_seed(123)

    if measure == "eigenvalues":
        top_hessian_eigenvalues(model, _loss, batches, k=2)
    else:
        assert sam_sharpness(model, _loss, batches, 0.5) != 0.0

    assert torch.equal(torch.rand(5), expected_draw)  # RNG state
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in weights.items())  # weights, BN buffers (bitwise)
    assert all(p.grad is g and torch.equal(g, saved) for p, (g, saved) in zip(model.parameters(), grads))
    assert [m.training for m in model.modules()] == modes


# ------------------------------------------------------------------------------------------------ SAM sharpness


@pytest.mark.parametrize("rho", [0.05, 0.5])
def test_sam_sharpness_against_a_hand_computation(rho: float) -> None:
    # L(w) = mean over two batches of ½wᵀAᵢw + bᵢ·w: g = Āw + b̄, e = ρg/‖g‖, L(w+e) − L(w) = g·e + ½eᵀĀe.
    g = torch.Generator().manual_seed(0)
    dim = 6
    mats = [(lambda m: m @ m.T)(torch.randn(dim, dim, generator=g, dtype=torch.float64)) for _ in range(2)]
    vecs = [torch.randn(dim, generator=g, dtype=torch.float64) for _ in range(2)]
    model = nn.Linear(dim, 1, bias=False).double()
    w = model.weight.detach()[0].clone()

    def loss_fn(m, i):
        v = m.weight[0]
        return 0.5 * v @ mats[i] @ v + vecs[i] @ v

    a, b = (mats[0] + mats[1]) / 2, (vecs[0] + vecs[1]) / 2
    grad = a @ w + b
    e = rho * grad / grad.norm()
    expected = float(grad @ e + 0.5 * e @ a @ e)
    assert sam_sharpness(model, loss_fn, [0, 1], rho) == pytest.approx(expected, rel=1e-12)
    assert torch.equal(model.weight.detach()[0], w)


def test_sam_sharpness_is_zero_at_a_stationary_point_and_for_rho_zero() -> None:
    model = nn.Linear(3, 1, bias=False).double()
    with torch.no_grad():
        model.weight.zero_()
    assert sam_sharpness(model, lambda m, _: (m.weight**2).sum(), [None], 0.1) == 0.0  # ‖g‖ = 0 at w = 0
    assert sam_sharpness(MLP(), _loss, _mlp_batches(), 0.0) == 0.0


def test_non_finite_weights_give_nan() -> None:
    model = MLP()
    with torch.no_grad():
        model.net[0].weight[0, 0] = float("nan")
    assert all(map(math.isnan, top_hessian_eigenvalues(model, _loss, _mlp_batches(), k=2)))
    assert math.isnan(sam_sharpness(model, _loss, _mlp_batches(), 0.1))


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: top_hessian_eigenvalues(MLP(), _loss, _mlp_batches(), k=0), "k=0 is invalid"),
        (lambda: top_hessian_eigenvalues(MLP(), _loss, _mlp_batches(), k=10_000), "k=10000 is larger"),
        (lambda: top_hessian_eigenvalues(MLP(), _loss, _mlp_batches(), tol=-1.0), "tol=-1.0 is invalid"),
        (lambda: top_hessian_eigenvalues(MLP(), _loss, _mlp_batches(), max_iter=0), "max_iter=0 is invalid"),
        (lambda: top_hessian_eigenvalues(MLP(), _loss, []), "batches is empty"),
        (lambda: sam_sharpness(MLP(), _loss, _mlp_batches(), -0.1), "rho=-0.1 is invalid"),
        (lambda: sam_sharpness(MLP(), lambda m, b: m(**b)["logits"], _mlp_batches(), 0.1), "scalar tensor"),
        (lambda: SharpnessCallback(_mlp_batches(), every_n_evals=0), "every_n_evals=0 is invalid"),
        (lambda: SharpnessCallback(_mlp_batches(), k=2, max_seconds=-1), "max_seconds=-1 is invalid"),
        (lambda: SharpnessCallback(_mlp_batches(), rho=float("nan")), "rho=nan is invalid"),
    ],
)
def test_bad_input_is_refused(call, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()


# ------------------------------------------------------------------------------------------------ the callback


class _Dataset(torch.utils.data.Dataset):
    def __init__(self):
        self.batches = _mlp_batches(torch.float32, n_batches=4)

    def __len__(self) -> int:
        return 64

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        batch = self.batches[i // 16]
        return {"x": batch["x"][i % 16], "labels": batch["labels"][i % 16]}


class _Recorder(TrainerCallback):
    def __init__(self):
        self.logs: list[dict] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))


def _trainer(
    tmp_path: Path, bound: bool, every_n_evals: int = 1, variant: str = "ssam"
) -> tuple[SSAMTrainer, _Recorder, list]:
    args = SSAMTrainingArguments(
        output_dir=str(tmp_path), report_to="none", use_cpu=True, save_strategy="no", disable_tqdm=True,
        max_steps=6, logging_steps=2, eval_strategy="steps", eval_steps=2, per_device_train_batch_size=16,
        learning_rate=0.05, sam_variant=variant, sam_rho=0.1, seed=0,
    )  # fmt: skip
    recorder = _Recorder()
    measure_on = _mlp_batches(torch.float32)
    callback = SharpnessCallback(measure_on, k=2, every_n_evals=every_n_evals)
    data = _Dataset()
    trainer = SSAMTrainer(model=MLP(torch.float32), args=args, train_dataset=data, eval_dataset=data,
                          callbacks=[recorder, callback])  # fmt: skip
    if bound:
        callback.bind(trainer)
    return trainer, recorder, measure_on


@pytest.mark.parametrize(
    ("variant", "bound"),
    [("ssam", True), ("sam", True), ("none", True), ("ssam", False)],
    ids=["ssam-bound", "sam-bound", "none-bound", "ssam-unbound"],
)
def test_callback_logs_the_values_at_each_evaluation(tmp_path: Path, variant: str, bound: bool) -> None:
    trainer, recorder, measure_on = _trainer(tmp_path, bound, variant=variant)
    trainer.train()
    rows = [row for row in trainer.state.log_history if KEYS[0] in row]
    assert [row["step"] for row in rows] == [2, 4, 6]
    assert all(set(KEYS) <= row.keys() for row in rows)
    assert rows[0][KEYS[0]] != rows[-1][KEYS[0]]  # measured at the weights of each evaluation
    # the reporting integrations (here a recorder registered before it) see the values only through the Trainer
    assert any(KEYS[0] in logs for logs in recorder.logs) == bound

    metrics = trainer.evaluate()  # at the final weights: the same numbers as calling the functions directly
    model = trainer.model
    expected = top_hessian_eigenvalues(model, _loss, measure_on, k=2)
    # in the metrics under the evaluation's prefix, like the Trainer's own; in the log under the plain names
    assert [metrics[f"eval_{KEYS[0]}"], metrics[f"eval_{KEYS[1]}"]] == pytest.approx(expected, rel=1e-9)
    assert metrics[f"eval_{KEYS[2]}"] == pytest.approx(sam_sharpness(model, _loss, measure_on, 0.1), rel=1e-9)  # ρ
    assert trainer.state.log_history[-1][KEYS[0]] == metrics[f"eval_{KEYS[0]}"]
    assert not set(KEYS) & metrics.keys()


@pytest.mark.parametrize("greater_is_better", [False, True], ids=["flattest", "sharpest"])
@pytest.mark.parametrize("metric", [KEYS[0], f"eval_{KEYS[0]}"])
def test_metric_for_best_model_picks_the_checkpoint_by_sharpness(
    tmp_path: Path, metric: str, greater_is_better: bool
) -> None:
    """Both spellings select the best checkpoint by the logged eigenvalue, and load_best_model_at_end loads it."""
    args = SSAMTrainingArguments(
        output_dir=str(tmp_path), report_to="none", use_cpu=True, disable_tqdm=True, max_steps=6, logging_steps=2,
        eval_strategy="steps", eval_steps=2, save_strategy="steps", save_steps=2, load_best_model_at_end=True,
        metric_for_best_model=metric, greater_is_better=greater_is_better, per_device_train_batch_size=16,
        learning_rate=0.5, sam_rho=0.1, seed=0,
    )  # fmt: skip
    measure_on = _mlp_batches(torch.float32)
    callback = SharpnessCallback(measure_on, k=1)
    data = _Dataset()
    model = MLP(torch.float32)
    # No dropout: its masks are drawn from the global random state, which transformers 4.57 and 5 leave in
    # different states before training, so with dropout the two train different weights (with 4.57 the sharpest
    # evaluation was then the last one, and loading it changed nothing). Without it both train the same weights.
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    trainer = SSAMTrainer(model=model, args=args, train_dataset=data, eval_dataset=data, callbacks=[callback])
    callback.bind(trainer)
    trainer.train()

    logged = {row["step"]: row[KEYS[0]] for row in trainer.state.log_history if KEYS[0] in row}
    assert sorted(logged) == [2, 4, 6] and len(set(logged.values())) == 3  # the choice is not a tie
    best_step = (max if greater_is_better else min)(logged, key=logged.get)  # chosen here, from the log alone
    assert trainer.state.best_metric == logged[best_step]
    assert Path(trainer.state.best_model_checkpoint).name == f"checkpoint-{best_step}"
    assert best_step != 6  # in both directions loading the best checkpoint changes the weights
    # the weights now in the model are the best checkpoint's, not the last step's
    assert top_hessian_eigenvalues(trainer.model, _loss, measure_on, k=1)[0] == pytest.approx(
        logged[best_step], rel=1e-6
    )


def test_metrics_take_the_prefix_of_each_evaluation(tmp_path: Path) -> None:
    """A dict of evaluation datasets and an own ``metric_key_prefix``: the values sit next to that evaluation's."""
    trainer, _, measure_on = _trainer(tmp_path, bound=False)
    data = trainer.eval_dataset
    expected = top_hessian_eigenvalues(trainer.model, _loss, measure_on, k=2)[0]  # the initial weights
    metrics = trainer.evaluate(eval_dataset={"a": data, "b": data})
    assert {key for key in metrics if "sharpness/" in key} == {
        f"eval_{name}_{key}" for name in ("a", "b") for key in KEYS
    }
    assert metrics[f"eval_a_{KEYS[0]}"] == pytest.approx(expected, rel=1e-9)
    metrics = trainer.evaluate(metric_key_prefix="test")
    assert {key for key in metrics if "sharpness/" in key} == {f"test_{key}" for key in KEYS}


def test_callback_every_n_evals(tmp_path: Path) -> None:
    trainer, _, _ = _trainer(tmp_path, bound=True, every_n_evals=2)
    trainer.train()
    assert [row["step"] for row in trainer.state.log_history if KEYS[0] in row] == [2, 6]


def test_callback_under_ddp_logs_the_same_values_on_both_ranks(tmp_path: Path) -> None:
    """2 processes (gloo, torchrun); each rank measures on different batches, so equal logs need the broadcast."""
    worker = Path(__file__).with_name("sharpness_dist_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(worker),
           "--out", str(tmp_path)]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["world_size"] == ranks[1]["world_size"] == 2
    assert ranks[0]["local"] != ranks[1]["local"]  # what each rank measured on its own batches differs
    assert ranks[0]["logged"] == ranks[1]["logged"] and len(ranks[0]["logged"]) == 2
    assert ranks[0]["logged"][-1] == ranks[0]["local"]  # rank 0's values, broadcast


def test_import_hf_ssam_does_not_load_transformers_and_sharpness_loads_lazily() -> None:
    code = "import sys, hf_ssam; assert 'transformers' not in sys.modules and 'hf_ssam.sharpness' not in sys.modules"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)
    import hf_ssam

    assert hf_ssam.sharpness is sys.modules["hf_ssam.sharpness"] and "sharpness" in hf_ssam.__all__


def test_no_warning_from_a_converged_run() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        top_hessian_eigenvalues(MLP(), _loss, _mlp_batches(), k=1)
