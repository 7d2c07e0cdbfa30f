"""The GPU path: what behaves differently on CUDA, run by `make gpu-check` (``pytest -m cuda tests/test_cuda.py``).

Every test here is marked ``cuda`` and skips, saying why, where ``torch.cuda.is_available()`` is False:

* fp16 with the real CUDA `GradScaler` (SSAMTrainer, SSAMOptimizer with fused AdamW, SSAMBackward with Accelerate):
  finite, within fp16 tolerance of the fp32 run, an injected overflow skips the step and leaves ``w``;
* bf16, ``torch_compile=True``, FSDP2 with one process on the GPU (torchrun, nccl), sharpness on CUDA vs CPU, and
  the weight backup allocated on the parameters' device (no silent CPU copies);
* **no host synchronisation**: one optimizer step of SSAMTrainer (accumulation 2, every variant, bf16 and fp16),
  one SSAMOptimizer step and one SSAMBackward micro-batch under ``torch.cuda.set_sync_debug_mode("error")``, which
  raises on any synchronizing CUDA call; the metric reads for logging (``sam_metrics()``, ``metrics()``,
  ``last_metrics``) do synchronize, and they are the only ones.

The sync checks are parametrized by device: on CPU the same code runs under the stand-in of tests/test_host_sync.py
(``bool()``, ``.item()``, ``.cpu()``, ``.tolist()`` and ``float()`` of a tensor patched to raise), in every test run.
Figures for the report of ``make gpu-check`` are recorded as the ``figure`` property of each test.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from test_host_sync import no_host_sync as patched_no_host_sync
from test_trainer import Pairs, _args
from torch import nn

from hf_ssam import VARIANTS, SSAMBackward, SSAMOptimizer, SSAMTrainer
from hf_ssam.engines import scaler_enabled

CUDA = torch.cuda.is_available()
NO_CUDA = "needs a CUDA GPU (torch.cuda.is_available() is False); run on one with `make gpu-check`"
ON_CUDA = [pytest.mark.cuda, pytest.mark.skipif(not CUDA, reason=NO_CUDA)]
ROOT = Path(__file__).resolve().parents[1]
#: fp16/bf16 weights after a few steps against fp32: error relative to how far the fp32 weights moved.
FP16_RELATIVE_TOLERANCE = 1e-2
BF16_RELATIVE_TOLERANCE = 5e-2
#: A loss scale that does not overflow on these models (the default 2**16 does in the first steps, which are then
#: skipped by design and would make the comparison with fp32 one of skipped steps).
INIT_SCALE = 2.0**10


def on_devices() -> pytest.MarkDecorator:
    """``device`` = cpu (the stand-in, in every run) and cuda (marked ``cuda``, skipped without CUDA)."""
    return pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=ON_CUDA)])


@pytest.fixture(autouse=True)
def fresh_accelerate_state() -> Iterator[None]:
    """Each test builds its own Accelerator / Trainer with its own mixed precision (the state is process-wide)."""
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


# ------------------------------------------------------------------------------------------ the sync check


@contextlib.contextmanager
def no_host_sync(device: str | torch.device) -> Iterator[None]:
    """Refuse host synchronisations inside the block.

    On CUDA, ``torch.cuda.set_sync_debug_mode("error")``: every synchronizing CUDA call (``.item()``, ``.cpu()``, a
    device-to-host copy, ``nonzero``, a blocking host-to-device copy, ...) raises ``RuntimeError``. On CPU, where
    nothing synchronizes, the stand-in of tests/test_host_sync.py: the tensor methods that would synchronize on a
    GPU raise ``AssertionError``.
    """
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()  # work queued before the block is not the block's
        previous = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("error")
        try:
            yield
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    else:
        with patched_no_host_sync():
            yield


def syncs(fn: Callable[[], object], device: str | torch.device) -> bool:
    """Whether ``fn()`` synchronizes with the host (it runs either way, up to its first synchronisation)."""
    try:
        with no_host_sync(device):
            fn()
    except (RuntimeError, AssertionError) as err:
        if "synchroni" in str(err):  # CUDA: "called a synchronizing CUDA operation"; CPU: "a host synchronisation"
            return True
        raise
    return False


@on_devices()
def test_the_sync_check_catches_a_sync(device):
    x = torch.ones((), device=device)
    assert syncs(lambda: x.item(), device)
    assert syncs(lambda: bool(x > 0), device)
    assert not syncs(lambda: torch.where(x > 0, x, -x).add_(1), device)


class MLP(nn.Module):
    """float32, ``forward(x, labels)``. No ``**kwargs``: the Trainer passes no ``num_items_in_batch`` and the first
    SAM step runs no loss probe (`hf_ssam.normalization.probe_loss`, which reads its measurement on the host once
    per model), so the sync check sees the steady-state step."""

    def __init__(self, d: int = 8, hidden: int = 32):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(d, hidden), nn.Tanh(), nn.Linear(hidden, 1))

    def forward(self, x, labels=None):
        pred = self.net(x).squeeze(-1)
        return {"loss": ((pred.float() - labels) ** 2).mean(), "logits": pred}


def _data(n: int = 32, d: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=g)
    y = x @ torch.randn(d, generator=g) + 0.1 * torch.randn(n, generator=g)
    return x, y


def _precision_args(device: str, precision: str) -> dict:
    """Trainer arguments for ``precision``; fp16 on CPU is fp32 with a CPU GradScaler installed afterwards."""
    if device == "cuda":
        return {"use_cpu": False, precision: precision != "fp32"}
    return {"use_cpu": True, "bf16": precision == "bf16"}


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("variant", VARIANTS)
@on_devices()
def test_no_host_sync_in_a_trainer_step_with_accumulation(tmp_path, device, variant, precision, record_property):
    """Two micro-batches (one optimizer step's training_steps), logging excluded; then the metric read syncs."""
    x, y = _data(n=8)
    k = 2
    args = _args(tmp_path, sam_variant=variant, per_device_train_batch_size=4, gradient_accumulation_steps=k,
                 max_steps=1, **_precision_args(device, precision))  # fmt: skip
    trainer = SSAMTrainer(model=MLP(), args=args, train_dataset=Pairs(x, y))
    trainer.create_optimizer_and_scheduler(num_training_steps=1)
    if device == "cpu" and precision == "fp16":
        trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=INIT_SCALE)  # the CPU stand-in
    if precision == "fp16":
        assert scaler_enabled(trainer.accelerator.scaler)
    trainer.current_gradient_accumulation_steps = k
    dev = trainer.args.device
    trainer.model.to(dev)
    batches = [{"x": x[i::k].to(dev), "labels": y[i::k].to(dev)} for i in range(k)]  # on the device beforehand
    for i, batch in enumerate(batches):
        trainer.accelerator.gradient_state._set_sync_gradients(i == k - 1)
        with trainer.accelerator.autocast():
            assert not syncs(lambda batch=batch: trainer.training_step(trainer.model, batch), device)
    assert all(p.grad is not None and p.grad.device.type == dev.type for p in trainer.model.parameters())
    assert syncs(trainer.sam_metrics, device)  # the log's read is the one sync
    record_property("figure", f"0 syncs in {k} micro-batches; sam_metrics() syncs")


