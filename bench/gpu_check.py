"""``make gpu-check``: the whole GPU verification in one command, under 8 minutes on one GPU, with a verdict table.

Parts, in order, each under its own time limit (``timeout``):

1. **CUDA tests** — ``pytest -m cuda tests/test_cuda.py``: fp16 with the real GradScaler, bf16, SSAMOptimizer with
   GradScaler and fused AdamW, SSAMBackward with Accelerate fp16, FSDP2 on the GPU (torchrun, nccl), sharpness on
   CUDA vs CPU, ``torch_compile=True``, the weight backup on the parameters' device;
2. **no host syncs** — the tests of part 1 that run the steps under ``torch.cuda.set_sync_debug_mode("error")``
   (listed apart in the table);
3. **step cost** — ``bench/step_cost.py --device cuda`` in a short mode: CUDA-event paired ratios and peak memory.

Writes ``outputs/gpu-check/`` (``--out``): ``gpu-check.md`` (device name, torch/CUDA versions, every check PASS/FAIL
with its figure), each part's log, ``cuda-tests.xml`` and ``step_cost/``. Exits 1 when any check fails, a part fails
or runs past its limit. Without CUDA it prints one line saying so and exits 0 without running anything.

    .venv/bin/python bench/gpu_check.py            # what `make gpu-check` runs
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NO_CUDA_LINE = "gpu-check: no CUDA device here (torch.cuda.is_available() is False): nothing run, exit 0."
#: Seconds per part: 4 + 3 minutes of limits, so that the whole check stays under 8 minutes.
TESTS_LIMIT_S = 240
BENCH_LIMIT_S = 180
#: The short mode of the step-cost benchmark (the three models, 5 warm-up + 20 timed steps per configuration).
BENCH_ARGS = ("--device", "cuda", "--steps", "20", "--warmup", "5", "--memory-steps", "3")
#: Test names (or parts of them) that are the no-host-sync checks of part 2.
SYNC_MARK = "sync"


@dataclass
class Row:
    """One line of the verdict table."""

    part: str
    check: str
    status: str  # PASS, FAIL, SKIP (a CUDA test skipped on the GPU counts as a failure of the check)
    figure: str = ""


@dataclass
class Part:
    """A command run under ``timeout``; ``parse`` turns its outputs into rows."""

    name: str
    command: Sequence[str]
    limit_s: int
    parse: Callable[[Path], list[Row]]
    log: str
    rows: list[Row] = field(default_factory=list)
    seconds: float = 0.0
    code: int | None = None


# ------------------------------------------------------------------------------------------------- parsing


def parse_junit(path: Path) -> list[Row]:
    """One row per test case of a pytest ``--junitxml`` file: PASS/FAIL/SKIP and its ``figure`` property.

    Tests whose name contains ``sync`` are part 2 (no host syncs), the rest part 1.
    """
    rows = []
    for case in ET.parse(path).getroot().iter("testcase"):
        name = case.get("name", "?")
        props = {p.get("name"): p.get("value", "") for p in case.iter("property")}
        bad = case.find("failure")
        bad = bad if bad is not None else case.find("error")
        skipped = case.find("skipped")
        if bad is not None:
            status, figure = "FAIL", ((bad.get("message") or "").splitlines() or [""])[0][:160]
        elif skipped is not None:
            status, figure = "SKIP", (skipped.get("message") or "")[:160]
        else:
            status, figure = "PASS", props.get("figure", "")
        part = "2. no host sync" if SYNC_MARK in name else "1. CUDA tests"
        rows.append(Row(part, name, status, figure.replace("|", "/")))
    return rows


def parse_checks(path: Path) -> list[Row]:
    """One row per line of the step-cost benchmark's ``checks.csv``: the value, its interval and target."""
    rows = []
    with path.open(newline="") as fh:
        for c in csv.DictReader(fh):
            figure = f"{float(c['value']):.3f}"
            if c.get("ci95"):
                figure += f" {c['ci95']}"
            if c.get("target"):
                figure += f" (target {c['target']})"
            rows.append(Row("3. step cost", f"[{c['model']}] {c['check']}", c["status"], figure))
    return rows


def render(meta: Sequence[str], parts: Sequence[Part]) -> str:
    """The markdown report: the environment lines, then the table of every check."""
    lines = ["# gpu-check", ""] + [f"- {m}" for m in meta] + [""]
    lines += ["| part | check | result | figure |", "|---|---|---|---|"]
    for part in parts:
        for row in part.rows:
            lines.append(f"| {row.part} | {row.check} | {row.status} | {row.figure} |")
    lines.append("")
    lines.append(f"**{verdict(parts)}**")
    return "\n".join(lines) + "\n"


