"""SSAMOptimizer with torch.amp: GradScaler (fp32, fp16/bf16 autocast), inf/NaN skips, and no host syncs."""

import contextlib

import pytest
import torch
from torch import nn

from hf_ssam import VARIANTS, SSAMOptimizer

SCALE = 2.0**12
VARIANT_RENORM = [(v, None) for v in VARIANTS] + [(v, True) for v in ("sam", "usam", "asam")]
X = torch.randn(32, 6, generator=torch.Generator().manual_seed(0))
Y = torch.randint(0, 3, (32,), generator=torch.Generator().manual_seed(1))


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))


def _base(model: nn.Module, kind: str) -> torch.optim.Optimizer:
    if kind == "sgd":
        return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.1, fused=kind == "adamw_fused")


def _flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def _loss(model, autocast=None, poison=False):
    with torch.autocast("cpu", dtype=autocast, enabled=autocast is not None):
        loss = nn.functional.cross_entropy(model(X), Y)
    return loss * float("inf") if poison else loss  # an overflow: every gradient inf/NaN


def _train(
    variant="ssam",
    renormalize=None,
    scale=None,
    base="sgd",
    steps=3,
    autocast=None,
    unscale_first=False,
    clip=None,
    poison=None,
    model=None,
):
    """SAM steps with the GradScaler idiom (``scale=None``: the scaler is disabled, i.e. plain fp32)."""
    model = model or _model()
    opt = SSAMOptimizer.wrap(_base(model, base), variant=variant, rho=0.1, renormalize=renormalize, max_grad_norm=clip)
    scaler = torch.amp.GradScaler("cpu", init_scale=scale or 1.0, enabled=scale is not None)
    for i in range(steps):
        scaler.scale(_loss(model, autocast, poison == (i, 1))).backward()
        opt.first_step(zero_grad=True, grad_scaler=scaler)
        scaler.scale(_loss(model, autocast, poison == (i, 2))).backward()
        if unscale_first:
            scaler.unscale_(opt)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
    return model, opt, scaler


@pytest.mark.parametrize("variant, renormalize", VARIANT_RENORM)
@pytest.mark.parametrize("base", ["sgd", "adamw", "adamw_fused"])
def test_loss_scale_gives_the_unscaled_weights(variant, renormalize, base):
    plain, plain_opt, _ = _train(variant, renormalize, base=base)
    scaled, scaled_opt, scaler = _train(variant, renormalize, scale=SCALE, base=base)
    assert scaler.get_scale() == SCALE  # no overflow: the steps were taken
    torch.testing.assert_close(_flat(scaled), _flat(plain), rtol=0, atol=1e-6)
    assert not torch.equal(_flat(scaled), _flat(_model()))
    for key in ("grad_norm", "ascent_grad_norm", "gamma"):  # γ from norms in the same (unscaled) units
        assert scaled_opt.last_metrics[key] == pytest.approx(plain_opt.last_metrics[key], rel=1e-6)


@pytest.mark.parametrize("variant", ["ssam", "sam"])
def test_unscale_before_step_and_clipping(variant):
    """``scaler.unscale_(opt)`` before ``scaler.step(opt)`` works, and clipping is in unscaled units."""
    plain, _, _ = _train(variant, clip=0.05)
    scaled, _, _ = _train(variant, scale=SCALE, clip=0.05, unscale_first=True)
    unclipped, _, _ = _train(variant)
    torch.testing.assert_close(_flat(scaled), _flat(plain), rtol=0, atol=1e-6)
    assert (_flat(plain) - _flat(unclipped)).abs().max() > 1e-3  # the clipping bites


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("variant", VARIANTS)
def test_autocast_with_loss_scale(dtype, variant):
    plain, _, _ = _train(variant, autocast=dtype, clip=0.5)
    scaled, _, scaler = _train(variant, scale=SCALE, autocast=dtype, clip=0.5)
    assert scaler.get_scale() == SCALE
    torch.testing.assert_close(_flat(scaled), _flat(plain), rtol=0, atol=1e-6)


