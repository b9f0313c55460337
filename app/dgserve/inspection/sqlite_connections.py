"""The SQLite file's connections besides the writer: a pool of read-only ones, and the
one that checkpoints the WAL in a thread of its own.

**Reads** (``ReaderPool``) run in worker threads on read-only connections, reused across
calls; WAL lets them read while the writer writes.

**Checkpoints** (``Checkpointer``). SQLite checkpoints by itself in the connection that
commits: the commit that takes the WAL past 1,000 pages also copies them into the
database file and syncs it. Answers wait for their records' commit
(``DGSERVE_INSPECTION_DURABILITY=sync``), so every thousandth page or so an answer
waited for that copy too: alone on this machine, 32-record commits
took 0.24 ms at the median and 19 ms at the 99th percentile with SQLite's own
checkpoints, and 0.36 and 0.68 ms without them.

So the writer connection turns them off (``wal_autocheckpoint = 0``) and a
``Checkpointer`` runs a ``PASSIVE`` checkpoint every ``interval_s`` after a write, on a
connection of its own. A passive checkpoint takes no lock a writer needs, so commits go
on while it copies. It only copies frames that no reader still needs, as SQLite's own
does. The next write after a checkpoint that caught up starts the WAL again from its
beginning; should writes keep coming during every checkpoint, the WAL would grow, so
past ``truncate_bytes`` the checkpoint is a ``TRUNCATE`` one, which waits for the
writer and resets the file (it has the writers' busy timeout).

**Entering WAL** (``enter_wal``). A new file, or one from before WAL, starts in
rollback-journal mode, and switching it needs an exclusive lock. While another
connection holds the write lock, SQLite refuses the switch at once, without waiting its
busy timeout, because the two could otherwise deadlock: so server processes opening such
a file together got "database is locked" about once in 200 starts. The switch is retried
until the busy timeout instead.

**Transactions** (``write_transaction``, ``begin_now``). Writes take the write lock
up front (``BEGIN IMMEDIATE``), waiting up to the busy timeout where another
connection holds it. ``begin_now`` is for the event loop, which must not wait: it
answers at once, with the lock or without.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path

__all__ = ["Checkpointer", "ReaderPool", "begin_now", "enter_wal", "write_transaction"]

log = logging.getLogger(__name__)

INTERVAL_S = 1.0
TRUNCATE_BYTES = 64 * 2**20
_WAL_RETRY_S = 0.005


@contextlib.contextmanager
def write_transaction(conn: sqlite3.Connection, begun: bool = False) -> Iterator[None]:
    """A write transaction, committed at the end or rolled back on an error; ``begun``: by ``begin_now``."""
    # IMMEDIATE takes the write lock up front, so a busy file fails at BEGIN (after
    # busy_timeout) instead of half-way through a batch.
    if not begun:
        conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        if conn.in_transaction:
            conn.rollback()
        raise
    conn.execute("COMMIT")


def begin_now(conn: sqlite3.Connection, busy_timeout_ms: int) -> bool:
    """``BEGIN IMMEDIATE`` without waiting: ``False`` at once where another connection
    holds the write lock. ``busy_timeout_ms``: the connection's own, put back after."""
    conn.execute("PRAGMA busy_timeout = 0")
    try:
        conn.execute("BEGIN IMMEDIATE")
    except sqlite3.OperationalError as exc:
        if exc.sqlite_errorcode & 0xFF == sqlite3.SQLITE_BUSY:
            return False
        raise
    finally:
        conn.execute(f"PRAGMA busy_timeout = {busy_timeout_ms}")
    return True


def enter_wal(conn: sqlite3.Connection, timeout_ms: int) -> str:
    """Put ``conn``'s file in WAL mode, retrying while other connections hold it for up to
    ``timeout_ms``; returns the journal mode SQLite reports (not ``"wal"`` where refused)."""
    deadline = time.monotonic() + timeout_ms / 1000
    while True:
        try:
            (mode,) = conn.execute("PRAGMA journal_mode = WAL").fetchone()
            return str(mode)
        except sqlite3.OperationalError as exc:
            busy = exc.sqlite_errorcode & 0xFF == sqlite3.SQLITE_BUSY  # the primary code of an extended one
            if not busy or time.monotonic() >= deadline:
                raise
            time.sleep(_WAL_RETRY_S)


class Checkpointer:
    """Checkpoints the WAL of ``path`` in a daemon thread; ``wrote()`` after each commit."""

    def __init__(
        self,
        path: Path,
        busy_timeout_ms: int,
        interval_s: float = INTERVAL_S,
        truncate_bytes: int = TRUNCATE_BYTES,
    ) -> None:
        self.path = path
        self.wal = path.with_name(path.name + "-wal")
        self._busy_timeout_ms = busy_timeout_ms
        self._interval_s = interval_s
        self._truncate_bytes = truncate_bytes
        self._dirty = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.execute(f"PRAGMA busy_timeout = {self._busy_timeout_ms}")
        self._thread = threading.Thread(target=self._run, args=(conn,), name="sqlite-checkpoint", daemon=True)
        self._thread.start()

    def wrote(self) -> None:
        self._dirty.set()

    def stop(self) -> None:
        """Stop the thread; closing the last connection checkpoints what is left."""
        self._stopping.set()
        self._dirty.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _run(self, conn: sqlite3.Connection) -> None:
        try:
            while True:
                self._dirty.wait()
                if self._stopping.wait(self._interval_s):
                    return
                self._dirty.clear()
                if self._stopping.is_set():
                    # stop() set both events after the wait above and before this clear,
                    # which took its wake-up away: the wait above would never return again,
                    # and stop()'s join would hang the server's shutdown for ever.
                    return
                try:
                    self.checkpoint(conn)
                except sqlite3.Error as exc:  # a busy or failing file: the next write tries again
                    log.warning("checkpointing %s failed: %s", self.path, exc)
                    self._dirty.set()
        finally:
            conn.close()

    def checkpoint(self, conn: sqlite3.Connection) -> None:
        try:
            size = self.wal.stat().st_size
        except FileNotFoundError:
            return
        mode = "TRUNCATE" if size >= self._truncate_bytes else "PASSIVE"
        conn.execute(f"PRAGMA wal_checkpoint({mode})").fetchall()


class ReaderPool:
    """Read-only connections for reads running in worker threads, reused across calls.

    A connection is used by one thread at a time; WAL lets them read while the writer
    writes. A connection in use when the pool closes is closed when it comes back.
    """

    def __init__(self, uri: str, busy_timeout_ms: int) -> None:
        self._uri = uri
        self._busy_timeout_ms = busy_timeout_ms
        self._idle: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self._closed = False

    @contextlib.contextmanager
    def connection(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            if self._closed:
                raise RuntimeError("inspection store is closed")
            conn = self._idle.pop() if self._idle else None
        if conn is None:
            conn = sqlite3.connect(self._uri, uri=True, isolation_level=None, check_same_thread=False)
            conn.execute(f"PRAGMA busy_timeout = {self._busy_timeout_ms}")
        try:
            yield conn
        finally:
            if conn.in_transaction:
                conn.rollback()
            with self._lock:
                keep = not self._closed
                if keep:
                    self._idle.append(conn)
            if not keep:
                conn.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()
