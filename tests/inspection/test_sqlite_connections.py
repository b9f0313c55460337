"""WAL checkpoints in a thread of their own (``dgserve.inspection.sqlite_connections``), never in a commit."""

from __future__ import annotations

import asyncio
import shutil
import sqlite3
import threading
import time
from contextlib import closing
from pathlib import Path

import pytest

from dgserve.inspection import InspectionRecord, SQLiteBackend, SQLiteInspectionStore
from dgserve.inspection.sqlite_connections import INTERVAL_S, Checkpointer, enter_wal



class _Checkpoints:
    """Wraps ``Checkpointer.checkpoint``: when each began, and a lock that a copy of the
    database file takes, so that no copy is made while a checkpoint writes into it (such a
    copy can be torn: "database disk image is malformed", seen in CI)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.started: list[float] = []
        self.lock = threading.Lock()
        real = Checkpointer.checkpoint

        def checkpoint(checkpointer: Checkpointer, conn: sqlite3.Connection) -> None:
            with self.lock:
                self.started.append(time.monotonic())
                real(checkpointer, conn)

        monkeypatch.setattr(Checkpointer, "checkpoint", checkpoint)

    def rows_in_main_file(self, path: Path, copy: Path) -> int:
        with self.lock:
            return _rows_in_main_file(path, copy)


def _rows_in_main_file(path: Path, copy: Path) -> int:
    """Records in the database file alone, as if its WAL were lost: what checkpoints copied."""
    shutil.copyfile(path, copy)
    with closing(sqlite3.connect(copy)) as conn:
        if conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'inspections'").fetchone() is None:
            return 0  # not even the schema was copied yet
        return int(conn.execute("SELECT count(*) FROM inspections").fetchone()[0])


@pytest.mark.asyncio
async def test_commits_leave_checkpoints_to_the_thread_which_copies_them_soon(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "inspections.db"
    checkpoints = _Checkpoints(monkeypatch)
    async with SQLiteInspectionStore(path) as store:
        # About 3 MB of WAL: SQLite's own checkpoint (every 1,000 pages) would have run in a commit.
        big = {"stages": [{"stage": "s", "adjacency": [[float(i)] * 64 for i in range(64)]}]}
        for _ in range(20):
            last_batch = time.monotonic()  # its commit comes after this, however the writer batches
            for _ in range(20):
                await store.put(InspectionRecord.new(model="m", version=1, task="classification",
                                                     prediction={"top1": "x"}, connectivity=big))  # fmt: skip
            await store.flush()
        rows = checkpoints.rows_in_main_file(path, tmp_path / "right-after.db")
        # The commits copied nothing: all 400 rows are there only if the thread's checkpoint
        # began after the last batch (a loaded machine can take over its interval for the writes).
        assert rows < 400 or any(started >= last_batch for started in checkpoints.started)
        deadline = time.monotonic() + INTERVAL_S + 5
        later = tmp_path / "later.db"
        while (rows := checkpoints.rows_in_main_file(path, later)) < 400 and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        assert rows == 400


def test_a_stop_between_the_threads_wait_and_its_clear_still_stops_it(tmp_path: Path) -> None:
    """``stop()`` sets both events and joins. Landing after the thread's interval ran out and
    before it cleared ``_dirty``, it lost its wake-up: the thread went back to waiting for a
    write that never came, and the join hung a server process's shutdown for good (found by
    py-spy in a replacement process still alive 50 minutes after its SIGTERM)."""
    path = tmp_path / "t.db"
    sqlite3.connect(path).close()
    checkpointer = Checkpointer(path, 1000, interval_s=0.01)
    raced = threading.Event()

    class StopLandsBeforeTheClear(threading.Event):
        def clear(self) -> None:
            if not raced.is_set():  # stop()'s two sets, then the thread's own clear
                checkpointer._stopping.set()
                super().set()
                raced.set()
            super().clear()

    checkpointer._dirty = StopLandsBeforeTheClear()
    checkpointer.start()
    checkpointer.wrote()
    assert raced.wait(5)
    assert checkpointer._thread is not None
    checkpointer._thread.join(5)  # the rest of stop(): its join
    assert not checkpointer._thread.is_alive(), "the checkpoint thread missed its stop"


def test_a_wal_past_its_limit_is_truncated(tmp_path: Path) -> None:
    path = tmp_path / "t.db"
    with closing(sqlite3.connect(path, isolation_level=None)) as writer:
        writer.execute("PRAGMA journal_mode = WAL")
        writer.execute("PRAGMA wal_autocheckpoint = 0")
        writer.execute("CREATE TABLE t (body BLOB)")
        writer.executemany("INSERT INTO t VALUES (?)", [(bytes(4000),)] * 50)
        wal = path.with_name("t.db-wal")
        grown = wal.stat().st_size
        with closing(sqlite3.connect(path, isolation_level=None)) as conn:
            Checkpointer(path, 1000, truncate_bytes=grown + 1).checkpoint(conn)  # under the limit: passive
            assert wal.stat().st_size == grown
            Checkpointer(path, 1000, truncate_bytes=grown).checkpoint(conn)
            assert wal.stat().st_size == 0
        assert writer.execute("SELECT count(*) FROM t").fetchone() == (50,)


def test_a_file_written_by_another_connection_enters_wal_once_it_is_free(tmp_path: Path) -> None:
    """SQLite refuses the switch to WAL at once, without its busy timeout, while another
    connection holds a rollback-journal file's write lock, as a server process that opens
    a new file first does to the others: the backend waits for the lock instead."""
    path = tmp_path / "inspections.db"
    holding = threading.Event()
    released: list[float] = []

    def hold_the_write_lock() -> None:
        with closing(sqlite3.connect(path, isolation_level=None)) as other:
            other.execute("BEGIN IMMEDIATE")
            other.execute("CREATE TABLE elsewhere (x)")
            holding.set()
            time.sleep(0.3)
            released.append(time.monotonic())
            other.execute("COMMIT")

    holder = threading.Thread(target=hold_the_write_lock)
    holder.start()
    assert holding.wait(10)
    backend = SQLiteBackend(path)
    try:
        backend.open()
        opened = time.monotonic()
    finally:
        holder.join()
        backend.close()
    assert released and opened >= released[0]  # it waited for the lock
    with closing(sqlite3.connect(path)) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)


def test_errors_other_than_busy_are_not_retried(tmp_path: Path) -> None:
    (tmp_path / "not-a-database.db").write_bytes(b"x" * 4096)
    with closing(sqlite3.connect(tmp_path / "not-a-database.db", isolation_level=None)) as conn:
        started = time.monotonic()
        with pytest.raises(sqlite3.DatabaseError):
            enter_wal(conn, 5000)
        assert time.monotonic() - started < 1