@pytest.mark.parametrize("poisoned_pass", [1, 2])
@pytest.mark.parametrize("base", ["sgd", "adamw", "adamw_fused"])
@pytest.mark.parametrize("variant", ["ssam", "asam"])
def test_inf_in_either_pass_skips_the_step(poisoned_pass, base, variant):
    model = _model()
    seen = []
    model[0].register_forward_hook(lambda m, i, o: seen.append(torch.isfinite(m.weight).all().item()))
    _, opt, scaler = _train(variant, scale=SCALE, base=base, steps=1, model=model)  # one normal step
    before_w = _flat(model).clone()
    before_state = {k: {n: v.clone() for n, v in s.items()} for k, s in opt.state_dict()["state"].items()}

    scaler.scale(_loss(model, poison=poisoned_pass == 1)).backward()
    opt.first_step(zero_grad=True, grad_scaler=scaler)
    if poisoned_pass == 1:
        assert torch.equal(_flat(model), before_w)  # perturbation skipped: the second pass runs at w
    scaler.scale(_loss(model, poison=poisoned_pass == 2)).backward()
    scaler.step(opt)
    scaler.update()
    opt.zero_grad()

    assert all(seen)  # the weights were finite in every forward pass, w + e included
    assert torch.equal(_flat(model), before_w)  # step skipped: weights as before
    after_state = opt.state_dict()["state"]
    for k, s in before_state.items():
        for n, v in s.items():
            assert torch.equal(after_state[k][n], v), f"optimizer state {k}.{n} changed"
    assert scaler.get_scale() == SCALE * scaler.get_backoff_factor()  # backed off, as for a plain optimizer
    assert opt.last_metrics["skipped"] == 1.0

    scaler.scale(_loss(model)).backward()  # the next step proceeds normally
    opt.first_step(zero_grad=True, grad_scaler=scaler)
    scaler.scale(_loss(model)).backward()
    scaler.step(opt)
    scaler.update()
    reference, _, _ = _train(variant, base=base, steps=2)  # the same two good steps, no scaler
    torch.testing.assert_close(_flat(model), _flat(reference), rtol=0, atol=1e-6)


def test_zero_gradient_without_scaler_skips_the_perturbation_only():
    model = _model()
    opt = SSAMOptimizer(model.parameters(), torch.optim.SGD, lr=0.1)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    before = _flat(model).clone()
    opt.first_step(zero_grad=True)
    assert torch.equal(_flat(model), before)
    _loss(model).backward()
    opt.second_step()
    assert opt.last_metrics["skipped"] == 1.0 and not torch.equal(_flat(model), before)  # the base step ran


# ----------------------------------------------------------------------------------- no host synchronisation

HOST_READS = ("__bool__", "item", "cpu", "tolist", "numpy", "__float__", "__int__")


@contextlib.contextmanager
def no_host_reads():
    """Every way of reading a tensor on the host raises inside the block."""
    saved = {name: getattr(torch.Tensor, name) for name in HOST_READS}

    def refuse(name):
        def method(*args, **kwargs):
            raise AssertionError(f"Tensor.{name}() was called: a host synchronisation")

        return method

    for name in HOST_READS:
        setattr(torch.Tensor, name, refuse(name))
    try:
        yield
    finally:
        for name, method in saved.items():
            setattr(torch.Tensor, name, method)


def test_the_guard_catches_host_reads():  # guards the test below
    for read in (bool, float, lambda t: t.item(), lambda t: t.cpu()):
        with no_host_reads(), pytest.raises(AssertionError, match="host synchronisation"):
            read(torch.ones(()))


@pytest.mark.parametrize("variant, renormalize", VARIANT_RENORM)
def test_no_host_sync_without_scaler(variant, renormalize):
    model = _model()
    opt = SSAMOptimizer(
        model.parameters(), torch.optim.SGD, variant=variant, rho=0.1, renormalize=renormalize, lr=0.1, momentum=0.9
    )
    opt.max_grad_norm = 0.5
    with no_host_reads():
        _loss(model).backward()
        opt.first_step(zero_grad=True)
        _loss(model).backward()
        opt.second_step(zero_grad=True)
        _loss(model).backward()
        opt.first_step(zero_grad=True)
        _loss(model).backward()
        opt.step()  # finishes the step first_step began
        opt.step(lambda: _loss(model).backward())
        for p in model.parameters():  # zero gradient: the skip is decided on the device
            p.grad = torch.zeros_like(p)
        opt.first_step(zero_grad=True)
        _loss(model).backward()
        opt.second_step(zero_grad=True)
    assert opt.last_metrics["skipped"] == 1.0


