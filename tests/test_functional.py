"""hf_ssam.functional against hand computations in float64."""

import math

import numpy as np
import pytest
import torch
from _reference import ETA, perturbation

from hf_ssam import VARIANTS, functional


def _tensors(seed=0):
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(3, 2, generator=g, dtype=torch.float64), torch.randn(4, generator=g, dtype=torch.float64)]
    grads = [torch.randn(3, 2, generator=g, dtype=torch.float64), torch.randn(4, generator=g, dtype=torch.float64)]
    return params, grads


def _flat(ts):
    return np.concatenate([t.detach().numpy().ravel() for t in ts])


def test_global_norm_is_the_norm_of_the_concatenation():
    _, grads = _tensors()
    expected = math.sqrt(sum(float((t**2).sum()) for t in grads))
    assert functional.global_norm(grads).item() == pytest.approx(expected, abs=1e-12)
    assert functional.global_norm(grads).dtype == torch.float64
    assert functional.global_norm([]).item() == 0.0


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("rho", [0.0, 0.05, 0.7])
def test_ascend_adds_the_variant_perturbation(variant, rho):
    params, grads = _tensors()
    w = _flat(params)
    g = _flat(grads)
    norm = functional.global_norm(grads)
    scale = functional.perturbation_scale(variant, rho, norm, params=params, grads=grads, asam_eta=ETA)
    functional.ascend_(params, grads, scale, variant=variant, asam_eta=ETA)
    np.testing.assert_allclose(_flat(params), w + perturbation(variant, w, g, rho), rtol=0, atol=1e-12)


def test_usam_perturbation_undoes_a_constant_gradient_factor():
    params, grads = _tensors()
    w, g = _flat(params), _flat(grads)
    scaled = [t * 1024.0 for t in grads]  # e.g. an fp16 loss scale
    scale = functional.perturbation_scale("usam", 0.1, functional.global_norm(scaled), grad_unscale=1 / 1024.0)
    functional.ascend_(params, scaled, scale, variant="usam")
    np.testing.assert_allclose(_flat(params), w + 0.1 * g, atol=1e-12)


@pytest.mark.parametrize("variant", ["sam", "asam"])
def test_normalized_perturbations_are_scale_invariant(variant):
    params, grads = _tensors()
    a = [p.clone() for p in params]
    b = [p.clone() for p in params]
    scaled = [t * 512.0 for t in grads]
    for ps, gs in ((a, grads), (b, scaled)):
        s = functional.perturbation_scale(variant, 0.3, functional.global_norm(gs), params=ps, grads=gs)
        functional.ascend_(ps, gs, s, variant=variant)
    np.testing.assert_allclose(_flat(a), _flat(b), atol=1e-12)


def test_restore_is_an_exact_copy_not_a_subtraction():
    params = [torch.randn(1000, dtype=torch.bfloat16)]
    saved = [params[0].clone()]
    e = [torch.randn(1000, dtype=torch.bfloat16) * 0.37]
    torch._foreach_add_(params, e)
    functional.restore_(params, saved)
    assert torch.equal(params[0], saved[0])
    # the subtraction really is inexact in bf16, so this test would catch it
    assert not torch.equal((saved[0] + e[0]) - e[0], saved[0])


def test_renormalization_factor_and_rescale():
    _, grads = _tensors()
    gamma, skipped = functional.renormalization_factor(
        torch.tensor(2.0, dtype=torch.float64), functional.global_norm(grads)
    )
    assert not skipped
    functional.rescale_(grads, gamma)
    assert functional.global_norm(grads).item() == pytest.approx(2.0, abs=1e-12)  # ‖γ·g_asc‖ = ‖g‖


@pytest.mark.parametrize(
    "g, g_asc", [(1.0, 0.0), (0.0, 1.0), (float("inf"), 1.0), (1.0, float("nan")), (float("nan"), 2.0)]
)
def test_renormalization_factor_skips_zero_and_non_finite_norms(g, g_asc):
    gamma, skipped = functional.renormalization_factor(torch.tensor(g), torch.tensor(g_asc))
    assert gamma.item() == 1.0 and bool(skipped)


