"""The benchmark scripts run: each ``bench/`` script with ``--quick`` exits 0 and writes its CSV and PNG files.

The scripts start together (each in its own subprocess, single-threaded) when the first of these tests
runs, so the module costs about as long as the slowest script rather than the sum. Only the scripts of
the selected tests are started. Timings are never asserted: ``--quick`` numbers mean nothing.

Run: ``.venv/bin/python -m pytest -q tests/test_bench.py``
"""

from __future__ import annotations

import csv
import importlib.util
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: script (relative to the repository root, then any options besides --quick) -> files it must write into --out
SCRIPTS: dict[str, tuple[str, ...]] = {
    "bench/step_cost.py": ("step_cost.csv", "checks.csv", "memory.csv", "step_cost.png"),
    "bench/paper/saddle.py": ("saddle.csv", "saddle.png"),
    "bench/paper/autoencoder.py": ("autoencoder.csv", "autoencoder_escape.csv", "autoencoder.png"),
    "bench/paper/lr_stability.py": ("lr_stability.csv", "lr_stability.png"),
    "bench/paper/gamma_trace.py": ("gamma_trace.csv", "gamma_trace.png"),
    "bench/paper/noisy_quadratic.py": ("noisy_quadratic.csv", "noisy_quadratic_summary.csv", "noisy_quadratic.png"),
    "bench/paper/autoencoder.py --sweep": ("autoencoder_sweep.csv",),
    "bench/paper/stability.py": ("stability.csv", "stability.png"),
    "bench/paper/gamma_control.py": ("gamma_control.csv", "gamma_control.png"),
    "bench/paper/minima_sharpness.py": ("minima_sharpness.csv", "minima_sharpness.png"),
}
#: script -> the package module it needs (the test is skipped, saying so, while that module is absent)
REQUIRES: dict[str, str] = {"bench/paper/minima_sharpness.py": "hf_ssam.sharpness"}
#: every script prints verdict lines starting with one of these words
VERDICT_WORDS: dict[str, tuple[str, ...]] = {"bench/step_cost.py": ("PASS", "FAIL")}
TIMEOUT_S = 600
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class _Run:
    def __init__(self, script: str, out: Path) -> None:
        env = dict(
            os.environ,
            OMP_NUM_THREADS="1",
            MKL_NUM_THREADS="1",
            HF_HUB_OFFLINE="1",
            HF_DATASETS_OFFLINE="1",
            TRANSFORMERS_OFFLINE="1",
            MPLBACKEND="Agg",
        )
        self.out = out
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / script.split()[0]), *script.split()[1:], "--quick", "--out", str(out)],
            cwd=out.parent,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self._output: str | None = None

    def wait(self) -> tuple[int, str]:
        if self._output is None:
            try:
                self._output, _ = self.proc.communicate(timeout=TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self._output = self.proc.communicate()[0] + f"\n[killed after {TIMEOUT_S}s]"
        return self.proc.returncode, self._output


@pytest.fixture(scope="module")
def runs(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, _Run]]:
    """Start the selected scripts at once; each test then waits for its own."""
    selected = [
        item.callspec.params["script"]
        for item in request.session.items
        if item.module is request.module and hasattr(item, "callspec") and "script" in item.callspec.params
    ]
    started = {}
    for script in dict.fromkeys(selected):
        if _missing(script):
            continue
        out = tmp_path_factory.mktemp(Path(script.split()[0]).stem + "".join(script.split()[1:])) / "out"
        started[script] = _Run(script, out)
    yield started
    for run in started.values():
        if run.proc.poll() is None:
            run.proc.kill()
            run.proc.communicate()


def _missing(script: str) -> str | None:
    module = REQUIRES.get(script)
    return module if module is not None and importlib.util.find_spec(module) is None else None


