"""Shared code of the benchmark scripts under ``bench/``: environment, output folders, CSV files, plots, data.

Import this module before ``torch`` (the scripts do): it pins the offline, single-threaded environment
the numbers in ``docs/benchmarks.md`` were measured in, unless the caller already set those variables.
"""

from __future__ import annotations

import csv
import os
import platform
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

for _key, _value in {
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "MPLBACKEND": "Agg",
    "TRANSFORMERS_VERBOSITY": "error",
}.items():
    os.environ.setdefault(_key, _value)

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
if str(REPO_ROOT) not in sys.path:  # `python bench/x.py` from a checkout without `pip install -e .`
    sys.path.insert(0, str(REPO_ROOT))

__all__ = [
    "BENCH_DIR",
    "REPO_ROOT",
    "Stopwatch",
    "default_out",
    "digits",
    "environment",
    "format_table",
    "log_space",
    "print_lines",
    "rowwise_sam_direction",
    "savefig",
    "small_cnn",
    "verdict",
    "write_csv",
]


def default_out(name: str) -> Path:
    """The default output folder of a benchmark: ``outputs/bench/<name>/`` under the current directory."""
    return Path("outputs") / "bench" / name


def write_csv(path: Path, rows: Sequence[Mapping[str, Any]], fields: Sequence[str] | None = None) -> Path:
    """Write ``rows`` (dicts) to ``path`` with a header; floats keep 6 significant digits."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = list(fields) if fields is not None else list(dict.fromkeys(k for row in rows for k in row))
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items() if k in fields})
    return path


def savefig(fig: Any, path: Path, dpi: int = 90) -> Path:
    """Save a matplotlib figure as a small PNG and close it."""
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return path


def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str], floatfmt: str = ".3g") -> str:
    """A GitHub-flavoured markdown table of ``rows`` restricted to ``columns``."""

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return format(value, floatfmt)
        return "" if value is None else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def verdict(ok: bool, claim: str) -> str:
    """A claim line: ``HOLDS: <claim>`` or ``DOES NOT HOLD: <claim>``."""
    return f"{'HOLDS' if ok else 'DOES NOT HOLD'}: {claim}"


def environment() -> dict[str, str]:
    """Versions and machine facts worth printing next to measured numbers."""
    import torch

    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": str(torch.get_num_threads()),
        "cpu_count": str(os.cpu_count()),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "cpu",
        "date": time.strftime("%Y-%m-%d"),
    }
    for name in ("transformers", "accelerate", "timm"):
        module = sys.modules.get(name)
        if module is not None:
            info[name] = getattr(module, "__version__", "?")
    return info


def proc_status_bytes(field: str) -> int:
    """A memory field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``, ...) in bytes (Linux)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_rss_peak() -> int:
    """Reset the resident-set high-water mark (``VmHWM``) to the current resident set; returns that set's bytes."""
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    return proc_status_bytes("VmRSS")


class Stopwatch:
    """``with Stopwatch() as sw: ...; sw.seconds`` — wall time of a block."""

    def __enter__(self) -> Stopwatch:
        self.start = time.perf_counter()
        self.seconds = 0.0
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.start


def log_space(start: float, stop: float, num: int) -> list[float]:
    """``num`` log-spaced values from ``start`` to ``stop`` (both included)."""
    if num == 1:
        return [start]
    ratio = (stop / start) ** (1.0 / (num - 1))
    return [start * ratio**i for i in range(num)]


def print_lines(lines: Iterable[str]) -> None:
    for line in lines:
        print(line, flush=True)


def digits() -> tuple[Any, Any]:
    """scikit-learn's 8x8 digits (1797 images, bundled with the package: no download) as standardized tensors."""
    import torch
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    images = torch.tensor(x, dtype=torch.float32).view(-1, 1, 8, 8)
    images = (images - images.mean()) / images.std()
    return images, torch.tensor(y, dtype=torch.long)


