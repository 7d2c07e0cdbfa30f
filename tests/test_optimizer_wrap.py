"""SSAMOptimizer.wrap() of built optimizers (timm, fused AdamW, transformers), schedulers and state dicts."""

import copy

import numpy as np
import pytest
import torch
from _reference import data, sam_gradient
from torch import nn

from hf_ssam import SSAMOptimizer

X = torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(0))
Y = torch.randint(0, 4, (16,), generator=torch.Generator().manual_seed(1))


class Net(nn.Module):
    """A miniature ViT-like stack (norms, biases, blocks) for timm's layer-decay grouping."""

    def __init__(self):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, 8, 4, stride=4)
        self.blocks = nn.ModuleList([nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 8), nn.GELU()) for _ in range(2)])
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        for block in self.blocks:
            x = x + block(x)
        return self.head(self.norm(x).mean(1))

    def group_matcher(self, coarse: bool = False) -> dict:  # timm's convention: which layer each tensor is in
        return {"stem": r"^patch_embed", "blocks": [(r"^blocks\.(\d+)", None), (r"^norm", (99999,))]}


def _net() -> Net:
    torch.manual_seed(0)
    return Net()


def _loss(model):
    return nn.functional.cross_entropy(model(X), Y)


def _flat(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def _sam_steps(model, opt, n, scheduler=None):
    for i in range(n):
        _loss(model).backward()
        opt.first_step(zero_grad=True)
        _loss(model).backward()
        opt.second_step(zero_grad=True)
        if scheduler is not None:
            scheduler.step_update(i + 1) if hasattr(scheduler, "step_update") else scheduler.step()


def _timm_adamw(model):
    from timm.optim import create_optimizer_v2

    return create_optimizer_v2(model, "adamw", lr=1e-2, weight_decay=0.05, layer_decay=0.7)


def test_wrap_keeps_timm_param_groups_and_state():
    model = _net()
    base = _timm_adamw(model)
    groups = list(base.param_groups)
    opt = SSAMOptimizer.wrap(base, rho=0.1)
    assert opt.param_groups is base.param_groups and opt.state is base.state
    assert all(a is b for a, b in zip(opt.param_groups, groups))  # the same dicts, timm's keys kept
    assert {g["weight_decay"] for g in opt.param_groups} == {0.0, 0.05}  # no decay on norms and biases
    assert len({g["lr_scale"] for g in opt.param_groups}) > 2  # layer decay
    assert all(g["variant"] == "ssam" and g["rho"] == 0.1 for g in opt.param_groups)
    _sam_steps(model, opt, 2)
    assert len(base.state) == sum(len(g["params"]) for g in groups)  # the base optimizer's moments


@pytest.mark.parametrize("kind", ["timm_adamw", "fused_adamw", "transformers_adafactor"])
def test_wrap_with_rho_zero_is_the_base_optimizer(kind):
    def build(model):
        if kind == "timm_adamw":
            return _timm_adamw(model)
        if kind == "fused_adamw":
            return torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
        from transformers.optimization import Adafactor

        return Adafactor(model.parameters(), lr=1e-2, relative_step=False, scale_parameter=False)

    sam_model, base_model = _net(), _net()
    opt, base = SSAMOptimizer.wrap(build(sam_model), rho=0.0), build(base_model)
    _sam_steps(sam_model, opt, 3)
    for _ in range(3):
        _loss(base_model).backward()
        base.step()
        base.zero_grad()
    assert torch.equal(_flat(sam_model), _flat(base_model))
    assert not torch.equal(_flat(base_model), _flat(_net()))


@pytest.mark.parametrize("variant", ["ssam", "asam"])
def test_wrap_equals_the_constructor(variant):
    """Wrapping a built AdamW gives the optimizer the constructor builds over the same groups."""
    a, b = _net(), _net()

    def groups(model):
        decay = [p for n, p in model.named_parameters() if p.ndim > 1]
        no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1]
        return [{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}]

    built = SSAMOptimizer(groups(a), torch.optim.AdamW, variant=variant, rho=0.1, lr=1e-2, max_grad_norm=0.5)
    wrapped = SSAMOptimizer.wrap(torch.optim.AdamW(groups(b), lr=1e-2), variant=variant, rho=0.1, max_grad_norm=0.5)
    _sam_steps(a, built, 3)
    _sam_steps(b, wrapped, 3)
    assert torch.equal(_flat(a), _flat(b))


