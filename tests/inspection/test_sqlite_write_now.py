"""SQLite's ``write_batch_now``: a small batch written at once on the caller's thread
(the event loop's), and nothing written, at once, wherever the write would wait."""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import pytest

from dgserve.inspection import SQLiteBackend
from dgserve.inspection.backend import StoredRecord

pytestmark = pytest.mark.timeout(30)

# SQLite's busy timeout is 5 s; a call that waited on a lock would take at least that.
WAITED_S = 2.0


def rows(count: int, *, prefix: str = "r", connectivity: str = "{}") -> list[StoredRecord]:
    return [StoredRecord(f"{prefix}{i}", "m", 1, "t", 1_000 + i, '{"i":%d}' % i, connectivity) for i in range(count)]


@pytest.fixture
def backend(tmp_path: Path) -> Iterator[SQLiteBackend]:
    backend = SQLiteBackend(tmp_path / "inspections.db")
    backend.open()
    yield backend
    backend.close()


def busy_timeout_ms(backend: SQLiteBackend) -> int:
    (value,) = backend._writer().execute("PRAGMA busy_timeout").fetchone()
    return int(value)


def test_a_small_batch_is_written_at_once_and_the_busy_timeout_stays(backend: SQLiteBackend) -> None:
    batch = rows(8)
    assert backend.write_batch_now(batch, {})
    assert backend.count() == 8
    assert backend.get("r3") == batch[3]
    assert busy_timeout_ms(backend) == 5_000


def test_another_connection_writing_makes_it_refuse_at_once(backend: SQLiteBackend, tmp_path: Path) -> None:
    # Another process's writer (the other server process, a truncating checkpoint) holds the lock.
    with closing(sqlite3.connect(tmp_path / "inspections.db", isolation_level=None)) as other:
        other.execute("BEGIN IMMEDIATE")
        began = time.monotonic()
        assert not backend.write_batch_now(rows(2), {})
        assert time.monotonic() - began < WAITED_S
        assert busy_timeout_ms(backend) == 5_000  # the threaded writes still wait their turn
        other.execute("COMMIT")
    assert backend.count() == 0
    assert backend.write_batch_now(rows(2), {})
    assert backend.count() == 2


def test_another_thread_on_the_writer_makes_it_refuse_at_once(backend: SQLiteBackend) -> None:
    entered, release = threading.Event(), threading.Event()
    real = backend._writer

    def held() -> sqlite3.Connection:  # a write_batch in a worker thread, stopped inside the lock
        entered.set()
        release.wait(timeout=10)
        return real()

    backend._writer = held  # type: ignore[method-assign]
    writer = threading.Thread(target=backend.write_batch, args=(rows(1, prefix="t"), {}))
    writer.start()
    try:
        assert entered.wait(timeout=10)
        began = time.monotonic()
        assert not backend.write_batch_now(rows(2), {})
        assert time.monotonic() - began < WAITED_S
    finally:
        release.set()
        writer.join(timeout=10)
    backend._writer = real  # type: ignore[method-assign]
    assert backend.count() == 1


@pytest.mark.parametrize(
    "batch",
    [rows(65), rows(3, connectivity='"' + "x" * 100_000 + '"')],
    ids=["over 64 records", "over 256 KiB"],
)
def test_a_backlog_or_a_large_batch_is_left_to_the_thread(backend: SQLiteBackend, batch: list[StoredRecord]) -> None:
    assert not backend.write_batch_now(batch, {})
    assert backend.count() == 0
    assert backend.write_batch_now(batch[:2], {})  # the same records, fewer of them


def test_a_new_shared_graph_is_left_to_the_thread_and_a_stored_one_is_not(backend: SQLiteBackend) -> None:
    graph = {"d1": "[[1.0,0.5],[0.5,1.0]]"}
    assert not backend.write_batch_now(rows(1, prefix="a"), graph)
    assert backend.count() == 0 and backend.graph("d1") is None
    backend.write_batch(rows(1, prefix="a"), graph)
    assert backend.write_batch_now(rows(1, prefix="b"), graph)
    assert backend.count() == 2 and backend.graph("d1") == graph["d1"]
