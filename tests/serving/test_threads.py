"""Compute threads: their own torch thread count, and a CPU priority below the event loop's
(``serving/threads.py``). Per-thread nice values are Linux's."""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import pytest
import torch

from dgserve.serving.threads import compute_thread, lower_thread_priority

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice is Linux's")

T = TypeVar("T")


def nice_of_this_thread() -> int:
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


def in_thread(fn: Callable[[], T]) -> T:
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(fn).result()


def test_lowers_the_calling_thread_only_and_the_threads_it_starts_inherit_it() -> None:
    loop_nice = nice_of_this_thread()

    def lowered() -> tuple[int, int]:
        lower_thread_priority(4)
        return nice_of_this_thread(), in_thread(nice_of_this_thread)

    assert in_thread(lowered) == (min(19, loop_nice + 4), min(19, loop_nice + 4))
    assert nice_of_this_thread() == loop_nice


def test_zero_leaves_the_priority_alone_and_the_nicest_is_19() -> None:
    loop_nice = nice_of_this_thread()

    def twice() -> tuple[int, int]:
        lower_thread_priority(0)
        unchanged = nice_of_this_thread()
        lower_thread_priority(19)
        lower_thread_priority(19)
        return unchanged, nice_of_this_thread()

    assert in_thread(twice) == (loop_nice, 19)


def test_a_compute_thread_gets_its_torch_threads_and_its_priority() -> None:
    loop_nice = nice_of_this_thread()
    with ThreadPoolExecutor(1, initializer=compute_thread, initargs=(1, 3)) as pool:
        assert pool.submit(lambda: (torch.get_num_threads(), nice_of_this_thread())).result() == (
            1, min(19, loop_nice + 3),
        )  # fmt: skip