@pytest.mark.parametrize(
    "variant, renormalize, expected",
    [("ssam", None, True), ("sam", None, False), ("usam", None, False), ("asam", True, True), ("sam", True, True)],
)
def test_uses_renormalization(variant, renormalize, expected):
    assert functional.uses_renormalization(variant, renormalize) is expected


# --- DTensor (FSDP2) parameters and gradients, on a one-process gloo group -------------------------------
# The two-process cases (uneven shards, replicated placements, 2-D meshes) run in tests/test_fsdp.py.


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    if dist.is_initialized():
        pytest.fail("a process group is already initialized in this process")
    store = tmp_path_factory.mktemp("store") / "store"
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    yield init_device_mesh("cpu", (1,))
    dist.destroy_process_group()


def _distribute(tensors, mesh, placement):
    from torch.distributed.tensor import distribute_tensor

    return [distribute_tensor(t.clone(), mesh, [placement]) for t in tensors]


def _full(ts):
    return np.concatenate([t.full_tensor().numpy().ravel() for t in ts])


def _placements():
    from torch.distributed.tensor import Replicate, Shard

    return [Shard(0), Replicate()]


@pytest.mark.parametrize("placement", _placements(), ids=str)
def test_global_norm_of_dtensors_is_a_plain_scalar_equal_to_the_hand_norm(mesh, placement):
    _, grads = _tensors()
    norm = functional.global_norm(_distribute(grads, mesh, placement))
    assert type(norm) is torch.Tensor and norm.dtype == torch.float64
    assert norm.item() == pytest.approx(math.sqrt(sum(float((t**2).sum()) for t in grads)), abs=1e-12)


@pytest.mark.parametrize("variant", VARIANTS)
def test_ascend_save_restore_on_dtensors_match_the_hand_computation(mesh, variant):
    from torch.distributed.tensor import DTensor, Shard
    from torch.distributed.tensor.debug import CommDebugMode

    params, grads = _tensors()
    w, g = _flat(params), _flat(grads)
    params, grads = _distribute(params, mesh, Shard(0)), _distribute(grads, mesh, Shard(0))
    backup = [torch.empty_like(p) for p in params]
    assert all(isinstance(b, DTensor) for b in backup)  # the backup is sharded like the weights
    comms = CommDebugMode()
    with comms:
        functional.save_(backup, params)
        scale = functional.perturbation_scale(
            variant, 0.3, functional.global_norm(grads), params=params, grads=grads, asam_eta=ETA
        )
        functional.ascend_(params, grads, scale, variant=variant, asam_eta=ETA)
    climbed = _full(params)  # the test's own all-gather, not counted
    comms_after = CommDebugMode()
    with comms_after:
        functional.restore_(params, backup)
        functional.rescale_(grads, torch.tensor(0.5, dtype=torch.float64))
    np.testing.assert_allclose(climbed, w + perturbation(variant, w, g, 0.3), rtol=0, atol=1e-12)
    np.testing.assert_array_equal(_full(params), w)  # restored exactly
    np.testing.assert_allclose(_full(grads), 0.5 * g, rtol=0, atol=1e-15)
    counts = {str(op): n for mode in (comms, comms_after) for op, n in mode.get_comm_counts().items()}
    assert set(counts) <= {"c10d.allreduce_"}, counts  # scalar norms only: nothing is gathered


def test_a_partial_dtensor_is_refused_by_global_norm(mesh):
    from torch.distributed.tensor import DTensor, Partial

    with pytest.raises(ValueError, match="Partial"):
        functional.global_norm([DTensor.from_local(torch.ones(3), mesh, [Partial()])])


def test_save_copies_into_the_backup():
    params, _ = _tensors()
    backup = [torch.empty_like(p) for p in params]
    functional.save_(backup, params)
    assert all(torch.equal(b, p) and b.data_ptr() != p.data_ptr() for b, p in zip(backup, params))
    functional.save_([], [])  # nothing to save: no error


def test_plain_tensors_never_reach_the_collectives(monkeypatch):
    import torch.distributed as dist

    def refuse(*args, **kwargs):
        raise AssertionError("a collective was called for plain tensors")

    monkeypatch.setattr(dist, "all_reduce", refuse)
    params, grads = _tensors()
    for variant in VARIANTS:
        scale = functional.perturbation_scale(variant, 0.3, functional.global_norm(grads), params=params, grads=grads)
        functional.ascend_(params, grads, scale, variant=variant)


