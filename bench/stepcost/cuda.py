"""``step_cost.py --device cuda``: the step cost and memory on one GPU, timed with CUDA events.

Five configurations per model, interleaved step by step as on CPU (one thread each, a baton): ``trainer:plain``,
``trainer:sam``, ``trainer:ssam``, ``trainer:ssam@5`` and ``loop:ssam`` (the SSAM maths written by hand). Each
step is timed by two CUDA events recorded on the stream around it (``on_step_begin`` to ``on_step_end`` for the
Trainer), with no synchronize in between: the steps queue as they do in training, and the events measure the
stream's time from the start of a step to its end. The first ``--warmup`` steps are dropped (cuDNN/cuBLAS
autotuning, the caching allocator's first allocations); the ratios are paired medians (`timing.paired_ratio`).
Peak memory is ``torch.cuda.max_memory_allocated`` of a fresh process per configuration, in units of the
trainable parameters' bytes.

Models: the small BERT and ViT of the CPU benchmark, and ``vit_s16`` (ViT-S/16, 224 px, batch 256, bf16), large
enough that the GPU, not the host launching kernels, sets the step time. The small models are launch-bound on a
large GPU: their targets allow for the host-side cost of the SAM bookkeeping kernels.
"""

from __future__ import annotations

from typing import Any

import torch

from .timing import paired_ratio

__all__ = [
    "CUDA_CONFIGS",
    "CUDA_MEMORY_CONFIGS",
    "CUDA_MODELS",
    "NO_CUDA",
    "TARGETS",
    "cuda_checks",
    "device_lines",
]

CUDA_CONFIGS: tuple[str, ...] = ("trainer:plain", "trainer:sam", "trainer:ssam", "trainer:ssam@5", "loop:ssam")
CUDA_MEMORY_CONFIGS: list[str] = ["trainer:plain", "trainer:ssam"]
CUDA_MODELS: tuple[str, ...] = ("bert", "vit", "vit_s16")
NO_CUDA = "no CUDA device: torch.cuda.is_available() is False"

#: (check, reference configuration, paired group) -> target per model; the compute-bound ViT-S/16 gets the CPU
#: benchmark's targets, the launch-bound small models looser ones.
_COMPUTE_BOUND = {"ssam/plain": 2.05, "ssam/sam": 1.02, "trainer/loop": 1.05, "interval 5": 1.25, "memory": 1.1}
_LAUNCH_BOUND = {"ssam/plain": 2.3, "ssam/sam": 1.05, "trainer/loop": 1.15, "interval 5": 1.4, "memory": 1.1}
TARGETS: dict[str, dict[str, float]] = {"bert": _LAUNCH_BOUND, "vit": _LAUNCH_BOUND, "vit_s16": _COMPUTE_BOUND}

_RATIOS: tuple[tuple[str, str, str, int, str], ...] = (
    ("ssam/plain", "trainer:ssam", "trainer:plain", 1, "two passes: 2.0 is the physical limit"),
    ("ssam/sam", "trainer:ssam", "trainer:sam", 1, "the renormalization's cost"),
    ("trainer/loop", "trainer:ssam", "loop:ssam", 1, "Trainer integration over hand-written SSAM maths"),
    ("interval 5", "trainer:ssam@5", "trainer:plain", 5, "sam_interval=5, whole 5-step cycles"),
)


def cuda_checks(
    model_name: str, times: dict[str, list[float]], memory: list[dict[str, Any]] | None
) -> list[dict[str, Any]]:
    """The PASS/FAIL rows of one model: the four paired ratios and the extra peak memory (x parameter bytes)."""
    targets = TARGETS.get(model_name, _COMPUTE_BOUND)
    out = []

    def add(key: str, name: str, value: float, note: str, ci: tuple[float, float] | None = None) -> None:
        target = targets[key]
        out.append(
            {
                "model": model_name,
                "check": name,
                "value": value,
                "ci95": "" if ci is None else f"[{ci[0]:.3f}, {ci[1]:.3f}]",
                "target": f"<= {target:g}",
                "status": "PASS" if value <= target else "FAIL",
                "note": note,
            }
        )

    for key, a, b, group, note in _RATIOS:
        if a in times and b in times:
            value, low, high = paired_ratio(times[a], times[b], group)
            add(key, f"{a} / {b}", value, note, (low, high))
    if memory:
        peak = {m["config"]: m["peak_bytes"] for m in memory}
        pbytes = memory[0]["param_bytes"]
        if "trainer:ssam" in peak and "trainer:plain" in peak:
            add(
                "memory",
                "extra peak memory trainer:ssam vs trainer:plain (x param bytes)",
                (peak["trainer:ssam"] - peak["trainer:plain"]) / pbytes,
                f"torch.cuda.max_memory_allocated; param bytes {pbytes / 2**20:.1f} MiB",
            )
    return out


def device_lines() -> list[str]:
    """The GPU, torch and CUDA versions, one ``key: value`` line each."""
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return [
        f"device: {props.name} ({props.total_memory / 2**30:.0f} GiB, compute capability {props.major}.{props.minor})",
        f"torch: {torch.__version__}",
        f"CUDA: {torch.version.cuda}",
        f"cuDNN: {torch.backends.cudnn.version()}",
    ]
