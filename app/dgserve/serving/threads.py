"""Per-thread settings of the threads that compute: torch's intra-op thread count, and CPU priority.

**torch's thread count.** With the OpenMP backend the count is a per-thread setting, but
ATen initialises a thread lazily: the first parallel op, or ``get_num_threads()``, a
thread runs sets it to the last value *any* thread passed to ``torch.set_num_threads``,
overwriting what the thread had set for itself before. So a thread that wants its own
count must trigger that initialisation first and only then set the count. Threads
created later still start from the process-wide value, which is the last count set
anywhere.

**Priority** (``DGSERVE_COMPUTE_NICE``). The event loop reads requests, refuses what
cannot be queued, and writes answers; the decode and model threads compute. When both
want a core, a request waiting for the loop waits on everything else: on a small host
the loop's turn came after a model thread's time slice, and that wait was latency
for every request and, with clients that wait for their answers, throughput. A compute
thread made nicer than the loop yields the core to it when the loop wakes, and has the
core whenever the loop has nothing to do. On Linux, nice is a per-thread value, and the
threads a thread starts (OpenMP's team) inherit it. Elsewhere this does nothing.
"""

from __future__ import annotations

import logging
import os
import sys
import threading

import torch

__all__ = ["compute_thread", "lower_thread_priority", "pin_torch_threads"]

log = logging.getLogger(__name__)

_NICEST = 19


def pin_torch_threads(threads: int) -> None:
    """Give the calling thread ``threads`` torch intra-op threads, for good (an executor initializer)."""
    torch.get_num_threads()  # ATen's lazy per-thread initialisation, which would overwrite the count
    torch.set_num_threads(threads)


def lower_thread_priority(increment: int) -> None:
    """Make the calling thread ``increment`` nicer than it is now (Linux; elsewhere nothing)."""
    if increment <= 0 or not sys.platform.startswith("linux"):
        return
    tid = threading.get_native_id()
    try:
        # Linux applies PRIO_PROCESS with a thread id to that thread alone.
        os.setpriority(os.PRIO_PROCESS, tid, min(_NICEST, os.getpriority(os.PRIO_PROCESS, tid) + increment))
    except OSError as exc:  # a sandbox that forbids it: the thread keeps the loop's priority
        log.warning("could not lower a compute thread's priority: %s", exc)


def compute_thread(threads: int, nice: int) -> None:
    """An executor's initializer for its threads that compute: their torch threads and their priority."""
    pin_torch_threads(threads)
    lower_thread_priority(nice)
