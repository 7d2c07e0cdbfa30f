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
