import os
import sys

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, os.path.dirname(__file__))  # tests/_reference.py

import torch  # noqa: E402

torch.set_num_threads(1)

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _no_exit_from_the_test_process(monkeypatch):
    """`os._exit` inside a test would end pytest with exit code 0 and no report: make it a failure instead.

    The torchrun workers and the distributed examples leave with `os._exit` (see tests/_teardown.py); run in
    this process, they must not.
    """

    def refuse(code: int) -> None:
        raise AssertionError(f"os._exit({code}) called inside the test process")

    monkeypatch.setattr(os, "_exit", refuse)


@pytest.fixture(autouse=True)
def _restore_environment():
    """Put `os.environ` back as it was after every test.

    `TrainingArguments(fsdp=...)` under transformers 4.x writes `ACCELERATE_USE_FSDP` and `FSDP_*` into
    `os.environ` (as do `deepspeed=`, `torch_compile` and mixed precision settings), and Accelerate reads them at
    every later `Trainer`: without this, one FSDP test would turn every later Trainer in the process into an
    FSDP run.
    """
    saved = dict(os.environ)
    yield
    if dict(os.environ) != saved:
        for key in set(os.environ) - set(saved):
            del os.environ[key]
        os.environ.update(saved)