def test_per_group_rho_set_on_the_base_optimizer_is_kept():
    model = _net()
    head = list(model.head.parameters())
    rest = [p for n, p in model.named_parameters() if not n.startswith("head.")]
    base = torch.optim.SGD([{"params": rest}, {"params": head, "rho": 0.0}], lr=0.1)
    opt = SSAMOptimizer.wrap(base, variant="usam", rho=0.5)
    assert [g["rho"] for g in opt.param_groups] == [0.5, 0.0]
    before = [p.detach().clone() for p in model.parameters()]
    _loss(model).backward()
    opt.first_step(zero_grad=True)  # at w + e
    moved = {n: not torch.equal(p, b) for (n, p), b in zip(model.named_parameters(), before)}
    assert not moved["head.weight"] and not moved["head.bias"] and moved["patch_embed.weight"]
    _loss(model).backward()
    opt.second_step(zero_grad=True)


@pytest.mark.parametrize("scheduler_kind", ["torch", "timm"])
def test_schedulers_attach_and_checkpoints_resume_exactly(scheduler_kind, recwarn):
    def build():
        model = _net()
        opt = SSAMOptimizer.wrap(_timm_adamw(model), rho=0.1, max_grad_norm=1.0)
        if scheduler_kind == "torch":
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5**step)
        else:
            from timm.scheduler import CosineLRScheduler

            sched = CosineLRScheduler(opt, t_initial=6, warmup_t=2, warmup_lr_init=1e-4, t_in_epochs=False)
        return model, opt, sched

    straight, straight_opt, straight_sched = build()
    _sam_steps(straight, straight_opt, 4, straight_sched)
    lrs = [g["lr"] for g in straight_opt.base_optimizer.param_groups]
    if scheduler_kind == "torch":  # the scheduler drives the base optimizer
        assert lrs == pytest.approx([1e-2 * 0.5**4] * len(lrs))
    else:  # timm's applies each group's layer-decay lr_scale
        assert len(set(lrs)) > 2 and max(lrs) < 1e-2
    assert not [w for w in recwarn if "lr_scheduler.step()" in str(w.message)]

    half, half_opt, half_sched = build()
    _sam_steps(half, half_opt, 2, half_sched)
    checkpoint = copy.deepcopy((half.state_dict(), half_opt.state_dict(), half_sched.state_dict()))
    resumed, resumed_opt, resumed_sched = build()
    resumed.load_state_dict(checkpoint[0])
    resumed_opt.load_state_dict(checkpoint[1])
    resumed_sched.load_state_dict(checkpoint[2])
    for i in range(2, 4):
        _loss(resumed).backward()
        resumed_opt.first_step(zero_grad=True)
        _loss(resumed).backward()
        resumed_opt.second_step(zero_grad=True)
        resumed_sched.step_update(i + 1) if scheduler_kind == "timm" else resumed_sched.step()
    assert torch.equal(_flat(resumed), _flat(straight))
    assert checkpoint[1]["param_groups"][0]["rho"] == 0.1


def test_base_optimizer_state_dict_loads_into_ssam_optimizer():
    """A checkpoint saved before switching to SAM: the SAM settings come from the SSAMOptimizer."""
    plain = _net()
    adamw = torch.optim.AdamW(plain.parameters(), lr=1e-2, weight_decay=0.1)
    for _ in range(2):
        _loss(plain).backward()
        adamw.step()
        adamw.zero_grad()
    checkpoint = copy.deepcopy((plain.state_dict(), adamw.state_dict()))

    loaded = _net()
    loaded.load_state_dict(checkpoint[0])
    settings = dict(variant="asam", rho=0.3, lr=1e-2, weight_decay=0.1)
    opt = SSAMOptimizer(loaded.parameters(), torch.optim.AdamW, **settings)
    opt.load_state_dict(checkpoint[1])  # no SAM keys in its groups
    assert opt.param_groups[0]["variant"] == "asam" and opt.param_groups[0]["rho"] == 0.3

    in_place = _net()  # the same AdamW state, built by the SSAMOptimizer's own base optimizer
    reference = SSAMOptimizer(
        in_place.parameters(), torch.optim.AdamW, variant="asam", rho=0.3, lr=1e-2, weight_decay=0.1
    )
    for _ in range(2):
        _loss(in_place).backward()
        reference.base_optimizer.step()
        reference.zero_grad()
    assert torch.equal(_flat(in_place), _flat(loaded))
    _sam_steps(loaded, opt, 3)
    _sam_steps(in_place, reference, 3)
    assert torch.equal(_flat(loaded), _flat(in_place))