@pytest.mark.parametrize("unscale_first", [False, True])
@pytest.mark.parametrize("variant", VARIANTS)
def test_no_host_sync_with_scaler_and_fused_base(variant, unscale_first):
    """The whole GradScaler idiom, inf steps included, never reads a tensor on the host (fused AdamW base)."""
    model = _model()
    opt = SSAMOptimizer.wrap(torch.optim.AdamW(model.parameters(), lr=0.01, fused=True), variant=variant)
    opt.max_grad_norm = 1.0
    scaler = torch.amp.GradScaler("cpu", init_scale=SCALE)
    before = _flat(model).clone()
    with no_host_reads():
        for poison in (None, 1, 2):
            scaler.scale(_loss(model, poison=poison == 1)).backward()
            opt.first_step(zero_grad=True, grad_scaler=scaler)
            scaler.scale(_loss(model, poison=poison == 2)).backward()
            if unscale_first:
                scaler.unscale_(opt)
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
    assert scaler.get_scale() == SCALE / 4  # two overflows
    assert torch.isfinite(_flat(model)).all() and not torch.equal(_flat(model), before)


# ----------------------------------------------------------------------------------------------- misuse


def test_grad_scaler_must_be_a_grad_scaler():
    model = _model()
    opt = SSAMOptimizer(model.parameters(), torch.optim.SGD, lr=0.1)
    _loss(model).backward()

    class NativeScaler:  # timm's wrapper keeps the GradScaler in ._scaler
        _scaler = torch.amp.GradScaler("cpu")

    with pytest.raises(TypeError, match=r"grad_scaler=.*torch.amp.GradScaler.*got NativeScaler.*\._scaler"):
        opt.first_step(grad_scaler=NativeScaler())
    with pytest.raises(TypeError, match=r"torch.amp.GradScaler.*got float: 1024.0"):
        opt.first_step(grad_scaler=1024.0)


def test_scaled_first_step_must_be_finished_by_the_scaler():
    model = _model()
    opt = SSAMOptimizer(model.parameters(), torch.optim.SGD, lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=SCALE)
    w = _flat(model).clone()
    scaler.scale(_loss(model)).backward()
    opt.first_step(zero_grad=True, grad_scaler=scaler)
    scaler.scale(_loss(model)).backward()
    with pytest.raises(RuntimeError, match=r"grad_scaler.step\(optimizer\)"):
        opt.second_step()
    assert torch.equal(_flat(model), w)  # w restored all the same


def test_scaler_step_needs_the_scale_in_first_step():
    model = _model()
    opt = SSAMOptimizer(model.parameters(), torch.optim.SGD, lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=SCALE)
    scaler.scale(_loss(model)).backward()
    opt.first_step(zero_grad=True)
    scaler.scale(_loss(model)).backward()
    with pytest.raises(RuntimeError, match=r"first_step\(zero_grad=True, grad_scaler=scaler\)"):
        scaler.step(opt)


def test_disabled_scaler_is_plain_training():
    plain = _model()
    opt = SSAMOptimizer.wrap(_base(plain, "sgd"), variant="ssam", rho=0.1)
    for _ in range(3):
        _loss(plain).backward()
        opt.first_step(zero_grad=True)
        _loss(plain).backward()
        opt.second_step(zero_grad=True)
    model = _model()
    opt = SSAMOptimizer.wrap(_base(model, "sgd"), variant="ssam", rho=0.1)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    for _ in range(3):
        scaler.scale(_loss(model)).backward()
        opt.first_step(zero_grad=True, grad_scaler=scaler)
        scaler.scale(_loss(model)).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
    assert torch.equal(_flat(model), _flat(plain))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.complex128])
def test_zero_unless_is_exact_for_inf_and_nan(dtype):
    from hf_ssam import functional

    values = torch.tensor([1.5, -2.0, float("inf"), float("-inf"), float("nan"), 0.0]).to(dtype)
    kept, dropped = values.clone(), values.clone()
    functional.zero_unless_([kept], torch.tensor(True))
    functional.zero_unless_([dropped], torch.tensor(False))
    assert torch.equal(kept.view(torch.uint8), values.view(torch.uint8))  # bit for bit, NaN included
    assert torch.equal(dropped, torch.zeros_like(values)) and not torch.signbit(dropped.real).any()
