"""Opt-in thumbnails (``DGSERVE_INSPECTION_THUMBNAILS``) on every backend: kept with the
record they belong to, read back by ``get`` (queued or committed), gone when the record is
written again without one or deleted, and never in the record's JSON."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta

import pytest

from dgserve.inspection import InspectionRecord, InspectionStore, PostgreSQLBackend, SQLiteBackend
from dgserve.inspection.backend import InspectionBackend

StoreFactory = Callable[..., Awaitable[InspectionStore]]

pytestmark = pytest.mark.timeout(30)

T0 = datetime(2026, 3, 1, tzinfo=UTC)
JPEG = b"\xff\xd8\xff\xe0 not really a JPEG, the store keeps bytes \xff\xd9"


def record(i: int, thumbnail: bytes | None) -> InspectionRecord:
    return InspectionRecord.new(model="m", version=1, task="classification", prediction={"i": i},
                                connectivity={"stages": []}, created_at=T0 + timedelta(minutes=i),
                                thumbnail=thumbnail)  # fmt: skip


@pytest.mark.asyncio
async def test_a_thumbnail_lives_and_goes_with_its_record(open_store: StoreFactory) -> None:
    store = await open_store(flush_interval_s=3600.0, max_records=2)
    with_one, without = record(0, JPEG), record(1, None)
    await store.put(with_one)
    await store.put(without)
    assert (await store.get(with_one.id)).thumbnail == JPEG  # still queued
    await store.flush()
    got = await store.get(with_one.id)
    assert got.thumbnail == JPEG and "thumbnail" not in got.to_dict()
    assert (await store.get(without.id)).thumbnail is None
    # Written again without one: the old thumbnail does not come back.
    await store.put(InspectionRecord(**{**with_one.__dict__, "thumbnail": None, "connectivity_json": None}))
    await store.flush()
    assert (await store.get(with_one.id)).thumbnail is None
    # Retention takes a record's thumbnail with it.
    old = record(-5, JPEG)
    await store.put(old)
    await store.flush()
    assert (await store.get(old.id)).thumbnail == JPEG
    await store.put(record(2, None))
    await store.flush()
    await store.enforce_retention()  # keeps the newest 2: `old` and `with_one` go
    backend = store.backend
    assert backend.get(old.id) is None and backend.get(with_one.id) is None
    assert _thumbnails(backend) == 0


def _thumbnails(backend: InspectionBackend) -> int:
    """Rows left in the thumbnails table, read past the store."""
    if isinstance(backend, SQLiteBackend):
        with backend._reader() as conn:
            return int(conn.execute("SELECT count(*) FROM thumbnails").fetchone()[0])
    assert isinstance(backend, PostgreSQLBackend)
    with backend._transaction() as conn:
        row = conn.execute("SELECT count(*) FROM thumbnails").fetchone()
        assert row is not None
        return int(row[0])