@pytest.mark.parametrize("scaled", [False, True], ids=["closure", "grad_scaler"])
@on_devices()
def test_no_host_sync_in_an_ssam_optimizer_step(device, scaled, record_property):
    """A whole step: step(closure) over fused AdamW, or the GradScaler idiom (fp16 autocast on CUDA)."""
    x, y = _data()
    model = MLP().to(device)
    x, y = x.to(device), y.to(device)
    opt = SSAMOptimizer.wrap(torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True), rho=0.05, max_grad_norm=1.0)
    scaler = torch.amp.GradScaler(device, init_scale=INIT_SCALE)
    dtype = torch.float16 if device == "cuda" else torch.bfloat16

    def loss():
        with torch.autocast(device, dtype=dtype, enabled=scaled):
            return model(x, y)["loss"]

    def closure():
        out = loss()
        out.backward()
        return out

    def step():
        if not scaled:
            opt.step(closure)
            return
        scaler.scale(loss()).backward()
        opt.first_step(zero_grad=True, grad_scaler=scaler)
        scaler.scale(loss()).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()

    step()  # the first step allocates the optimizer state and the backup buffers
    assert not syncs(step, device)
    assert syncs(lambda: opt.last_metrics, device)
    record_property("figure", "0 syncs in a step; last_metrics syncs")


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@on_devices()
def test_no_host_sync_in_an_ssam_backward_micro_batch(device, precision, record_property):
    x, y = _data(n=8)
    mixed = precision if device == "cuda" or precision == "bf16" else "no"
    accelerator = Accelerator(cpu=device == "cpu", mixed_precision=mixed, gradient_accumulation_steps=2)
    if device == "cpu" and precision == "fp16":
        accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=INIT_SCALE)  # the CPU stand-in
    model = MLP()
    model, opt = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1))
    sam_backward = SSAMBackward(model, opt, accelerator=accelerator, variant="ssam", rho=0.05)
    xb, yb = x.to(accelerator.device), y.to(accelerator.device)
    for _ in range(2):
        with accelerator.accumulate(model), accelerator.autocast():
            assert not syncs(lambda: sam_backward(lambda: model(xb, yb)["loss"]), device)
    assert syncs(sam_backward.metrics, device)
    record_property("figure", "0 syncs in a micro-batch; metrics() syncs")