@pytest.mark.parametrize("script", list(SCRIPTS))
def test_quick_run_writes_outputs(script: str, runs: dict[str, _Run]) -> None:
    if _missing(script):
        pytest.skip(f"{script} needs {_missing(script)}, which this checkout does not have")
    code, output = runs[script].wait()
    assert code == 0, f"{script} --quick exited with {code}:\n{output[-4000:]}"
    out = runs[script].out
    for name in SCRIPTS[script]:
        path = out / name
        assert path.is_file() and path.stat().st_size > 0, f"{script} did not write {name}:\n{output[-2000:]}"
        if name.endswith(".csv"):
            with path.open(newline="") as fh:
                rows = list(csv.reader(fh))
            assert len(rows) >= 2 and len(rows[0]) >= 2, f"{name} has no data rows"
        else:
            assert path.read_bytes()[:8] == PNG_MAGIC, f"{name} is not a PNG"
    words = VERDICT_WORDS.get(script, ("HOLDS", "DOES NOT HOLD"))
    verdicts = [line for line in output.splitlines() if line.startswith(words)]
    assert verdicts, f"{script} printed no verdict line ({' / '.join(words)}):\n{output[-2000:]}"


@pytest.mark.parametrize("script", ["bench/step_cost.py"])
def test_step_cost_compares_the_amp_loops_side_by_side(script: str, runs: dict[str, _Run]) -> None:
    """The plain-loop AMP configuration: SSAMOptimizer loop / plain loop and / hand-written loop, in one run."""
    code, output = runs[script].wait()
    assert code == 0, output[-4000:]
    summary = [line for line in output.splitlines() if "plain-loop AMP" in line]
    assert len(summary) == 1, output[-2000:]
    assert "SSAMOptimizer loop / plain loop = " in summary[0]
    assert "SSAMOptimizer loop / hand-written loop = " in summary[0]
    with (runs[script].out / "checks.csv").open(newline="") as fh:
        checks = {row["check"]: row for row in csv.DictReader(fh)}
    for check, target in (("amp:SSAMOptimizer / amp:plain", "<= 2.05"), ("amp:SSAMOptimizer / amp:ssam", "<= 1.03")):
        assert checks[check]["target"] == target and checks[check]["status"] in ("PASS", "FAIL")
        assert float(checks[check]["value"]) > 0
    with (runs[script].out / "step_cost.csv").open(newline="") as fh:
        timed = {row["config"] for row in csv.DictReader(fh)}
    assert {"amp:plain", "amp:ssam", "amp:SSAMOptimizer", "loop:SSAMOptimizer", "trainer:ssam"} <= timed


# ------------------------------------------------------------------------- the GPU side, exercised on CPU
#
# `step_cost.py --device cuda` times steps with CUDA events and `make gpu-check` turns the parts' outputs into a
# verdict table. Without a GPU, the same code runs here with a host-clock stand-in for `torch.cuda.Event` and
# with stand-in commands for the parts.


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


NO_CUDA_HERE = pytest.mark.skipif(_has_cuda(), reason="checks the behaviour without CUDA; this machine has CUDA")