def small_cnn(num_classes: int = 10) -> Any:
    """A three-convolution BatchNorm CNN for 8x8 images (about 14k parameters): a miniature ResNet stem."""
    from torch import nn

    def block(c_in: int, c_out: int, stride: int) -> list[nn.Module]:
        return [nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]

    return nn.Sequential(
        *block(1, 16, 1),
        *block(16, 32, 2),
        *block(32, 32, 2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, num_classes),
    )


def sgd_or_sam(params: Any, optimizer: str, rho: float, **sgd_kwargs: Any) -> Any:
    """``torch.optim.SGD`` for ``optimizer="sgd"``, else `SSAMOptimizer` of that variant around the same SGD."""
    import torch

    from hf_ssam import SSAMOptimizer

    if optimizer == "sgd":
        return torch.optim.SGD(params, **sgd_kwargs)
    return SSAMOptimizer(params, torch.optim.SGD, variant=optimizer, rho=rho, **sgd_kwargs)


def train_step(model: Any, opt: Any, loss_fn: Any, xb: Any, yb: Any, *, freeze_bn: bool = True) -> None:
    """One step on (xb, yb): plain SGD, or the two passes of a SAM step (BatchNorm statistics updated once)."""
    import contextlib

    from hf_ssam import SSAMOptimizer, freeze_batchnorm_stats

    if not isinstance(opt, SSAMOptimizer):
        opt.zero_grad()
        loss_fn(model(xb), yb).backward()
        opt.step()
        return
    loss_fn(model(xb), yb).backward()  # g at w
    opt.first_step(zero_grad=True)
    with freeze_batchnorm_stats(model) if freeze_bn else contextlib.nullcontext():
        loss_fn(model(xb), yb).backward()  # g_asc at w + e
    opt.second_step(zero_grad=True)


def rowwise_sam_direction(
    gradient: Any,
    x: Any,
    noise: Any,
    rho: Any,
    normalized: Any,
    renormalize: Any,
    *,
    gamma_bounds: tuple[float, float] | None = None,
    rho_factor: Any = None,
) -> tuple[Any, Any]:
    """One SAM-family step for many independent runs at once: the rows of ``x`` (norms are per row).

    ``gradient(x)`` is the noise-free gradient per row and ``noise`` the additive gradient noise of this
    step, the same in both passes (one mini-batch). ``rho`` (rows, 1) is per row (0 gives plain SGD),
    ``normalized`` (rows, 1, bool) picks SAM*'s ``e = ρ·g/‖g‖`` over SAM's ``e = ρ·g`` and ``renormalize``
    (rows, 1, bool) applies SSAM's ``g_asc ← γ·g_asc``, with γ clipped to ``gamma_bounds`` if given.
    ``rho_factor`` (rows, 1) multiplies ρ (``functional.rho_scaled_by_gamma``). Returns the direction the
    SGD base step takes and the measured, unclipped γ = ‖g‖/‖g_asc‖ per row. Built from the package's
    ``hf_ssam.functional`` pieces; the scripts compare it with ``SSAMOptimizer`` (and ``gamma_control.py`` with its
    ``GammaControlledSAM`` for the γ controls) before using it.
    """
    import torch

    from hf_ssam import functional

    g = gradient(x) + noise  # g = ∇F(x)
    grad_norm = torch.linalg.vector_norm(g, dim=1, keepdim=True)  # ‖g‖ per run
    scale = torch.where(
        normalized,
        functional.perturbation_scale("sam", 1.0, grad_norm),
        functional.perturbation_scale("usam", 1.0, grad_norm),
    )
    scale = scale * rho if rho_factor is None else scale * rho * rho_factor  # e = s·g (ρ·g/‖g‖ or ρ·g)
    ok = torch.isfinite(scale) & torch.isfinite(grad_norm) & (grad_norm > 0)  # else: no perturbation
    g_asc = gradient(x + torch.where(ok, scale * g, 0.0)) + noise  # g_asc = ∇F(x + e), same noise
    gamma, _ = functional.renormalization_factor(grad_norm, torch.linalg.vector_norm(g_asc, dim=1, keepdim=True))
    applied = gamma if gamma_bounds is None else functional.clip_renormalization_factor(gamma, *gamma_bounds)
    return torch.where(renormalize, applied * g_asc, g_asc), gamma
