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