@pytest.fixture
def bench_modules(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    yield
    from stepcost import timing

    timing.use_host_clocks()


class _FakeClock:
    """A deterministic clock: each reading is 7 ms after the previous one."""

    def __init__(self) -> None:
        self.now = 0.0

    def read(self) -> float:
        self.now += 7.0
        return self.now


class _StandInEvent:
    """`torch.cuda.Event(enable_timing=True)` on the host: record() reads a clock, elapsed_time in milliseconds."""

    clock = _FakeClock()
    synchronized = 0

    def __init__(self) -> None:
        self.at: float | None = None

    def record(self) -> None:
        self.at = self.clock.read()

    def synchronize(self) -> None:
        type(self).synchronized += 1

    def elapsed_time(self, end: _StandInEvent) -> float:
        assert self.at is not None and end.at is not None, "elapsed_time of an event never recorded"
        return end.at - self.at


def test_event_timing_reads_the_span_lazily(bench_modules) -> None:
    from stepcost import timing

    timing.use_events(_StandInEvent)
    _StandInEvent.synchronized = 0
    start = timing.clock()
    timing.sync()  # no wait with events: the steps queue as in training
    span = timing.elapsed(start)
    assert isinstance(span, timing.EventSpan) and _StandInEvent.synchronized == 0  # nothing read yet
    assert span[timing.PRIMARY] == span[0] == pytest.approx(0.007)  # one clock tick of the stand-in, in seconds
    assert tuple(span) == (span[0], span[1]) and _StandInEvent.synchronized == 1  # read once, then kept
    timing.use_host_clocks()
    assert isinstance(timing.elapsed(timing.clock()), tuple)


def test_cuda_mode_timing_and_checks_run_on_cpu_with_stand_in_events(bench_modules) -> None:
    """The --device cuda path of step_cost.py (its five configurations interleaved, paired ratios, the checks)
    on the tiny models, with the host-clock stand-in events."""
    import step_cost
    from stepcost import cuda, timing

    timing.use_events(_StandInEvent)
    rows, extra = step_cost.time_model("bert", True, 5, 5, cuda.CUDA_CONFIGS, bookkeeping=False)
    assert [r["config"] for r in rows] == list(cuda.CUDA_CONFIGS)
    assert all(len(extra["times"][c]) == 5 for c in cuda.CUDA_CONFIGS)
    memory = [
        {"config": "trainer:plain", "peak_bytes": 10_000, "param_bytes": 1000},
        {"config": "trainer:ssam", "peak_bytes": 11_050, "param_bytes": 1000},
    ]
    checks = cuda.cuda_checks("bert", extra["times"], memory)
    names = [c["check"] for c in checks]
    assert names == [
        "trainer:ssam / trainer:plain",
        "trainer:ssam / trainer:sam",
        "trainer:ssam / loop:ssam",
        "trainer:ssam@5 / trainer:plain",
        "extra peak memory trainer:ssam vs trainer:plain (x param bytes)",
    ]
    assert all(c["status"] in ("PASS", "FAIL") and c["target"].startswith("<= ") for c in checks)
    assert checks[-1]["value"] == pytest.approx(1.05) and checks[-1]["status"] == "PASS"


def test_cuda_checks_pair_the_steps_and_apply_each_models_targets(bench_modules) -> None:
    from stepcost import cuda

    plain = [1.0, 2.0, 1.0, 2.0, 1.0]
    times = {
        "trainer:plain": plain,
        "trainer:sam": [1.9 * t for t in plain],
        "trainer:ssam": [2.0 * t for t in plain],  # 2.0x, paired: the drift of the machine cancels
        "trainer:ssam@5": [1.2 * t for t in plain],
        "loop:ssam": [1.9 * t for t in plain],
    }
    by_model = {m: {c["check"]: c for c in cuda.cuda_checks(m, times, None)} for m in ("vit_s16", "bert")}
    compute, launch = by_model["vit_s16"], by_model["bert"]
    assert compute["trainer:ssam / trainer:plain"]["value"] == pytest.approx(2.0)
    assert compute["trainer:ssam / trainer:plain"]["status"] == "PASS"
    assert compute["trainer:ssam / trainer:sam"]["status"] == "FAIL"  # 1.053 > 1.02
    assert compute["trainer:ssam / loop:ssam"]["status"] == "FAIL"  # 1.053 > 1.05
    assert launch["trainer:ssam / loop:ssam"]["status"] == "PASS"  # the launch-bound target is looser
    assert compute["trainer:ssam@5 / trainer:plain"]["value"] == pytest.approx(1.2)


@NO_CUDA_HERE
def test_step_cost_device_cuda_without_cuda_says_so_and_fails() -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "step_cost.py"), "--device", "cuda"],
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    assert proc.returncode == 2
    assert "no CUDA device" in proc.stderr and "nothing measured" in proc.stderr


