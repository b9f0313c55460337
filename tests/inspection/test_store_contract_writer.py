"""What every ``InspectionStore``'s writer keeps, whichever backend it writes to: put
never waits for storage, a full queue makes put wait and loses nothing (or, set to
drop, drops new records at once, counting and logging them), failed writes are
retried, and close gives up on a broken backend after a few tries, saying how many
records it lost.

``open_store`` (conftest) runs each test once per backend in ``BACKENDS``. Where a test
must catch the writer mid-write, ``intercept_writes`` blocks or fails the backend's
write in its worker thread, so no test depends on how fast storage is.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from datetime import UTC, datetime, timedelta

import pytest

from dgserve.inspection import InspectionBackend, InspectionRecord, InspectionStore
from dgserve.inspection.backend import StoredRecord
from dgserve.inspection.pending import CLOSE_ATTEMPTS, DropReason

pytestmark = pytest.mark.timeout(10)

# What the conftest's open_store gives: starts a store (on a given backend, or a new one).
StoreFactory = Callable[..., Awaitable[InspectionStore]]
BackendFactory = Callable[[], InspectionBackend]

T0 = datetime(2025, 1, 1, 12, 0, tzinfo=UTC)
NEVER = 3600.0  # a flush interval no test waits out: records stay queued until flushed


def record(i: int = 0, *, model: str = "m") -> InspectionRecord:
    """A small record, created ``i`` microseconds after T0."""
    return InspectionRecord.new(
        model=model, version=1, task="t", prediction={"i": i}, connectivity={}, created_at=T0 + timedelta(microseconds=i)
    )


async def stored(store: InspectionStore) -> int:
    """Records the backend holds: written, not merely queued."""
    return await asyncio.to_thread(store.backend.count)


async def collect(it: AsyncIterator[InspectionRecord]) -> list[InspectionRecord]:
    return [r async for r in it]


def intercept_writes(backend: InspectionBackend, before: Callable[[], None]) -> None:
    """Runs ``before()`` in the writer's thread ahead of every batch; if it raises, the
    batch fails. Call before the store is built: the store takes the method then."""
    real = backend.write_batch

    def write_batch(records: Sequence[StoredRecord], graphs: Mapping[str, str]) -> None:
        before()
        real(records, graphs)

    backend.write_batch = write_batch  # type: ignore[method-assign]
    # Every batch then goes through the intercepted thread: none is written on the loop.
    backend.write_batch_now = lambda records, graphs: False  # type: ignore[method-assign]


class Gate:
    """Blocks every batch write of ``backend`` in its worker thread until opened."""

    def __init__(self, backend: InspectionBackend) -> None:
        self.open = threading.Event()
        self.entered = threading.Event()
        intercept_writes(backend, self._wait)

    def _wait(self) -> None:
        self.entered.set()
        if not self.open.wait(timeout=10):
            raise TimeoutError("gate never opened")


class Failing:
    """Fails the first ``times`` batch writes of ``backend`` as a broken disk would."""

    def __init__(self, backend: InspectionBackend, times: int) -> None:
        self.times = times
        self.failures = 0
        intercept_writes(backend, self._fail)

    def _fail(self) -> None:
        if self.failures < self.times:
            self.failures += 1
            raise OSError("disk I/O error")


class Observer:
    """What the queue reports, as the metrics would count it."""

    def __init__(self) -> None:
        self.dropped: Counter[str] = Counter()
        self.write_failures = 0

    def inspection_records_dropped(self, count: int, reason: DropReason) -> None:
        self.dropped[reason] += count

    def inspection_write_failed(self) -> None:
        self.write_failures += 1


# --- put -------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_put_does_not_wait_for_storage(open_store: StoreFactory, make_backend: BackendFactory) -> None:
    backend = make_backend()
    gate = Gate(backend)
    store = await open_store(backend, batch_size=256, flush_interval_s=0.0)
    records = [record(i) for i in range(1000)]
    try:
        started = time.perf_counter()
        for rec in records:
            await store.put(rec)
        put_s = time.perf_counter() - started
        # The first batch's write is stuck in its thread: every put returned regardless.
        assert await asyncio.to_thread(gate.entered.wait, 5)
        assert store.pending == 1000
        assert await store.get(records[-1].id) == records[-1]
        assert put_s < 1.0, f"1000 puts took {put_s:.3f}s"
    finally:
        gate.open.set()
    await store.flush()
    assert await stored(store) == 1000


@pytest.mark.asyncio
@pytest.mark.parametrize("limit", [{"max_pending": 8}, {"max_pending_bytes": 1}], ids=["records", "bytes"])
async def test_a_full_queue_makes_put_wait_and_loses_nothing(
    open_store: StoreFactory, make_backend: BackendFactory, limit: dict[str, int]
) -> None:
    # By bytes, one record fills the queue: a record over the limit still goes into an
    # empty queue, and the next one waits.
    queued = 8 if "max_pending" in limit else 1
    backend = make_backend()
    gate = Gate(backend)
    store = await open_store(backend, batch_size=4, flush_interval_s=0.0, **limit)
    try:
        for i in range(queued):
            await store.put(record(i))
        blocked = asyncio.create_task(store.put(record(queued)))
        await asyncio.sleep(0.05)
        assert not blocked.done()
        assert store.pending == queued
    finally:
        gate.open.set()
    await asyncio.wait_for(blocked, 5)
    await store.flush()
    assert await store.count() == queued + 1
    assert await stored(store) == queued + 1


@pytest.mark.asyncio
async def test_a_full_queue_set_to_drop_refuses_new_records_at_once_and_counts_them(
    open_store: StoreFactory, make_backend: BackendFactory, caplog: pytest.LogCaptureFixture
) -> None:
    backend = make_backend()
    with pytest.raises(ValueError, match="when_full"):
        InspectionStore(backend, when_full="never")  # type: ignore[arg-type]
    gate = Gate(backend)
    observer = Observer()
    store = await open_store(
        backend, batch_size=4, flush_interval_s=0.0, max_pending=2, when_full="drop", observer=observer
    )
    records = [record(i) for i in range(5)]
    try:
        with caplog.at_level(logging.WARNING, logger="dgserve.inspection"):
            queued = [await asyncio.wait_for(store.put(rec), 1) for rec in records]
        assert queued == [True, True, False, False, False]
        assert observer.dropped == {"queue_full": 3} and store.pending == 2
        assert f"dropping new records until it has room, starting with {records[2].id}" in caplog.text
    finally:
        gate.open.set()
    await store.flush()
    with caplog.at_level(logging.WARNING, logger="dgserve.inspection"):
        assert await store.put(record(5))
    assert f"has room again: 3 records were dropped while it was full, the first {records[2].id}" in caplog.text
    await store.flush()
    assert await stored(store) == 3


@pytest.mark.asyncio
async def test_concurrent_puts_all_land(open_store: StoreFactory) -> None:
    store = await open_store(batch_size=16, max_pending=64, flush_interval_s=0.001)
    expected: set[str] = set()

    async def producer(n: int) -> None:
        for i in range(25):
            rec = record(n * 100 + i, model=f"m{n % 3}")
            expected.add(rec.id)
            await store.put(rec)
            if i % 5 == 0:
                await asyncio.sleep(0)

    await asyncio.gather(*(producer(n) for n in range(40)))
    await store.flush()
    assert await store.count() == 1000
    assert await stored(store) == 1000
    listed = await collect(store.list(limit=2000, include_connectivity=False))
    assert {r.id for r in listed} == expected


# --- failures ----------------------------------------------------------------------


@pytest.mark.asyncio
async def test_a_failed_write_is_retried_and_the_records_stay_readable(
    open_store: StoreFactory, make_backend: BackendFactory
) -> None:
    backend = make_backend()
    failing = Failing(backend, times=2)
    observer = Observer()
    store = await open_store(backend, flush_interval_s=0.0, observer=observer)
    rec = record()
    await store.put(rec)
    assert await store.get(rec.id) == rec
    await asyncio.wait_for(store.flush(), 5)
    assert failing.failures == observer.write_failures == 2
    assert await stored(store) == 1 and not observer.dropped


@pytest.mark.asyncio
async def test_close_gives_up_on_a_broken_backend_and_says_how_much_is_lost(
    open_store: StoreFactory, make_backend: BackendFactory, caplog: pytest.LogCaptureFixture
) -> None:
    backend = make_backend()
    failing = Failing(backend, times=10**6)
    observer = Observer()
    store = await open_store(backend, flush_interval_s=NEVER, observer=observer)
    for _ in range(3):
        await store.put(record())
    with caplog.at_level(logging.ERROR, logger="dgserve.inspection"):
        await asyncio.wait_for(store.close(), 5)
    assert failing.failures == CLOSE_ATTEMPTS
    assert f"giving up after {CLOSE_ATTEMPTS} failed writes; 3 inspection records are lost" in caplog.text
    assert observer.dropped == {"closing": 3} and observer.write_failures == CLOSE_ATTEMPTS
    with pytest.raises(RuntimeError):
        await store.put(record())