def failures(parts: Sequence[Part]) -> list[str]:
    """What failed: rows not PASS (SKIP included: on a GPU nothing of this may skip), parts that failed or
    ran past their limit, parts that produced no rows."""
    bad = [f"{r.part}: {r.check} {r.status}" for p in parts for r in p.rows if r.status != "PASS"]
    for p in parts:
        if p.code in (124, 137):
            bad.append(f"{p.name}: past its limit of {p.limit_s} s")
        elif p.code not in (0, None):
            bad.append(f"{p.name}: exit status {p.code}")
        if p.code is not None and not p.rows:
            bad.append(f"{p.name}: no results")
    return bad


def verdict(parts: Sequence[Part]) -> str:
    bad = failures(parts)
    return "PASS: every check passed" if not bad else f"FAIL: {len(bad)} failure(s)"


# ------------------------------------------------------------------------------------------------- running


def run_part(part: Part, out: Path) -> None:
    """Run ``part.command`` under ``timeout`` (kill 10 s after), its output in ``out/part.log``; parse the rows."""
    started = time.perf_counter()
    command = ["timeout", "--kill-after=10", str(part.limit_s), *part.command]
    print(f"gpu-check: {part.name} (limit {part.limit_s} s): {' '.join(part.command)}", flush=True)
    with (out / part.log).open("w") as log:
        part.code = subprocess.run(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT).returncode
    part.seconds = time.perf_counter() - started
    try:
        part.rows = part.parse(out)
    except (OSError, ET.ParseError, KeyError, ValueError) as err:
        part.rows = []
        print(f"gpu-check: {part.name}: no results ({type(err).__name__}: {err})", flush=True)
    print(f"gpu-check: {part.name}: exit {part.code} in {part.seconds:.0f} s, {len(part.rows)} checks", flush=True)


def default_parts(out: Path, tests_limit: int = TESTS_LIMIT_S, bench_limit: int = BENCH_LIMIT_S) -> list[Part]:
    py = sys.executable
    tests = [py, "-m", "pytest", "-m", "cuda", "tests/test_cuda.py", "-q", "-rA",
             f"--junitxml={out / 'cuda-tests.xml'}"]  # fmt: skip
    bench = [py, "bench/step_cost.py", *BENCH_ARGS, "--out", str(out / "step_cost")]
    return [
        Part("CUDA tests and the sync check", tests, tests_limit, lambda o: parse_junit(o / "cuda-tests.xml"),
             "cuda-tests.log"),
        Part("step cost", bench, bench_limit, lambda o: parse_checks(o / "step_cost" / "checks.csv"),
             "step-cost.log"),
    ]  # fmt: skip


def environment_lines() -> list[str]:
    import torch

    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return [
        f"date: {datetime.date.today().isoformat()}",
        f"device: {props.name} ({props.total_memory / 2**30:.0f} GiB)",
        f"torch: {torch.__version__}",
        f"CUDA: {torch.version.cuda}",
        f"command: make gpu-check ({Path(sys.executable).name} bench/gpu_check.py)",
    ]


def run(parts: Sequence[Part], out: Path, meta: Sequence[str]) -> int:
    """Run the parts in order, write ``out/gpu-check.md``, print the table; 1 on any failure."""
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    for part in parts:
        run_part(part, out)
    meta = [*meta, f"total: {time.perf_counter() - started:.0f} s"]
    report = render(meta, parts)
    (out / "gpu-check.md").write_text(report)
    print("\n" + report, flush=True)
    for line in failures(parts):
        print(f"gpu-check: FAIL {line}", flush=True)
    print(f"gpu-check: wrote {out / 'gpu-check.md'}", flush=True)
    return 1 if failures(parts) else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("outputs") / "gpu-check")
    parser.add_argument("--tests-limit", type=int, default=TESTS_LIMIT_S, help="seconds for part 1 (and 2)")
    parser.add_argument("--bench-limit", type=int, default=BENCH_LIMIT_S, help="seconds for part 3")
    args = parser.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print(NO_CUDA_LINE, flush=True)
        return 0
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    out = args.out if args.out.is_absolute() else ROOT / args.out
    return run(default_parts(out, args.tests_limit, args.bench_limit), out, environment_lines())


if __name__ == "__main__":
    sys.exit(main())