@NO_CUDA_HERE
def test_gpu_check_without_cuda_prints_one_line_and_exits_0(tmp_path: Path) -> None:
    out = tmp_path / "gpu-check"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        "gpu-check: no CUDA device here (torch.cuda.is_available() is False): nothing run, exit 0."
    ]
    assert not out.exists()  # nothing run, nothing written


JUNIT = """<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest" tests="4">
<testcase classname="tests.test_cuda" name="test_fp16_trainer_with_the_cuda_grad_scaler" time="1.0">
  <properties><property name="figure" value="max |fp16 - fp32| = 1.0e-04"/></properties></testcase>
<testcase classname="tests.test_cuda" name="test_no_host_sync_in_an_ssam_optimizer_step[cuda-closure]" time="0.1">
  <properties><property name="figure" value="0 syncs in a step"/></properties></testcase>
<testcase classname="tests.test_cuda" name="test_bf16_trainer_on_cuda" time="0.1">
  <failure message="AssertionError: (0.5, 1.0)&#10;more">trace</failure></testcase>
<testcase classname="tests.test_cuda" name="test_torch_compile_on_cuda" time="0.0">
  <skipped type="pytest.skip" message="needs a CUDA GPU">skip</skipped></testcase>
</testsuite></testsuites>
"""

CHECKS_CSV = """model,check,value,ci95,target,status,note
vit_s16,trainer:ssam / trainer:plain,2.01,"[1.990, 2.030]",<= 2.05,PASS,two passes
vit_s16,extra peak memory trainer:ssam vs trainer:plain (x param bytes),1.2,,<= 1.1,FAIL,
"""


def test_gpu_check_parses_the_parts_and_writes_the_table(bench_modules, tmp_path: Path) -> None:
    import gpu_check

    (tmp_path / "cuda-tests.xml").write_text(JUNIT)
    (tmp_path / "step_cost").mkdir()
    (tmp_path / "step_cost" / "checks.csv").write_text(CHECKS_CSV)
    tests = gpu_check.parse_junit(tmp_path / "cuda-tests.xml")
    assert [(r.part, r.status) for r in tests] == [
        ("1. CUDA tests", "PASS"),
        ("2. no host sync", "PASS"),
        ("1. CUDA tests", "FAIL"),
        ("1. CUDA tests", "SKIP"),
    ]
    assert tests[0].figure == "max /fp16 - fp32/ = 1.0e-04"  # no '|' inside a markdown cell
    assert tests[2].figure == "AssertionError: (0.5, 1.0)"
    bench = gpu_check.parse_checks(tmp_path / "step_cost" / "checks.csv")
    assert [r.status for r in bench] == ["PASS", "FAIL"]
    assert bench[0].figure == "2.010 [1.990, 2.030] (target <= 2.05)"
    assert bench[0].check == "[vit_s16] trainer:ssam / trainer:plain"


def _part(gpu_check, name: str, code: str, limit_s: int, parse) -> object:
    return gpu_check.Part(name, [sys.executable, "-c", code], limit_s, parse, f"{name}.log")


def test_gpu_check_runs_the_parts_in_order_under_their_limits(bench_modules, tmp_path: Path) -> None:
    """Stand-in commands for the parts: one writes passing results, one runs past its limit."""
    import gpu_check

    out = tmp_path / "gpu-check"
    junit = JUNIT.split("<testcase")[0] + "<testcase" + JUNIT.split("<testcase")[1] + "</testsuite></testsuites>"
    write = f"import pathlib; pathlib.Path({str(out / 'cuda-tests.xml')!r}).write_text({junit!r})"
    passing = _part(gpu_check, "tests", write, 60, lambda o: gpu_check.parse_junit(o / "cuda-tests.xml"))
    assert gpu_check.run([passing], out, ["device: stand-in"]) == 0
    report = (out / "gpu-check.md").read_text()
    assert "| part | check | result | figure |" in report and "- device: stand-in" in report
    assert "| 1. CUDA tests | test_fp16_trainer_with_the_cuda_grad_scaler | PASS |" in report
    assert "**PASS: every check passed**" in report

    stuck = _part(gpu_check, "bench", "import time; time.sleep(60)", 1, lambda o: [])
    passing = _part(gpu_check, "tests", write, 60, lambda o: gpu_check.parse_junit(o / "cuda-tests.xml"))
    assert gpu_check.run([passing, stuck], out, []) == 1
    assert stuck.code == 124 and passing.code == 0  # `timeout` ended the stuck part; the first ran before it
    assert gpu_check.failures([passing, stuck]) == ["bench: past its limit of 1 s", "bench: no results"]
    assert "**FAIL: 2 failure(s)**" in (out / "gpu-check.md").read_text()


