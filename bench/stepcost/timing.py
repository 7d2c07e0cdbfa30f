"""Timing: interleaved turns between configurations (a baton), the clock, and paired ratios."""

from __future__ import annotations

import statistics
import threading
import time
from typing import Any

import torch

__all__ = [
    "DEVICE",
    "PRIMARY",
    "Baton",
    "EventSpan",
    "clock",
    "elapsed",
    "one_malloc_arena",
    "paired_ratio",
    "sync",
    "use_events",
]

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


#: The event class timing a step on the device's stream (``torch.cuda.Event``) once `use_events` is called; None:
#: host clocks (the default, and all of the CPU benchmark).
_EVENT: Any = None


def use_events(event_cls: Any = None) -> None:
    """Time steps with device events from now on (``--device cuda``): `clock` records a start event, `elapsed`
    an end event and returns an `EventSpan`, `sync` no longer waits (the steps queue as in training).

    ``event_cls`` defaults to ``torch.cuda.Event``; anything with ``record()``, ``synchronize()`` and
    ``elapsed_time(end)`` in milliseconds works (the tests pass a host-clock stand-in on CPU).
    """
    global _EVENT
    _EVENT = event_cls if event_cls is not None else _cuda_event


def _cuda_event() -> Any:
    return torch.cuda.Event(enable_timing=True)


def use_host_clocks() -> None:
    """Back to the host clocks (the default)."""
    global _EVENT
    _EVENT = None


class EventSpan:
    """One step timed by two device events; reads as ``(wall, cpu)`` like `elapsed`'s tuple, both the span.

    The time is read only when an element is asked for (after the run: the end event is waited for then), so
    timing a step does not stall the host.
    """

    def __init__(self, start: Any, end: Any) -> None:
        self.start, self.end = start, end
        self._seconds: float | None = None

    @property
    def seconds(self) -> float:
        if self._seconds is None:
            self.end.synchronize()
            self._seconds = self.start.elapsed_time(self.end) / 1e3  # milliseconds on the device's stream
        return self._seconds

    def __getitem__(self, index: int) -> float:
        if index not in (0, 1, -1, -2):
            raise IndexError(index)
        return self.seconds

    def __len__(self) -> int:
        return 2

    def __iter__(self) -> Any:
        return iter((self.seconds, self.seconds))


def sync() -> None:
    if DEVICE.type == "cuda" and _EVENT is None:
        torch.cuda.synchronize()


#: Which clock the ratios use: on CPU the thread's CPU time (``time.thread_time``: a shared machine's other
#: processes do not count, the work done in this thread does, and torch runs single-threaded here), on CUDA
#: wall time (kernels run asynchronously; every step ends with a synchronize), or with `use_events` (``--device
#: cuda``) the time between two CUDA events on the stream (both elements of an `EventSpan`).
PRIMARY = 1 if DEVICE.type == "cpu" else 0


def clock() -> Any:
    """(wall, this thread's CPU time) now; with `use_events`, a start event recorded on the stream."""
    if _EVENT is not None:
        event = _EVENT()
        event.record()
        return event
    return time.perf_counter(), time.thread_time()


def elapsed(start: Any) -> Any:
    """(wall, CPU) seconds since ``start``; with `use_events`, an `EventSpan` from the start event to a new one."""
    if _EVENT is not None:
        end = _EVENT()
        end.record()
        return EventSpan(start, end)
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