# ----------------------------------------------------------------------------------------- fp16 and bf16


def _flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().float().reshape(-1).cpu() for p in model.parameters()])


def _train_trainer(tmp_path, name: str, **kw) -> SSAMTrainer:
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    x, y = _data()
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    args = _args(tmp_path / name, sam_variant="ssam", sam_rho=0.1, per_device_train_batch_size=8, max_steps=4,
                 use_cpu=False, **kw)  # fmt: skip
    trainer = SSAMTrainer(model=model, args=args, train_dataset=Pairs(x, y), optimizers=(opt, sched))
    if kw.get("fp16"):
        trainer.accelerator.scaler = torch.amp.GradScaler("cuda", init_scale=INIT_SCALE)
    trainer.train()
    return trainer


def _relative_error(run: torch.Tensor, fp32: torch.Tensor, start: torch.Tensor) -> tuple[float, float]:
    return float((run - fp32).abs().max()), float((fp32 - start).abs().max())


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason=NO_CUDA)
def test_fp16_trainer_with_the_cuda_grad_scaler(tmp_path, record_property):
    start = _flat(MLP())
    fp32 = _train_trainer(tmp_path, "fp32")
    fp16 = _train_trainer(tmp_path, "fp16", fp16=True)
    scaler = fp16.accelerator.scaler
    assert isinstance(scaler, torch.amp.GradScaler) and scaler._scale.device.type == "cuda"
    assert scaler.get_scale() == INIT_SCALE  # no step overflowed: all four were taken
    err, moved = _relative_error(_flat(fp16.model), _flat(fp32.model), start)
    assert torch.isfinite(_flat(fp16.model)).all()
    assert err < FP16_RELATIVE_TOLERANCE * moved, (err, moved)
    assert err > 0  # fp16 did run
    gammas = [h["sam/gamma"] for h in fp16.state.log_history if "sam/gamma" in h]
    assert len(gammas) == 4 and all(g == g and g > 0 for g in gammas)
    record_property("figure", f"max |fp16 - fp32| = {err:.2e} ({err / moved:.1e} of the move)")


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason=NO_CUDA)
def test_fp16_trainer_overflow_skips_the_step_and_restores_w(tmp_path, record_property):
    x, y = _data(n=8)
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    args = _args(tmp_path, sam_variant="ssam", sam_rho=0.1, per_device_train_batch_size=8, max_steps=1,
                 use_cpu=False, fp16=True)  # fmt: skip
    trainer = SSAMTrainer(model=model, args=args, train_dataset=Pairs(x, y), optimizers=(opt, sched))
    trainer.create_optimizer_and_scheduler(num_training_steps=1)
    scaler = trainer.accelerator.scaler = torch.amp.GradScaler("cuda", init_scale=INIT_SCALE)
    trainer.accelerator.gradient_state._set_sync_gradients(True)
    trainer.current_gradient_accumulation_steps = 1
    model.cuda()
    w0 = _flat(model)
    weight = model.net[0].weight
    handle = weight.register_hook(lambda g: torch.full_like(g, float("inf")))  # an overflow in both passes
    with trainer.accelerator.autocast():
        trainer.training_step(model, {"x": x.cuda(), "labels": y.cuda()})
    handle.remove()
    assert torch.equal(_flat(model), w0)  # w restored bitwise, no inf written into it
    scaler.step(trainer.optimizer)
    scaler.update()
    assert torch.equal(_flat(model), w0)  # the scaler skipped the step
    assert scaler.get_scale() == INIT_SCALE / 2  # and backed off
    assert trainer.sam_metrics()["sam/skipped"] == 1
    record_property("figure", f"step skipped, scale {INIT_SCALE:g} -> {scaler.get_scale():g}, w bitwise")


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason=NO_CUDA)
def test_bf16_trainer_on_cuda(tmp_path, record_property):
    start = _flat(MLP())
    fp32 = _train_trainer(tmp_path, "fp32")
    bf16 = _train_trainer(tmp_path, "bf16", bf16=True)
    err, moved = _relative_error(_flat(bf16.model), _flat(fp32.model), start)
    assert torch.isfinite(_flat(bf16.model)).all()
    assert 0 < err < BF16_RELATIVE_TOLERANCE * moved, (err, moved)
    record_property("figure", f"max |bf16 - fp32| = {err:.2e} ({err / moved:.1e} of the move)")