# ------------------------------------------------------------------------- the cost frontier

#: bench/frontier.py's schedules, in table order, with the passes per optimizer step each must make over the quick
#: run's 20 steps (two on a SAM step, one on a plain or reuse step).
FRONTIER_PASSES = {
    "none": 1.0,
    "ssam": 2.0,
    "ssam@2": 1.5,
    "ssam@5": 1.2,
    "ssam@2 ρ↑": 1.5,
    "ssam@5 ρ↑": 1.2,
    "ssam@5+reuse": 1.2,
    "start 0.5": 1.5,
    "start 0.75": 1.25,
    "start 0.5 @2+reuse": 1.25,
}


def test_frontier_quick_writes_the_table_the_verdict_and_counts_the_passes(tmp_path: Path) -> None:
    """``bench/frontier.py --quick``: one table row per schedule, a verdict line per sparse schedule and the overall
    VERDICT, the plot, and forward and backward passes counted on the model equal to what the schedule implies."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", MPLBACKEND="Agg")
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "frontier.py"), "--quick", "--out", str(out)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=TIMEOUT_S,
    )  # fmt: skip
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    assert (out / "frontier.png").read_bytes()[:8] == PNG_MAGIC

    report = (out / "frontier.md").read_text(encoding="utf-8").splitlines()
    header = next(line for line in report if line.startswith("| task | schedule |"))
    rows = [line for line in report if line.startswith("| mlp |")]
    assert [row.split("|")[2].strip().strip("`") for row in rows] == list(FRONTIER_PASSES)
    assert all(row.count("|") == header.count("|") for row in rows)
    for row in rows:
        cells = [cell.strip() for cell in row.split("|")[1:-1]]
        name, passes = cells[1].strip("`"), cells[9]
        want = f"{FRONTIER_PASSES[name]:.3g}"
        assert passes == f"{want} / {want} ({want})", row  # forwards / backwards (expected)

    sparse = [name for name in FRONTIER_PASSES if name not in ("none", "ssam")]
    verdicts = [line for line in output.splitlines() if line.startswith(("HOLDS: [mlp]", "DOES NOT HOLD: [mlp]"))]
    assert [next(n for n in sorted(sparse, key=len, reverse=True) if f"] {n} keeps" in line) for line in verdicts] == (
        sparse
    )
    final = [line for line in output.splitlines() if line.startswith("VERDICT: ")]
    assert len(final) == 1 and "at <= 1.3x cost on every task (mlp): " in final[0], output[-2000:]

    with (out / "frontier_runs.csv").open(newline="") as fh:
        runs = list(csv.DictReader(fh))
    assert {(run["schedule"], run["seed"]) for run in runs} == {(n, s) for n in FRONTIER_PASSES for s in ("0", "1")}
    for run in runs:
        want = FRONTIER_PASSES[run["schedule"]]
        for key in ("forwards_per_step", "backwards_per_step", "expected_passes"):
            assert float(run[key]) == pytest.approx(want), (run["schedule"], key, run[key])
        if "ρ↑" in run["schedule"]:  # rho scaled up with the interval
            assert float(run["rho"]) > 0.05, run