class _Elsewhere:
    """Stands for a tensor on another device: records that it was moved before any arithmetic."""

    def __init__(self, value: torch.Tensor, device: str):
        self.value, self.device, self.moved_to = value, torch.device(device) if device == "cpu" else device, None

    def to(self, device):
        self.moved_to = device
        return self.value.to(device)


def test_norms_on_several_devices_are_moved_to_the_first_before_stacking(monkeypatch):
    """A model split over devices (device_map="auto"): per-tensor norms meet on the first tensor's device."""
    from hf_ssam.functional import _on_device

    here = torch.tensor(3.0)
    there = _Elsewhere(torch.tensor(4.0), "cuda:1")
    moved = _on_device([here, there], here.device)
    assert moved[0] is here and there.moved_to == here.device and torch.equal(moved[1], torch.tensor(4.0))

    tensors = [torch.full((4,), 1.5), torch.full((9,), 4.0 / 3.0)]  # norms 3 and 4
    real_norm = torch._foreach_norm

    def split_norms(ts, *args, **kwargs):  # the second tensor's norm comes back on another device
        first, second = real_norm(ts, *args, **kwargs)
        return [first, _Elsewhere(second, "cuda:1")]

    monkeypatch.setattr(torch, "_foreach_norm", split_norms)
    assert functional.global_norm(tensors).item() == pytest.approx(5.0)  # ‖(3, 4)‖ = 5, reduced on one device


def test_scalars_are_taken_to_each_tensors_device(monkeypatch):
    from hf_ssam.functional import _mul_

    calls = []
    real_mul = torch._foreach_mul_
    monkeypatch.setattr(torch, "_foreach_mul_", lambda ts, s: calls.append(len(ts)) or real_mul(ts, s))
    a, b = torch.ones(2), torch.ones(3)
    _mul_([a, b], torch.tensor(2.0))
    assert calls == [2] and torch.equal(a, torch.full((2,), 2.0))  # one device: one multi-tensor kernel


# γ control (experimental): bounds on γ and ρ scaled by the previous γ


@pytest.mark.parametrize("gamma, lo, hi, expected", [(0.3, 0.5, 2.0, 0.5), (0.7, 0.5, 2.0, 0.7), (3.0, 0.5, 2.0, 2.0)])
def test_clip_renormalization_factor(gamma, lo, hi, expected):
    out = functional.clip_renormalization_factor(torch.tensor(gamma, dtype=torch.float64), lo, hi)
    assert out.item() == expected and out.dtype == torch.float64


def test_clip_renormalization_factor_open_upper_bound():
    assert functional.clip_renormalization_factor(torch.tensor(40.0), 0.8, math.inf).item() == 40.0


@pytest.mark.parametrize("lo, hi", [(0.5, 1.0), (1.0, 1.0), (0.1, math.inf), (1, 3)])
def test_check_gamma_bounds_accepts(lo, hi):
    functional.check_gamma_bounds(lo, hi)


@pytest.mark.parametrize(
    "lo, hi, field",
    [(0.0, 2.0, "gamma_min"), (-0.5, 2.0, "gamma_min"), (1.2, 2.0, "gamma_min"), (0.5, 0.9, "gamma_max"),
     (float("nan"), 2.0, "gamma_min"), ("0.5", 2.0, "gamma_min"), (0.5, None, "gamma_max")],
)  # fmt: skip
def test_check_gamma_bounds_refuses(lo, hi, field):
    with pytest.raises(ValueError, match=field):
        functional.check_gamma_bounds(lo, hi)


def test_rho_scaled_by_gamma():
    assert functional.rho_scaled_by_gamma(0.2, None).item() == pytest.approx(0.2)  # first step: ρ
    g_norm, g_asc_norm = torch.tensor(3.0, dtype=torch.float64), torch.tensor(4.0, dtype=torch.float64)
    gamma, _ = functional.renormalization_factor(g_norm, g_asc_norm)
    assert functional.rho_scaled_by_gamma(0.2, gamma).item() == pytest.approx(0.2 * 3 / 4, abs=1e-15)  # ρ·‖g‖/‖g_asc‖
