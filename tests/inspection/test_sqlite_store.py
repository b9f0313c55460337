"""SQLiteInspectionStore: reads of queued records, listing, retention, restarts,
back-pressure, failure retry, and the factory.

Records are kept queued on purpose with a long ``flush_interval_s``; where a test must
catch the writer mid-write, a gate blocks the write in its worker thread, so no test
depends on how fast the disk is.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import threading
import time
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import closing
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from dgserve.errors import InspectionNotFoundError
from dgserve.inspection import (
    InspectionRecord,
    InspectionStore,
    SQLiteInspectionStore,
    new_inspection_id,
    open_inspection_store,
)

pytestmark = pytest.mark.timeout(10)

# What the conftest's open_store fixture gives: starts a store with these kwargs.
StoreFactory = Callable[..., Awaitable[SQLiteInspectionStore]]

T0 = datetime(2025, 1, 1, 12, 0, tzinfo=UTC)
NEVER = 3600.0  # a flush interval no test waits out: records stay queued until flushed

# Shaped like ImageConnectivity.to_dict() for a small DG-Net: per-stage edge matrices.
CONNECTIVITY: dict[str, Any] = {
    "stages": [
        {
            "stage": f"layer{s}",
            "nodes": ["input", "0", "1", "2", "3", "output"],
            "adjacency": [[round(0.1 * (i + j + s) % 1, 6) for j in range(6)] for i in range(6)],
            "thresholds": [None, 0.5, 0.5, 0.5, 0.5, None],
            "executed": [True] * 6,
            "open_edges": 9,
            "possible_edges": 14,
        }
        for s in range(1, 5)
    ],
    "glore_units": [],
}


def record(
    *,
    model: str = "dgnet_resnet50",
    created_at: datetime = T0,
    id: str | None = None,
    top1: str = "cat",
) -> InspectionRecord:
    return InspectionRecord(
        id=id or new_inspection_id(),
        model=model,
        version=1,
        task="classification",
        created_at=created_at,
        prediction={"top1": top1, "score": 0.93},
        connectivity=CONNECTIVITY,
    )


def rows_on_disk(path: Path) -> int:
    with closing(sqlite3.connect(path)) as conn:
        (n,) = conn.execute("SELECT COUNT(*) FROM inspections").fetchone()
    return int(n)


class Gate:
    """Blocks every batch write in its worker thread until opened."""

    def __init__(self, store: SQLiteInspectionStore) -> None:
        self.open = threading.Event()
        self.entered = threading.Event()
        real = store._write_batch

        def gated(batch: Sequence[Any]) -> None:
            self.entered.set()
            if not self.open.wait(timeout=10):
                raise TimeoutError("gate never opened")
            real(batch)

        store._write_batch = gated  # type: ignore[method-assign]


async def collect(it: AsyncIterator[InspectionRecord]) -> list[InspectionRecord]:
    return [r async for r in it]


# --- put and get -----------------------------------------------------------------


@pytest.mark.asyncio
async def test_get_finds_a_record_while_queued_and_after_flush(open_store: StoreFactory) -> None:
    store = await open_store(flush_interval_s=NEVER)
    rec = record()
    await store.put(rec)

    assert store.pending == 1
    assert await store.get(rec.id) == rec

    await store.flush()
    assert store.pending == 0
    assert rows_on_disk(store.path) == 1
    assert await store.get(rec.id) == rec


@pytest.mark.asyncio
async def test_unknown_id_is_not_found(open_store: StoreFactory) -> None:
    store = await open_store(flush_interval_s=NEVER)
    await store.put(record())
    with pytest.raises(InspectionNotFoundError) as info:
        await store.get("01ARZ3NDEKTSV4RRFFQ69G5FAV")
    assert info.value.status_code == 404
    await store.flush()
    with pytest.raises(InspectionNotFoundError):
        await store.get("no-such-id")


@pytest.mark.asyncio
async def test_put_does_not_wait_for_the_disk(open_store: StoreFactory) -> None:
    store = await open_store(batch_size=256, flush_interval_s=0.0)
    gate = Gate(store)
    records = [record(created_at=T0 + timedelta(milliseconds=i)) for i in range(1000)]
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
    assert rows_on_disk(store.path) == 1000


@pytest.mark.asyncio
async def test_a_full_queue_makes_put_wait_and_loses_nothing(open_store: StoreFactory) -> None:
    store = await open_store(batch_size=4, max_pending=8, flush_interval_s=0.0)
    gate = Gate(store)
    try:
        for i in range(8):
            await store.put(record(top1=str(i)))
        blocked = asyncio.create_task(store.put(record(top1="8")))
        await asyncio.sleep(0.05)
        assert not blocked.done()
        assert store.pending == 8
    finally:
        gate.open.set()
    await asyncio.wait_for(blocked, 5)
    await store.flush()
    assert await store.count() == 9


@pytest.mark.asyncio
async def test_concurrent_puts_all_land(open_store: StoreFactory) -> None:
    store = await open_store(batch_size=16, max_pending=64, flush_interval_s=0.001)
    expected: set[str] = set()

    async def producer(n: int) -> None:
        for i in range(25):
            rec = record(model=f"m{n % 3}", created_at=T0 + timedelta(microseconds=n * 100 + i))
            expected.add(rec.id)
            await store.put(rec)
            if i % 5 == 0:
                await asyncio.sleep(0)

    await asyncio.gather(*(producer(n) for n in range(40)))
    await store.flush()
    assert await store.count() == 1000
    assert rows_on_disk(store.path) == 1000
    listed = await collect(store.list(limit=2000, include_connectivity=False))
    assert {r.id for r in listed} == expected


@pytest.mark.asyncio
async def test_putting_an_id_again_replaces_the_record(open_store: StoreFactory) -> None:
    store = await open_store(flush_interval_s=NEVER)
    first = record(top1="cat")
    await store.put(first)
    await store.flush()
    second = record(id=first.id, top1="dog")
    await store.put(second)

    assert await store.count() == 1
    assert (await store.get(first.id)).prediction["top1"] == "dog"
    assert [r.prediction["top1"] for r in await collect(store.list())] == ["dog"]
    await store.flush()
    assert await store.count() == 1
    assert (await store.get(first.id)).prediction["top1"] == "dog"


@pytest.mark.asyncio
async def test_stored_records_are_isolated_from_later_mutation(open_store: StoreFactory) -> None:
    store = await open_store(flush_interval_s=NEVER)
    prediction = {"top1": "cat"}
    rec = InspectionRecord(
        id=new_inspection_id(),
        model="m",
        version=1,
        task="classification",
        created_at=T0,
        prediction=prediction,
        connectivity={},
    )
    await store.put(rec)
    prediction["top1"] = "dog"
    assert (await store.get(rec.id)).prediction == {"top1": "cat"}


@pytest.mark.asyncio
async def test_a_record_that_is_not_json_is_refused_at_put(open_store: StoreFactory) -> None:
    store = await open_store(flush_interval_s=NEVER)
    bad = InspectionRecord(
        id=new_inspection_id(),
        model="m",
        version=1,
        task="classification",
        created_at=T0,
        prediction={"tensor": object()},
        connectivity={},
    )
    with pytest.raises(TypeError):
        await store.put(bad)
    assert store.pending == 0


# --- listing -----------------------------------------------------------------------


@pytest.mark.asyncio
async def test_list_orders_filters_and_merges_queued_with_written(open_store: StoreFactory) -> None:
    store = await open_store(flush_interval_s=NEVER, page_size=3)
    # Two records share a timestamp: the id breaks the tie.
    times = [T0 + timedelta(seconds=s) for s in (5, 1, 3, 3, 0, 4, 2, 6)]
    models = ["a", "b", "a", "a", "b", "a", "b", "a"]
    records = [record(model=m, created_at=t) for m, t in zip(models, times, strict=True)]
    for rec in records[:5]:
        await store.put(rec)
    await store.flush()
    for rec in records[5:]:  # still queued while we list
        await store.put(rec)
    assert store.pending == 3

    expected = sorted(records, key=lambda r: (r.created_at, r.id))
    everything = await collect(store.list(limit=100))
    assert [r.id for r in everything] == [r.id for r in expected]
    assert everything == expected

    assert [r.id for r in await collect(store.list(limit=3))] == [r.id for r in expected[:3]]
    assert await collect(store.list(limit=0)) == []

    only_a = await collect(store.list(model="a"))
    assert [r.id for r in only_a] == [r.id for r in expected if r.model == "a"]
    assert await collect(store.list(model="nope")) == []

    since = T0 + timedelta(seconds=3)  # inclusive
    later = await collect(store.list(since=since))
    assert [r.id for r in later] == [r.id for r in expected if r.created_at >= since]
    later_a = await collect(store.list(model="a", since=since, limit=2))
    assert [r.id for r in later_a] == [r.id for r in expected if r.created_at >= since and r.model == "a"][:2]

    # The same instant in another zone selects the same records.
    since_cet = since.astimezone(timezone(timedelta(hours=1)))
    assert [r.id for r in await collect(store.list(since=since_cet))] == [r.id for r in later]

    slim = await collect(store.list(include_connectivity=False))
    assert [r.id for r in slim] == [r.id for r in expected]
    assert all(r.connectivity == {} for r in slim)
    assert all(r.prediction == {"top1": "cat", "score": 0.93} for r in slim)


@pytest.mark.asyncio
async def test_list_rejects_bad_arguments(open_store: StoreFactory) -> None:
    store = await open_store()
    with pytest.raises(ValueError, match="timezone-aware"):
        await collect(store.list(since=datetime(2025, 1, 1)))
    with pytest.raises(ValueError, match="limit"):
        await collect(store.list(limit=-1))


@pytest.mark.asyncio
async def test_list_yields_a_record_once_when_it_is_written_mid_listing(open_store: StoreFactory) -> None:
    store = await open_store(flush_interval_s=NEVER, page_size=2)
    records = [record(created_at=T0 + timedelta(seconds=i)) for i in range(6)]
    for rec in records:
        await store.put(rec)
    listing = store.list(limit=100)
    first = await anext(listing)  # queued records are snapshotted here
    await store.flush()  # ...and now they are also in the file
    rest = [r async for r in listing]
    assert [r.id for r in [first, *rest]] == [r.id for r in records]


# --- retention ---------------------------------------------------------------------


@pytest.mark.asyncio
async def test_retention_by_count_keeps_the_newest(open_store: StoreFactory) -> None:
    store = await open_store(max_records=5, flush_interval_s=NEVER, retention_interval_s=NEVER)
    records = [record(created_at=T0 + timedelta(seconds=i)) for i in range(12)]
    for rec in reversed(records):  # put order must not matter, created_at does
        await store.put(rec)
    await store.flush()

    assert await store.enforce_retention() == 7
    assert await store.count() == 5
    kept = await collect(store.list(include_connectivity=False))
    assert [r.id for r in kept] == [r.id for r in records[-5:]]
    with pytest.raises(InspectionNotFoundError):
        await store.get(records[0].id)
    assert await store.enforce_retention() == 0


@pytest.mark.asyncio
async def test_retention_by_age_uses_the_clock(open_store: StoreFactory) -> None:
    now = T0 + timedelta(hours=1)
    store = await open_store(max_age_s=60, clock=lambda: now, flush_interval_s=NEVER, retention_interval_s=NEVER)
    ages_s = [3600, 120, 61, 59, 0]
    records = [record(created_at=now - timedelta(seconds=a)) for a in ages_s]
    for rec in records:
        await store.put(rec)
    await store.flush()

    assert await store.enforce_retention() == 3
    assert [r.id for r in await collect(store.list())] == [r.id for r in records[3:]]


@pytest.mark.asyncio
async def test_retention_runs_at_start_and_then_in_the_background(open_store: StoreFactory) -> None:
    old = await open_store()
    await old.put(record(created_at=datetime.now(UTC) - timedelta(days=2)))
    fresh = [record(created_at=datetime.now(UTC) + timedelta(seconds=i)) for i in range(3)]
    for rec in fresh:
        await old.put(rec)
    await old.close()

    store = await open_store(max_age_s=86_400, max_records=2, retention_interval_s=0.02)
    assert await store.count() == 2  # trimmed by the time start() returned
    await store.put(record(created_at=datetime.now(UTC) + timedelta(seconds=10)))
    await store.flush()
    deadline = time.monotonic() + 5
    while await store.count() != 2:
        assert time.monotonic() < deadline, "background retention did not run"
        await asyncio.sleep(0.01)
    with pytest.raises(InspectionNotFoundError):
        await store.get(fresh[1].id)
    assert await store.get(fresh[2].id) == fresh[2]


# --- durability and the file ---------------------------------------------------------


@pytest.mark.asyncio
async def test_records_survive_a_restart(open_store: StoreFactory) -> None:
    store = await open_store(flush_interval_s=NEVER)
    records = [record(created_at=T0 + timedelta(seconds=i)) for i in range(3)]
    for rec in records:
        await store.put(rec)
    await store.close()  # no explicit flush: close must write the queue

    reopened = await open_store()
    assert await reopened.count() == 3
    for rec in records:
        assert await reopened.get(rec.id) == rec
    assert await collect(reopened.list()) == records


@pytest.mark.asyncio
async def test_close_writes_what_is_queued(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "er" / "inspections.db"  # directories are created
    store = SQLiteInspectionStore(path, flush_interval_s=NEVER)
    await store.start()
    for _ in range(10):
        await store.put(record())
    assert store.pending == 10
    await store.close()
    await store.close()  # idempotent

    assert rows_on_disk(path) == 10
    with pytest.raises(RuntimeError):
        await store.put(record())
    with pytest.raises(RuntimeError):
        await store.get("x")


@pytest.mark.asyncio
async def test_the_file_is_in_wal_mode_with_the_documented_format(open_store: StoreFactory) -> None:
    store = await open_store()
    rec = record()
    await store.put(rec)
    await store.flush()
    with closing(sqlite3.connect(store.path)) as conn:
        (mode,) = conn.execute("PRAGMA journal_mode").fetchone()
        (version,) = conn.execute("PRAGMA user_version").fetchone()
        created_at_us, prediction, blob = conn.execute(
            "SELECT created_at_us, prediction, connectivity FROM inspections WHERE id = ?", (rec.id,)
        ).fetchone()
        indexes = {row[1] for row in conn.execute("PRAGMA index_list(inspections)")}
    assert mode == "wal"
    assert version == 2
    assert created_at_us == int(T0.timestamp()) * 1_000_000
    assert json.loads(prediction) == rec.prediction
    assert json.loads(zlib.decompress(blob)) == CONNECTIVITY
    assert len(blob) < len(json.dumps(CONNECTIVITY, separators=(",", ":")))
    assert {"inspections_created", "inspections_model_created"} <= indexes


@pytest.mark.asyncio
async def test_a_file_from_a_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "inspections.db"
    with closing(sqlite3.connect(path)) as conn:
        conn.execute("PRAGMA user_version = 99")
    store = SQLiteInspectionStore(path)
    with pytest.raises(RuntimeError, match="schema 99"):
        await store.start()
    await store.close()


@pytest.mark.asyncio
async def test_a_failed_write_is_retried_and_the_records_stay_readable(open_store: StoreFactory) -> None:
    store = await open_store(flush_interval_s=0.0)
    real = store._write_batch
    failures = 0

    def flaky(batch: Sequence[Any]) -> None:
        nonlocal failures
        if failures < 2:
            failures += 1
            raise sqlite3.OperationalError("disk I/O error")
        real(batch)

    store._write_batch = flaky  # type: ignore[method-assign]
    rec = record()
    await store.put(rec)
    assert await store.get(rec.id) == rec
    await asyncio.wait_for(store.flush(), 5)
    assert failures == 2
    assert rows_on_disk(store.path) == 1


# --- records, ids, factory -----------------------------------------------------------


def test_record_round_trips_through_a_dict_and_is_utc() -> None:
    cet = timezone(timedelta(hours=1))
    rec = record(created_at=datetime(2025, 1, 1, 13, 0, 0, 123456, tzinfo=cet))
    assert rec.created_at == T0.replace(microsecond=123456)
    assert rec.created_at.tzinfo is UTC

    data = rec.to_dict()
    assert data["created_at"] == "2025-01-01T12:00:00.123456+00:00"
    assert json.loads(json.dumps(data)) == data
    assert InspectionRecord.from_dict(json.loads(json.dumps(data))) == rec

    with pytest.raises(ValueError, match="timezone-aware"):
        record(created_at=datetime(2025, 1, 1))
    with pytest.raises(ValueError, match="missing"):
        InspectionRecord.from_dict({"id": "x"})


def test_new_record_gets_an_id_and_the_current_time() -> None:
    before = datetime.now(UTC)
    rec = InspectionRecord.new(model="m", version=2, task="classification", prediction={}, connectivity={})
    assert before <= rec.created_at <= datetime.now(UTC)
    assert len(rec.id) == 26


def test_ids_are_url_safe_unique_and_time_ordered() -> None:
    alphabet = set("0123456789ABCDEFGHJKMNPQRSTVWXYZ")
    ids = [new_inspection_id() for _ in range(1000)]
    assert len(set(ids)) == 1000
    assert all(len(i) == 26 and set(i) <= alphabet for i in ids)

    ms = 0
    for char in ids[-1][:10]:
        ms = ms * 32 + "0123456789ABCDEFGHJKMNPQRSTVWXYZ".index(char)
    assert abs(ms / 1000 - time.time()) < 5

    earlier = new_inspection_id()
    time.sleep(0.002)
    assert new_inspection_id()[:10] > earlier[:10]


def test_factory_accepts_paths_and_sqlite_urls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    cases = {
        "data/x.db": Path("data/x.db"),
        str(tmp_path / "x.db"): tmp_path / "x.db",
        "sqlite:///data/x.db": Path("data/x.db"),
        f"sqlite:///{tmp_path}/x.db": tmp_path / "x.db",  # four slashes: absolute
        "SQLite:///x.db": Path("x.db"),
    }
    for location, path in cases.items():
        store = open_inspection_store(location, max_records=10)
        assert isinstance(store, SQLiteInspectionStore)
        assert isinstance(store, InspectionStore)
        assert store.path == path, location
        assert store.max_records == 10
    store = open_inspection_store(tmp_path / "y.db", max_age_s=5.0, batch_size=8)
    assert isinstance(store, SQLiteInspectionStore) and store.max_age_s == 5.0


@pytest.mark.parametrize(
    "location, message",
    [
        ("postgresql://user@db/inspections", "unsupported inspection store URL scheme 'postgresql'"),
        ("redis://cache:6379/0", "unsupported inspection store URL scheme 'redis'"),
        ("sqlite://", "invalid SQLite URL"),
        ("sqlite:///", "invalid SQLite URL"),
        ("sqlite://host/x.db", "invalid SQLite URL"),
        ("sqlite:///x.db?mode=memory", "invalid SQLite URL"),
        ("  ", "empty"),
    ],
)
def test_factory_refuses_what_it_cannot_open(location: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        open_inspection_store(location)


def test_factory_passes_bad_options_to_the_store() -> None:
    with pytest.raises(ValueError, match="max_records"):
        open_inspection_store("x.db", max_records=0)
    with pytest.raises(TypeError):
        open_inspection_store("x.db", no_such_option=1)


@pytest.mark.asyncio
async def test_preserialised_connectivity_is_stored_as_given(tmp_path: Path) -> None:
    """A producer that already has the JSON text is not made to encode it again."""
    store = SQLiteInspectionStore(tmp_path / "pre.sqlite3")
    await store.start()
    try:
        connectivity = {"stages": [{"adjacency": [[0.0, 1.0], [0.5, 0.0]]}]}
        text = json.dumps(connectivity)
        record = InspectionRecord.new(
            model="m", version=1, task="classification", prediction={}, connectivity=connectivity,
            connectivity_json=text,
        )
        await store.put(record)
        await store.flush()
        assert (await store.get(record.id)).connectivity == connectivity
    finally:
        await store.close()
