"""What every ``InspectionStore`` keeps, whichever backend it writes to: reads of queued
records, listing, count, retention, restarts and closing.

``open_store`` (conftest) runs each test once per backend in ``BACKENDS``. Records are
kept queued on purpose with a long ``flush_interval_s``, so no test depends on how fast
storage is. The writer's side (back-pressure, retries, giving up) is in
``test_store_contract_writer.py``, shared graphs in ``test_shared_graphs.py``.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest

from dgserve.errors import InspectionNotFoundError
from dgserve.inspection import InspectionRecord, InspectionStore, new_inspection_id

pytestmark = pytest.mark.timeout(10)

# What the conftest's open_store gives: starts a store (on a given backend, or a new one).
StoreFactory = Callable[..., Awaitable[InspectionStore]]

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


async def stored(store: InspectionStore) -> int:
    """Records the backend holds: written, not merely queued."""
    return await asyncio.to_thread(store.backend.count)


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
    assert await stored(store) == 0

    await store.flush()
    assert store.pending == 0
    assert await stored(store) == 1
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
async def test_putting_an_id_again_replaces_the_record(open_store: StoreFactory) -> None:
    store = await open_store(flush_interval_s=NEVER)
    first = record(top1="cat")
    await store.put(first)
    await store.flush()
    second = record(id=first.id, top1="dog")
    await store.put(second)

    assert await store.count() == 1  # queued and written, counted once
    assert (await store.get(first.id)).prediction["top1"] == "dog"
    assert [r.prediction["top1"] for r in await collect(store.list())] == ["dog"]
    await store.flush()
    assert await store.count() == 1
    assert (await store.get(first.id)).prediction["top1"] == "dog"
    third = record(id=first.id, top1="owl")  # twice in one batch: the last put wins
    await store.put(record(id=first.id, top1="eel"))
    await store.put(third)
    await store.flush()
    assert await store.count() == 1 and await store.get(first.id) == third


@pytest.mark.asyncio
async def test_count_counts_many_records_queued_and_written_once(open_store: StoreFactory) -> None:
    # Many queued ids: more than a backend may pass in one query (SQLite binds 999 at most).
    store = await open_store(flush_interval_s=NEVER, max_pending=5000)
    ids = [new_inspection_id() for _ in range(1200)]
    await asyncio.gather(*(store.put(record(id=i)) for i in ids))
    assert await store.count() == 1200
    await store.flush()
    for i in ids[:1100]:  # put again: queued, and written too
        await store.put(record(id=i, top1="dog"))
    await store.put(record(created_at=T0 - timedelta(seconds=1)))
    assert store.pending == 1101
    assert await store.count() == 1201
    assert len(await collect(store.list(limit=5000, include_connectivity=False))) == 1201


@pytest.mark.asyncio
async def test_stored_records_are_isolated_from_later_mutation(open_store: StoreFactory) -> None:
    store = await open_store(flush_interval_s=NEVER)
    prediction = {"top1": "cat"}
    rec = InspectionRecord(
        id=new_inspection_id(), model="m", version=1, task="classification", created_at=T0,
        prediction=prediction, connectivity={},
    )
    await store.put(rec)
    prediction["top1"] = "dog"
    assert (await store.get(rec.id)).prediction == {"top1": "cat"}


@pytest.mark.asyncio
async def test_a_record_that_is_not_json_is_refused_at_put(open_store: StoreFactory) -> None:
    store = await open_store(flush_interval_s=NEVER)
    bad = InspectionRecord(
        id=new_inspection_id(), model="m", version=1, task="classification", created_at=T0,
        prediction={"tensor": object()}, connectivity={},
    )
    with pytest.raises(TypeError):
        await store.put(bad)
    assert store.pending == 0


@pytest.mark.asyncio
async def test_preserialised_connectivity_is_stored_as_given(open_store: StoreFactory) -> None:
    """A producer that already has the JSON text is not made to encode it again."""
    store = await open_store()
    connectivity = {"stages": [{"adjacency": [[0.0, 1.0], [0.5, 0.0]]}]}
    rec = InspectionRecord.new(
        model="m", version=1, task="classification", prediction={}, connectivity=connectivity,
        connectivity_json=json.dumps(connectivity),
    )
    await store.put(rec)
    await store.flush()
    assert (await store.get(rec.id)).connectivity == connectivity


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
    assert await store.count() == 8

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
    await store.flush()  # ...and now they are also written
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


# --- restarts and closing ---------------------------------------------------


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
async def test_close_is_idempotent_and_ends_puts_and_reads(open_store: StoreFactory) -> None:
    store = await open_store(flush_interval_s=NEVER)
    for _ in range(10):
        await store.put(record())
    assert store.pending == 10
    await store.close()
    await store.close()

    with pytest.raises(RuntimeError):
        await store.put(record())
    with pytest.raises(RuntimeError):
        await store.get("x")
    assert await (await open_store()).count() == 10
