"""Peak memory of one configuration, each in a fresh subprocess (its own high-water mark)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from .configs import make_runner
from .timing import DEVICE
from .workloads import WORKLOADS

__all__ = ["measure_memory", "memory_child", "peak_memory_bytes"]


def peak_memory_bytes() -> int:
    """Peak anonymous resident memory of this process (where tensors live), or the CUDA allocator's peak.

    On Linux: the resident-set high-water mark (``VmHWM``) less the file-backed and shared pages resident at
    the end (``RssFile`` + ``RssShmem``: the shared libraries' code, which only grows while the process
    runs). Those pages vary by up to 16 MiB between two runs of identical work, with the state of the page
    cache (for example when two children start together), where the anonymous part repeats to 1 MiB.
    """
    if DEVICE.type == "cuda":
        return int(torch.cuda.max_memory_allocated())
    try:
        with open("/proc/self/status") as fh:
            kib = {line.split(":")[0]: int(line.split()[1]) for line in fh if line.startswith(_STATUS_FIELDS)}
        return (kib["VmHWM"] - kib.get("RssFile", 0) - kib.get("RssShmem", 0)) * 1024
    except (OSError, KeyError, ValueError):
        pass
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


_STATUS_FIELDS = ("VmHWM:", "RssFile:", "RssShmem:")


def memory_child(model_name: str, config: str, quick: bool, steps: int) -> dict[str, Any]:
    """Run ``steps`` steps of one configuration in this (fresh) process and report its peak memory."""
    torch.set_num_threads(1)
    workload = WORKLOADS[model_name](quick)
    model = workload.build().to(DEVICE)
    dataset = workload.samples(workload.batch_size * 4)
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    with tempfile.TemporaryDirectory() as tmp:
        make_runner(config, workload, model, dataset, steps, tmp).run()
    return {"model": model_name, "config": config, "peak_bytes": peak_memory_bytes(), "param_bytes": param_bytes}


def measure_memory(
    script: Path, model_name: str, configs: list[str], quick: bool, steps: int, jobs: int = 2
) -> list[dict]:
    """One fresh subprocess per configuration (``jobs`` at a time: each has its own high-water mark).

    ``script`` is the benchmark's command line, run with ``--memory-child CONFIG`` (it calls `memory_child`).
    """

    def command(config: str) -> list[str]:
        cmd = [sys.executable, str(script), "--memory-child", config, "--model", model_name]
        cmd += ["--memory-steps", str(steps)]
        return cmd + (["--quick"] if quick else [])

    # glibc keeps freed heap blocks and only returns mmap-ed ones; with a fixed 128 KiB mmap threshold every
    # tensor-sized block goes back to the OS when freed, so the high-water mark follows the live tensors
    # (reproducible to ~0.1 MiB) instead of the heap's fragmentation (tens of MiB of run-to-run noise).
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(128 * 1024))
    results: dict[str, dict[str, Any]] = {}
    pending = list(configs)
    running: list[tuple[str, subprocess.Popen]] = []
    while pending or running:
        while pending and len(running) < jobs:
            config = pending.pop(0)
            running.append(
                (
                    config,
                    subprocess.Popen(
                        command(config), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
                    ),
                )
            )
        config, proc = running.pop(0)
        stdout, stderr = proc.communicate()
        lines = [line for line in stdout.splitlines() if line.startswith("{")]
        if proc.returncode != 0 or not lines:
            raise RuntimeError(f"memory child {config} failed:\n{stdout}\n{stderr}")
        results[config] = json.loads(lines[-1])
        print(f"  memory {model_name} {config}: peak {results[config]['peak_bytes'] / 2**20:.1f} MiB", flush=True)
    return [results[c] for c in configs]