def test_loaded_groups_keep_their_own_sam_settings():
    model = _net()
    head = list(model.head.parameters())
    rest = [p for n, p in model.named_parameters() if not n.startswith("head.")]
    groups = [{"params": rest}, {"params": head, "rho": 0.0}]
    opt = SSAMOptimizer(groups, torch.optim.SGD, rho=0.2, lr=0.1)
    opt.load_state_dict(torch.optim.SGD([{"params": rest}, {"params": head}], lr=0.3).state_dict())
    assert [g["rho"] for g in opt.param_groups] == [0.2, 0.0] and opt.param_groups[1]["lr"] == 0.3


@pytest.mark.parametrize(
    "thing, match",
    [
        (torch.optim.AdamW, r"wrap\(\) takes a built torch.optim.Optimizer instance.*got type: the class AdamW.*"
         r"SSAMOptimizer\(params, cls, \.\.\.\)"),
        ([nn.Parameter(torch.zeros(2))], r"wrap\(\) takes a built torch.optim.Optimizer instance.*got list: \[Param"),
        ("adamw", r"got str: 'adamw'"),
    ],
)  # fmt: skip
def test_wrap_refuses_what_is_not_an_optimizer(thing, match):
    with pytest.raises(TypeError, match=match):
        SSAMOptimizer.wrap(thing)


def test_wrap_refuses_an_ssam_optimizer_and_bad_settings():
    w = nn.Parameter(torch.zeros(2))
    ssam = SSAMOptimizer([w], torch.optim.SGD, lr=0.1)
    with pytest.raises(TypeError, match=r"got an SSAMOptimizer; wrap its base optimizer only once"):
        SSAMOptimizer.wrap(ssam)
    with pytest.raises(ValueError, match=r"rho=-1"):
        SSAMOptimizer.wrap(torch.optim.SGD([w], lr=0.1), rho=-1)
    with pytest.raises(ValueError, match=r"rho=-2"):
        SSAMOptimizer.wrap(torch.optim.SGD([{"params": [w], "rho": -2}], lr=0.1))


def test_group_added_to_the_base_after_wrap_gets_the_default_settings_at_the_next_step():
    """Progressive unfreezing: a group appended to the base optimizer takes wrap()'s settings in the SAM step."""
    theta, x, y = data()
    xt, yt = torch.tensor(x), torch.tensor(y)
    w, b = nn.Parameter(torch.tensor(theta[:-1])), nn.Parameter(torch.tensor(theta[-1:]))
    base = torch.optim.SGD([w], lr=0.1)
    opt = SSAMOptimizer.wrap(base, variant="ssam", rho=0.2)
    base.add_param_group({"params": [b]})  # no SAM keys: the base optimizer knows nothing of them
    opt.step(lambda: ((xt @ w + b - yt) ** 2).mean().backward())
    assert {key: base.param_groups[1][key] for key in ("variant", "rho", "renormalize", "asam_eta")} == dict(
        variant="ssam", rho=0.2, renormalize=None, asam_eta=0.01
    )
    g_sam, (g_norm, _, gamma, _) = sam_gradient("ssam", theta, x, y, 0.2)  # e = ρ·g over θ = (w, b), then γ·g_asc
    np.testing.assert_allclose(torch.cat([w, b]).detach().numpy(), theta - 0.1 * g_sam, rtol=0, atol=1e-10)
    assert opt.last_metrics["grad_norm"] == pytest.approx(g_norm, abs=1e-10)
    assert opt.last_metrics["gamma"] == pytest.approx(gamma, abs=1e-10)


def test_bad_group_added_to_the_base_after_wrap_is_refused_at_the_next_step():
    w, b = nn.Parameter(torch.ones(2)), nn.Parameter(torch.ones(1))
    base = torch.optim.SGD([w], lr=0.1)
    opt = SSAMOptimizer.wrap(base, rho=0.2)
    base.add_param_group({"params": [b], "rho": -1.0})
    (w.sum() + b.sum()).pow(2).backward()
    with pytest.raises(ValueError, match=r"param_groups\[1\]: rho=-1.0 is invalid; it must be a finite number >= 0"):
        opt.first_step()
    assert torch.equal(w, torch.ones(2)) and torch.equal(b, torch.ones(1))  # refused before anything moved