def _optimizer_run(precision: str, poison_step: int | None = None) -> tuple[nn.Module, torch.amp.GradScaler, list]:
    x, y = (t.cuda() for t in _data())
    model = MLP().cuda()
    opt = SSAMOptimizer.wrap(torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True), rho=0.05, max_grad_norm=1.0)
    scaler = torch.amp.GradScaler("cuda", init_scale=INIT_SCALE, enabled=precision == "fp16")
    after = []
    for i in range(3):
        with torch.autocast("cuda", dtype=torch.float16, enabled=precision == "fp16"):
            loss = model(x, y)["loss"]
        if i == poison_step:
            loss = loss * float("inf")  # an overflow in the first pass
        scaler.scale(loss).backward()
        opt.first_step(zero_grad=True, grad_scaler=scaler)
        with torch.autocast("cuda", dtype=torch.float16, enabled=precision == "fp16"):
            scaler.scale(model(x, y)["loss"]).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        after.append(_flat(model))
    return model, scaler, after


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason=NO_CUDA)
def test_ssam_optimizer_with_grad_scaler_and_fused_adamw(record_property):
    start = _flat(MLP())
    fp32, _, _ = _optimizer_run("fp32")
    fp16, scaler, _ = _optimizer_run("fp16")
    assert scaler.get_scale() == INIT_SCALE
    err, moved = _relative_error(_flat(fp16), _flat(fp32), start)
    assert err < FP16_RELATIVE_TOLERANCE * moved, (err, moved)
    _, poisoned_scaler, after = _optimizer_run("fp16", poison_step=1)
    assert torch.equal(after[1], after[0])  # step 2 skipped on the device (fused AdamW), w restored
    assert poisoned_scaler.get_scale() == INIT_SCALE / 2
    assert not torch.equal(after[2], after[1])  # and training goes on
    record_property("figure", f"max |fp16 - fp32| = {err:.2e} ({err / moved:.1e} of the move); overflow skipped")


def _accelerate_run(mixed_precision: str) -> tuple[nn.Module, Accelerator]:
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    x, y = _data()
    accelerator = Accelerator(mixed_precision=mixed_precision, gradient_accumulation_steps=2)
    if mixed_precision == "fp16":
        accelerator.scaler = torch.amp.GradScaler("cuda", init_scale=INIT_SCALE)  # before prepare: the optimizer's
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model, opt = accelerator.prepare(model, opt)
    sam_backward = SSAMBackward(model, opt, accelerator=accelerator, variant="ssam", rho=0.1)
    for i in range(8):  # 4 optimizer steps of 2 micro-batches
        xb, yb = x[4 * i : 4 * i + 4].cuda(), y[4 * i : 4 * i + 4].cuda()
        with accelerator.accumulate(model):
            sam_backward(lambda xb=xb, yb=yb: model(xb, yb)["loss"])
            opt.step()
            opt.zero_grad()
    return model, accelerator


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason=NO_CUDA)
def test_ssam_backward_with_accelerate_fp16(record_property):
    start = _flat(MLP())
    fp32, _ = _accelerate_run("no")
    fp16, accelerator = _accelerate_run("fp16")
    scaler = accelerator.scaler
    assert isinstance(scaler, torch.amp.GradScaler) and scaler.get_scale() == INIT_SCALE
    err, moved = _relative_error(_flat(fp16), _flat(fp32), start)
    assert torch.isfinite(_flat(fp16)).all()
    assert 0 < err < FP16_RELATIVE_TOLERANCE * moved, (err, moved)
    record_property("figure", f"max |fp16 - fp32| = {err:.2e} ({err / moved:.1e} of the move)")


