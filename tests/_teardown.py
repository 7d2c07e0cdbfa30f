"""How a torchrun worker in these tests ends: tear the process group down, then leave without interpreter shutdown.

A gloo worker thread frees each finished collective's work object a moment after the caller's `wait()` returns.
When the process group outlives `destroy_process_group()` (FSDP2's mesh and DDP's reducer keep it), that free can
land in interpreter shutdown, where it needs the GIL for the tensors' Python objects and aborts the process
("terminate called without an active exception", exit -6) after all the work is written. `os._exit` skips that
shutdown; everything a worker reports is flushed and closed before it is called.
"""

from __future__ import annotations

import os
import sys
from typing import NoReturn

import torch.distributed as dist


def leave() -> NoReturn:
    """Barrier, destroy the process group, flush, and exit 0 without interpreter shutdown."""
    if dist.is_initialized():
        dist.barrier()  # nobody tears the connections down while another process still uses them
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
