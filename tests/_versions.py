"""What the installed torch and transformers can do, for tests that depend on it (docs/versions.md)."""

from __future__ import annotations

import pytest
import torch
import transformers
from packaging.version import Version

TORCH = Version(torch.__version__).release
TRANSFORMERS_4 = Version(transformers.__version__).major < 5

#: FSDP2 (`fully_shard`) all-gathers through the device's stream API; torch 2.6's CPU stand-in for it
#: (`torch.cpu.Stream`) has no `record_event`, so FSDP2 cannot run on CPU processes there.
FSDP2_ON_CPU = hasattr(torch.cpu.Stream, "record_event")
FSDP2_ON_CPU_REASON = (
    f"torch {torch.__version__}: FSDP2 cannot all-gather on CPU ('torch.cpu.Stream' has no 'record_event'); "
    "the FSDP2 CPU tests run with the newest torch (requirements-dev.txt)"
)
needs_fsdp2_on_cpu = pytest.mark.skipif(not FSDP2_ON_CPU, reason=FSDP2_ON_CPU_REASON)