# ------------------------------------------------------------------------------------- FSDP2, sharpness, compile


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason=NO_CUDA)
def test_fsdp2_one_process_on_the_gpu(tmp_path, record_property):
    """torchrun, nccl, one process: the weights of SSAMTrainer under FSDP2 equal the float64 reference of
    tests/test_fsdp_trainer.py, and no training_step synchronizes with the host."""
    from test_fsdp_trainer import STEPS, reference

    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": path}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
           str(ROOT / "tests" / "cuda_fsdp_worker.py"), "--out", str(tmp_path)]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-4000:]
    r = torch.load(tmp_path / "fsdp-gpu.pt", weights_only=False)
    assert r["world_size"] == 1 and "nccl" in r["backend"] and r["distributed_type"] == "DistributedType.FSDP"
    assert r["params_are_dtensors"] and r["param_devices"] == ["cuda"] and r["fsdp_units"] >= 3
    assert r["backup_devices"] == ["cuda"]
    run = {"variant": "ssam", "accumulation": 2}
    micro_batches = [(x.double(), y.double()) for x, y in r["forward_inputs"][::2]]  # two passes per micro-batch
    assert len(micro_batches) == STEPS * run["accumulation"]
    assert all(torch.equal(a[0], b[0]) for a, b in zip(r["forward_inputs"][::2], r["forward_inputs"][1::2]))
    expected = reference(run, r["start"], micro_batches)
    err = float((r["weights"].double() - expected).abs().max())
    record_property("figure", f"max |w - float64 reference| = {err:.1e}; sync error: {r['sync_error']}")
    assert err < 1e-5, err
    assert r["sync_error"] is None, r["sync_error"]  # no training_step synchronized with the host


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason=NO_CUDA)
def test_sharpness_on_cuda_matches_cpu(record_property):
    import test_sharpness as ts

    from hf_ssam.sharpness import sam_sharpness, top_hessian_eigenvalues

    model, batches = ts.MLP(torch.float32), ts._mlp_batches(torch.float32)
    cpu = top_hessian_eigenvalues(model, ts._loss, batches, k=2, tol=1e-5, max_iter=300)
    cpu_sharpness = sam_sharpness(model, ts._loss, batches, 0.1)
    model.cuda()
    gpu_batches = [{key: value.cuda() for key, value in b.items()} for b in batches]
    gpu = top_hessian_eigenvalues(model, ts._loss, gpu_batches, k=2, tol=1e-5, max_iter=300)
    gpu_sharpness = sam_sharpness(model, ts._loss, gpu_batches, 0.1)
    assert gpu == pytest.approx(cpu, rel=1e-3)
    assert gpu_sharpness == pytest.approx(cpu_sharpness, rel=1e-3)
    assert next(model.parameters()).device.type == "cuda"  # measured in place, left where it was
    rel = max(abs(g - c) / abs(c) for g, c in zip(gpu, cpu))
    record_property("figure", f"top eigenvalues {gpu[0]:.4g}, {gpu[1]:.4g}; rel. diff to CPU {rel:.1e}")


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason=NO_CUDA)
def test_torch_compile_on_cuda(tmp_path, record_property):
    start = _flat(MLP())
    eager = _train_trainer(tmp_path, "eager")
    compiled = _train_trainer(tmp_path, "compiled", torch_compile=True)
    err, moved = _relative_error(_flat(compiled.model), _flat(eager.model), start)
    assert torch.isfinite(_flat(compiled.model)).all()
    assert err < 1e-3 * moved, (err, moved)  # inductor's fused kernels round differently
    gammas = [h["sam/gamma"] for h in compiled.state.log_history if "sam/gamma" in h]
    assert len(gammas) == 4
    record_property("figure", f"max |compiled - eager| = {err:.1e}")


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason=NO_CUDA)
def test_backup_buffers_live_on_the_parameters_device(tmp_path, record_property):
    trainer = _train_trainer(tmp_path, "backup")
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    assert trainer._sam_backup is not None and len(trainer._sam_backup) == len(params)
    assert all(b.device == p.device and b.device.type == "cuda" for b, p in zip(trainer._sam_backup, params))
    model = MLP().cuda()
    opt = SSAMOptimizer(model.parameters(), torch.optim.SGD, lr=0.1)
    x, y = (t.cuda() for t in _data())

    def closure():
        loss = model(x, y)["loss"]
        loss.backward()
        return loss

    opt.step(closure)
    assert opt._backup and all(b.device == p.device for p, b in opt._backup.items())
    sam_backward = SSAMBackward(model, torch.optim.SGD(model.parameters(), lr=0.1))
    sam_backward(lambda: model(x, y)["loss"])
    assert all(b.device.type == "cuda" for b in sam_backward._step.backup)
    record_property("figure", f"{len(params)} trainer buffers on {params[0].device}")
