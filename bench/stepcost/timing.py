"""Timing: interleaved turns between configurations (a baton), the clock, and paired ratios."""

from __future__ import annotations

import statistics
import threading
import time

import torch

__all__ = ["DEVICE", "PRIMARY", "Baton", "clock", "elapsed", "one_malloc_arena", "paired_ratio", "sync"]

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


class Baton:
    """Round-robin turns between threads: exactly one configuration runs at a time, one step per turn.

    Every configuration trains in its own thread; a thread runs one optimizer step when it holds the baton
    and hands it on at the end of the step, so all the configurations advance step by step, interleaved,
    and a slow period of a shared machine hits them all alike. The turn order is reshuffled every cycle.
    """

    def __init__(self, names: list[str], seed: int = 0) -> None:
        import random

        self._cond = threading.Condition()
        self._order = list(names)
        self._pos = 0
        self._done: set[str] = set()
        self._rng = random.Random(seed)

    def wait(self, name: str) -> None:
        with self._cond:
            self._cond.wait_for(lambda: self._order[self._pos] == name)

    def _advance(self) -> None:
        if len(self._done) == len(self._order):
            return
        while True:
            self._pos += 1
            if self._pos == len(self._order):
                self._pos = 0
                self._rng.shuffle(self._order)
            if self._order[self._pos] not in self._done:
                return

    def pass_on(self, name: str) -> None:
        with self._cond:
            if self._order[self._pos] == name:
                self._advance()
            self._cond.notify_all()

    def finish(self, name: str) -> None:
        with self._cond:
            self._done.add(name)
            if self._order[self._pos] == name:
                self._advance()
            self._cond.notify_all()


def sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


#: Which clock the ratios use: on CPU the thread's CPU time (``time.thread_time``: a shared machine's other
#: processes do not count, the work done in this thread does, and torch runs single-threaded here), on CUDA
#: wall time (kernels run asynchronously; every step ends with a synchronize).
PRIMARY = 1 if DEVICE.type == "cpu" else 0


def clock() -> tuple[float, float]:
    """(wall, this thread's CPU time) now."""
    return time.perf_counter(), time.thread_time()


def elapsed(start: tuple[float, float]) -> tuple[float, float]:
    """(wall, CPU) seconds since ``start``."""
    wall, cpu = clock()
    return wall - start[0], cpu - start[1]


def paired_ratio(a: list[float], b: list[float], group: int = 1, resamples: int = 2000) -> tuple[float, float, float]:
    """Median over cycles of ``sum(a) / sum(b)`` for the same cycle, with a 95% bootstrap interval.

    The configurations advance in lockstep (one step each per cycle), so pairing a's i-th step with b's
    i-th step cancels the machine's drift; ``group`` sums that many consecutive steps first (5 for
    ``sam_interval=5``: one whole interval).
    """
    import random

    ratios = [sum(a[i : i + group]) / sum(b[i : i + group]) for i in range(0, len(a) - group + 1, group)]
    rng = random.Random(0)
    boot = sorted(statistics.median(rng.choices(ratios, k=len(ratios))) for _ in range(resamples))
    return statistics.median(ratios), boot[int(0.025 * resamples)], boot[int(0.975 * resamples) - 1]


#: glibc's ``mallopt`` parameter for the most arenas (malloc.h's ``M_ARENA_MAX``).
M_ARENA_MAX = -8


def one_malloc_arena() -> bool:
    """Make every thread of this process allocate from one glibc arena, as a one-thread training script does.

    glibc gives each new thread its own malloc arena, and every configuration here trains in its own thread:
    the tensors of different configurations would then come from different arenas, whose page reuse differs.
    On the BERT bf16 loops that alone put the hand-written SSAM loop 3-5 % ahead of the same work through
    ``SSAMOptimizer`` (paired ratio 1.03-1.05; 1.00 with one arena, and 1.00 with both in one thread).
    Call it before the threads start. Returns False where it does not apply (not glibc).
    """
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_ARENA_MAX, 1))
