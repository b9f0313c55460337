"""Answers that wait for their records' commit share transactions (group commit), on every backend."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Mapping, Sequence

import pytest

from dgserve.inspection import InspectionBackend, InspectionRecord, InspectionStore
from dgserve.inspection.backend import StoredRecord

pytestmark = pytest.mark.asyncio

ANSWERS = 64


def _record(n: int) -> InspectionRecord:
    return InspectionRecord.new(model="m", version=1, task="classification",
                                prediction={"n": n}, connectivity={"stages": []})  # fmt: skip


async def test_concurrent_commits_share_transactions(
    make_backend: Callable[[], InspectionBackend], started: Callable[..., object]
) -> None:
    backend = make_backend()
    transactions: list[int] = []
    write, write_now = backend.write_batch, backend.write_batch_now

    def counted(records: Sequence[StoredRecord], graphs: Mapping[str, str]) -> None:
        transactions.append(len(records))
        write(records, graphs)

    def counted_now(records: Sequence[StoredRecord], graphs: Mapping[str, str]) -> bool:
        wrote = write_now(records, graphs)
        if wrote:
            transactions.append(len(records))
        return wrote

    backend.write_batch = counted  # type: ignore[method-assign]
    backend.write_batch_now = counted_now  # type: ignore[method-assign]
    store: InspectionStore = await started(InspectionStore(backend))  # type: ignore[misc]

    async def answer(n: int) -> bool:
        # What ServingService does for each answer: queue the record, wait for its commit.
        assert await store.put(_record(n))
        return await store.commit(timeout_s=30)

    assert all(await asyncio.gather(*(answer(n) for n in range(ANSWERS))))
    assert sum(transactions) == ANSWERS
    print(f"{ANSWERS} waiting answers committed in {len(transactions)} transactions: {transactions}")
    assert len(transactions) < ANSWERS / 4


async def test_a_commit_that_outlasts_its_timeout_answers_false_and_the_record_still_lands(
    make_backend: Callable[[], InspectionBackend], started: Callable[..., object]
) -> None:
    backend = make_backend()
    release = threading.Event()
    write = backend.write_batch

    def slow(records: Sequence[StoredRecord], graphs: Mapping[str, str]) -> None:
        release.wait(timeout=30)  # storage that is slow, not failing
        write(records, graphs)

    backend.write_batch = slow  # type: ignore[method-assign]
    backend.write_batch_now = lambda records, graphs: False  # type: ignore[method-assign]
    store: InspectionStore = await started(InspectionStore(backend))  # type: ignore[misc]
    record = _record(1)
    assert await store.put(record)
    loop = asyncio.get_running_loop()
    began = loop.time()
    assert not await store.commit(timeout_s=0.2)
    assert 0.15 <= loop.time() - began < 5
    release.set()
    await store.flush()
    assert (await store.get(record.id)).prediction == {"n": 1}
    assert await store.commit(timeout_s=30)  # nothing left to wait for


async def test_a_batch_an_answer_waits_on_is_offered_to_the_backend_on_the_loop(
    make_backend: Callable[[], InspectionBackend], started: Callable[..., object]
) -> None:
    backend = make_backend()
    loop_thread = threading.get_ident()
    calls: list[tuple[str, int, bool]] = []  # (method, records, on the loop's thread)
    write, write_now = backend.write_batch, backend.write_batch_now
    refuse = True

    def thread_write(records: Sequence[StoredRecord], graphs: Mapping[str, str]) -> None:
        calls.append(("write_batch", len(records), threading.get_ident() == loop_thread))
        write(records, graphs)

    def now(records: Sequence[StoredRecord], graphs: Mapping[str, str]) -> bool:
        calls.append(("write_batch_now", len(records), threading.get_ident() == loop_thread))
        return not refuse and write_now(records, graphs)

    backend.write_batch = thread_write  # type: ignore[method-assign]
    backend.write_batch_now = now  # type: ignore[method-assign]
    store: InspectionStore = await started(InspectionStore(backend, flush_interval_s=0.2))  # type: ignore[misc]

    # Written behind, once its flush interval is up (nobody waits): the worker thread only.
    assert await store.put(_record(1))
    while store.pending:
        await asyncio.sleep(0.01)
    assert calls == [("write_batch", 1, False)]

    # Waited on, and the backend says it would wait: offered on the loop, then the thread.
    calls.clear()
    assert await store.put(_record(2))
    assert await store.commit(timeout_s=30)
    assert calls == [("write_batch_now", 1, True), ("write_batch", 1, False)]

    # Waited on, and taken: written on the loop, whatever the backend does with the offer.
    calls.clear()
    refuse = False
    assert await store.put(_record(3))
    assert await store.commit(timeout_s=30)
    assert calls[0] == ("write_batch_now", 1, True)
    assert await asyncio.to_thread(backend.count) == 3


async def test_a_failed_write_on_the_loop_is_retried_in_the_thread(
    make_backend: Callable[[], InspectionBackend], started: Callable[..., object]
) -> None:
    backend = make_backend()
    failures = 0

    def broken(records: Sequence[StoredRecord], graphs: Mapping[str, str]) -> bool:
        nonlocal failures
        failures += 1
        raise OSError("disk I/O error")

    backend.write_batch_now = broken  # type: ignore[method-assign]
    store: InspectionStore = await started(InspectionStore(backend))  # type: ignore[misc]
    record = _record(1)
    assert await store.put(record)
    assert await store.commit(timeout_s=30)  # the retry, in the worker thread, committed it
    assert failures == 1
    assert (await store.get(record.id)).prediction == {"n": 1}
    assert await asyncio.to_thread(backend.count) == 1


async def test_write_batch_now_writes_every_record_or_none(make_backend: Callable[[], InspectionBackend]) -> None:
    backend = make_backend()
    await asyncio.to_thread(backend.open)
    try:
        rows = [StoredRecord(f"r{i}", "m", 1, "t", 1_000 + i, '{"i":%d}' % i, "{}") for i in range(3)]
        wrote = backend.write_batch_now(rows, {})
        assert await asyncio.to_thread(backend.count) == (3 if wrote else 0)
        if wrote:
            assert await asyncio.to_thread(backend.get, "r1") == rows[1]
    finally:
        await asyncio.to_thread(backend.close)


async def test_commits_waiting_when_the_writer_dies_fail_at_once(
    make_backend: Callable[[], InspectionBackend], started: Callable[..., object]
) -> None:
    """Never left hanging: a waiting answer learns of a dead writer, not at its timeout."""
    backend = make_backend()
    release, finished = threading.Event(), threading.Event()
    write = backend.write_batch

    def stuck(records: Sequence[StoredRecord], graphs: Mapping[str, str]) -> None:
        try:
            release.wait(timeout=30)
            write(records, graphs)
        finally:
            finished.set()

    backend.write_batch = stuck  # type: ignore[method-assign]
    backend.write_batch_now = lambda records, graphs: False  # type: ignore[method-assign]
    store: InspectionStore = await started(InspectionStore(backend))  # type: ignore[misc]
    try:
        assert await store.put(_record(1))
        waiting = [asyncio.ensure_future(store.commit(timeout_s=30)) for _ in range(3)]
        await asyncio.sleep(0.1)
        assert not any(w.done() for w in waiting)
        store._queue._task.cancel()  # type: ignore[union-attr]  # the writer dies mid-write
        outcomes = await asyncio.wait_for(asyncio.gather(*waiting, return_exceptions=True), 5)
        assert all(isinstance(o, RuntimeError) and "has stopped" in str(o) for o in outcomes), outcomes
    finally:
        release.set()
        await asyncio.to_thread(finished.wait, 10)  # the thread's write ends before the backend closes


async def _held_writes(
    backend: InspectionBackend, release: threading.Event, started: Callable[..., object]
) -> InspectionStore:
    """A started store whose writes wait for ``release``: storage that hangs without failing."""
    write = backend.write_batch

    def held(records: Sequence[StoredRecord], graphs: Mapping[str, str]) -> None:
        release.wait(timeout=30)
        write(records, graphs)

    backend.write_batch = held  # type: ignore[method-assign]
    backend.write_batch_now = lambda records, graphs: False  # type: ignore[method-assign]
    return await started(InspectionStore(backend))  # type: ignore[misc, no-any-return]


async def test_a_cancelled_commit_leaves_the_others_to_commit(
    make_backend: Callable[[], InspectionBackend], started: Callable[..., object]
) -> None:
    backend, release = make_backend(), threading.Event()
    store = await _held_writes(backend, release, started)
    try:
        assert await store.put(_record(1))
        gone = asyncio.ensure_future(store.commit(timeout_s=30))  # a client that leaves
        await asyncio.sleep(0.05)  # its waiter needs record 1, whose write has started
        assert await store.put(_record(2))
        staying = asyncio.ensure_future(store.commit(timeout_s=30))  # needs record 2: the next write
        await asyncio.sleep(0.05)
        gone.cancel()
        await asyncio.sleep(0)
        assert gone.cancelled() and not staying.done()
    finally:
        release.set()
    assert await asyncio.wait_for(staying, 10)
    assert not store._queue._committers  # nothing left behind


async def test_commits_given_up_on_while_a_write_hangs_do_not_pile_up(
    make_backend: Callable[[], InspectionBackend], started: Callable[..., object]
) -> None:
    backend, release = make_backend(), threading.Event()
    store = await _held_writes(backend, release, started)
    try:
        for n in range(40):  # each answer times out against a write that neither ends nor fails
            assert await store.put(_record(n))
            assert not await store.commit(timeout_s=0.01)
        assert len(store._queue._committers) <= 2, len(store._queue._committers)
    finally:
        release.set()
    await store.flush()
    assert await asyncio.to_thread(backend.count) == 40
