"""The documentation keeps its promises: every example runs, every argument is documented, the site builds.

* each ``docs/examples/*.py`` runs (in this process, from a temporary directory);
* every fenced ``python`` block of ``README.md`` and ``docs/*.md`` runs, unless it carries
  ``# doc: fragment`` (a deliberately partial snippet: it is only compiled), or it only includes
  example files with ``--8<--`` (those run above);
* the argument table of ``docs/trainer.md`` lists exactly the ``sam_*`` fields of ``SSAMTrainingArguments``,
  with their defaults;
* ``mkdocs build --strict`` passes (when mkdocs is installed).
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import os
import re
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
EXAMPLES = sorted((DOCS / "examples").glob("*.py"))
MARKDOWN = sorted(DOCS.glob("*.md")) + [p for p in [ROOT / "README.md"] if p.exists()]

#: Marks a python block of the docs that is deliberately not a complete program: compiled, not run.
FRAGMENT_MARKER = "# doc: fragment"
#: Example files that need several processes as well: also run under torchrun by a slow test.
DISTRIBUTED_EXAMPLES = ["train_ddp.py"]

_FENCE = re.compile(
    r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})[ \t]*(?P<info>[^\n]*)\n(?P<body>.*?)^(?P=indent)(?P=fence)[ \t]*$",
    re.M | re.S,
)
_SNIPPET = re.compile(r"^\s*-{1,}8<-{1,}\s+\"(?P<target>[^\"]+)\"\s*$")


def _python_blocks(path: Path) -> list[tuple[int, str]]:
    """(line number, code) of every fenced block whose language is python."""
    text = path.read_text(encoding="utf-8")
    blocks = []
    for match in _FENCE.finditer(text):
        language = match["info"].split()[0].lstrip(".{").rstrip("}") if match["info"].strip() else ""
        if language.lower() in {"python", "py", "python3"}:
            body = "\n".join(line[len(match["indent"]) :] for line in match["body"].splitlines())
            blocks.append((text.count("\n", 0, match.start()) + 1, body))
    return blocks


def _snippet_targets(code: str) -> list[str] | None:
    """The files a block includes with ``--8<--`` if that is all it does, else None."""
    lines = [line for line in code.splitlines() if line.strip()]
    matches = [_SNIPPET.match(line) for line in lines]
    if not lines or not all(matches):
        return None
    return [m["target"].split(":")[0] for m in matches]  # "file.py:section" includes a part of file.py


BLOCKS = [(path, line, code) for path in MARKDOWN for line, code in _python_blocks(path)]
INLINE_BLOCKS = [b for b in BLOCKS if _snippet_targets(b[2]) is None]


@pytest.fixture
def in_tmp_dir(tmp_path, monkeypatch):
    """Run with a clean working directory (examples write outputs/ there) and no pytest argv."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["example"])
    monkeypatch.setenv("MPLBACKEND", "Agg")
    return tmp_path


@pytest.mark.parametrize("example", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_runs(example: Path, in_tmp_dir, monkeypatch) -> None:
    monkeypatch.setattr(sys, "argv", [str(example)])
    runpy.run_path(str(example), run_name="__main__")
    if example.name == "arguments_cli.py":  # it writes its config.yaml into a temporary folder, not here
        assert not list(in_tmp_dir.glob("*.yaml")), "arguments_cli.py wrote a config into the working directory"


@pytest.mark.parametrize(
    "path,line,code", INLINE_BLOCKS, ids=[f"{p.relative_to(ROOT)}:{n}" for p, n, _ in INLINE_BLOCKS]
)
def test_markdown_python_block(path: Path, line: int, code: str, in_tmp_dir) -> None:
    compiled = compile(code, f"{path.relative_to(ROOT)}:{line}", "exec")
    if FRAGMENT_MARKER in code:
        return  # deliberately partial: it must be valid Python, nothing more
    exec(compiled, {"__name__": "__main__"})


def test_snippets_resolve_and_every_example_is_shown() -> None:
    included = set()
    for path, line, code in BLOCKS:
        for target in _snippet_targets(code) or []:
            assert (ROOT / target).is_file(), f"{path.relative_to(ROOT)}:{line} includes missing {target}"
            included.add((ROOT / target).resolve())
    shown_nowhere = [p.name for p in EXAMPLES if p.resolve() not in included]
    assert not shown_nowhere, f"examples included by no page: {shown_nowhere}"


def _documented_fields(page: Path) -> dict[str, str]:
    """``sam_*`` name -> default text from the rows ``| `sam_x` | `default` | ... |`` of the page's tables."""
    rows = re.findall(r"^\|\s*`(sam_\w+)`\s*\|\s*`([^`]*)`\s*\|", page.read_text(encoding="utf-8"), re.M)
    names = [name for name, _ in rows]
    assert len(names) == len(set(names)), f"a field is documented twice: {names}"
    return dict(rows)


def test_trainer_page_documents_every_sam_field() -> None:
    from hf_ssam import SSAMTrainingArguments

    documented = _documented_fields(DOCS / "trainer.md")
    fields = {f.name: f.default for f in dataclasses.fields(SSAMTrainingArguments) if f.name.startswith("sam_")}
    assert sorted(documented) == sorted(fields), "docs/trainer.md and SSAMTrainingArguments list different fields"
    for name, default in fields.items():
        assert ast.literal_eval(documented[name]) == default, f"{name}: documented {documented[name]}, is {default!r}"


@pytest.mark.skipif(importlib.util.find_spec("mkdocs") is None, reason="mkdocs is not installed")
def test_mkdocs_build_strict(tmp_path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("sync_ascent", ["false", "true"])
@pytest.mark.parametrize("example", DISTRIBUTED_EXAMPLES)
def test_example_under_torchrun(example: str, sync_ascent: str, tmp_path) -> None:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command += [str(DOCS / "examples" / example), "--sam_sync_ascent", sync_ascent]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "2 process(es)" in result.stdout
