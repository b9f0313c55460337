"""The embedded inspection store: one SQLite file, written in the background.

How it behaves, and why:

* **put never touches the disk.** ``put`` serialises the record to compact JSON (so a
  record that cannot be stored fails at once, in the caller) and appends it to an
  in-memory queue. One writer task takes up to ``batch_size`` records at a time and
  writes them with one ``executemany`` in one transaction, in a worker thread
  (``asyncio.to_thread``), so the event loop never waits on SQLite or the disk. A
  batch is written when it is full, when its oldest record has waited
  ``flush_interval_s``, or at once when someone calls ``flush``/``close``.
  Serialising stays on the caller's side because moving it would not help: the C
  JSON encoder holds the GIL, so in a thread it stalls the loop just as long (about
  30 ms per MB of JSON), while zlib, which releases the GIL, runs in the writer thread.
* **Queued records are readable.** Records stay in memory, keyed by id, until their
  transaction has committed; ``get`` looks there first and ``list`` merges them
  with the file, so a record can be read as soon as ``put`` returns.
* **Back-pressure, never loss.** When ``max_pending`` records or
  ``max_pending_bytes`` of serialised data are queued (the disk has fallen behind or
  is failing), ``put`` waits until the writer has made room. Nothing is dropped to
  make room: an inference whose record cannot be queued waits for it, and callers
  that must not wait can bound ``put`` with ``asyncio.wait_for``. A single record
  larger than ``max_pending_bytes`` is still accepted when the queue is empty.
* **Write failures are retried.** A failed batch stays queued (and readable) and is
  retried with exponential back-off up to ``_RETRY_MAX_S``. During ``close`` a batch
  is tried ``_CLOSE_ATTEMPTS`` times and then given up on with an error naming how
  many records were lost, so shutdown cannot hang on a broken disk.
* **Retention** (``max_age_s``, ``max_records``) runs inside ``start()`` and then
  every ``retention_interval_s`` in the background, or when ``enforce_retention`` is
  called. It deletes the oldest records by ``created_at``: those older than
  ``max_age_s``, then all but the newest ``max_records``. Between runs the store can
  hold records past either limit; queued records count once they are written.
  Freed pages are reused by later writes; the file does not shrink.
* **Durability.** WAL journal with ``synchronous=NORMAL``: a committed batch survives
  a crash of the process; a power loss can lose the last batches before the WAL is
  checkpointed. ``flush`` returns once queued records are committed.
* **On disk.** One table, ``inspections``. ``created_at`` is an integer of
  microseconds since the Unix epoch (UTC), so it sorts and compares exactly.
  ``prediction`` is compact JSON text. ``connectivity`` is compact JSON compressed
  with zlib (level 1) in a BLOB: on the registered models this is 2.1-3.7x smaller
  than the JSON (DG-Net ResNet-50: 2,336 -> 753 bytes), and level 6 gains under 10%
  more for 3-7x the CPU on large payloads.
  ``PRAGMA user_version`` holds the schema version; a file from a newer schema is
  refused rather than misread.
* **Shared graphs are kept once.** A GloRe unit's A_g is the same in every record of a
  model version, so a record is stored without it, and table ``graphs`` keeps each
  matrix once under its ``adjacency_digest`` (zlib-compressed JSON), written in the same
  transaction as the first record that needs it. Reads put it back, so what is read
  equals what was put. A GloRe-ResNet-50 record (4.1 MB of compact JSON, 1.9 MB
  compressed whole) is stored in 800 bytes, plus its three graphs (1.9 MB) once
  (``benchmarks/inspection_storage.py``). Graphs
  outlive the records that named them: there is one per unit per model version, not
  one per image. Schema 2 added the table; schema 1 files open and gain it.

One process owns the file: several replicas need a shared store (see
``InspectionStore``), not several writers on one SQLite file.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import itertools
import json
import logging
import os
import sqlite3
import threading
import zlib
from collections import deque
from functools import partial
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

from dgserve.errors import InspectionNotFoundError
from dgserve.inspection.base import InspectionRecord, InspectionStore, utc_now
from dgserve.inspection.graphs import GraphTextCache, attach_shared, split_shared

__all__ = ["SQLiteInspectionStore"]

log = logging.getLogger(__name__)

_SCHEMA_VERSION = 2
_SCHEMA = """
CREATE TABLE IF NOT EXISTS inspections (
    id            TEXT    NOT NULL PRIMARY KEY,
    model         TEXT    NOT NULL,
    version       INTEGER NOT NULL,
    task          TEXT    NOT NULL,
    created_at_us INTEGER NOT NULL,
    prediction    TEXT    NOT NULL,
    connectivity  BLOB    NOT NULL
);
-- id is in both indexes so that listing pages by (created_at_us, id) never sorts.
CREATE INDEX IF NOT EXISTS inspections_created ON inspections (created_at_us, id);
CREATE INDEX IF NOT EXISTS inspections_model_created ON inspections (model, created_at_us, id);
CREATE TABLE IF NOT EXISTS graphs (
    digest TEXT NOT NULL PRIMARY KEY,
    body   BLOB NOT NULL
);
"""
_COLUMNS = "id, model, version, task, created_at_us, prediction"
_INSERT = (
    "INSERT OR REPLACE INTO inspections "
    "(id, model, version, task, created_at_us, prediction, connectivity) VALUES (?, ?, ?, ?, ?, ?, ?)"
)

# Level 1 is within 10% of level 6's size on connectivity JSON at a fraction of the CPU.
_ZLIB_LEVEL = 1
# Another process (a backup, the sqlite3 shell) may hold the file briefly.
_BUSY_TIMEOUT_MS = 5_000
# Under SQLite's lowest historical limit on bound parameters (999).
_ID_CHUNK = 500
_RETRY_MIN_S = 0.05
_RETRY_MAX_S = 5.0
_CLOSE_ATTEMPTS = 3
# Encoded graphs kept in memory: a GloRe-ResNet-50's units take about 7 MB.
_GRAPH_CACHE_BYTES = 64 * 2**20

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_ONE_US = timedelta(microseconds=1)

_State = Literal["new", "open", "closing", "closed"]
_Key = tuple[int, str]


def _to_us(value: datetime, what: str) -> int:
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{what} must be timezone-aware, got naive {value.isoformat()}")
    return (value - _EPOCH) // _ONE_US


def _from_us(us: int) -> datetime:
    return _EPOCH + timedelta(microseconds=us)


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


@dataclass(slots=True)
class _Pending:
    """A queued record, already serialised.

    Keeping the JSON rather than the caller's objects bounds memory by the text's size
    (a Python float costs 32 bytes, its JSON about 19) and means a caller that mutates
    its dicts after ``put`` cannot change what is stored.
    """

    id: str
    model: str
    version: int
    task: str
    created_at_us: int
    prediction: str
    connectivity: str  # without the shared graphs
    graphs: dict[str, str]  # digest -> JSON text of each shared graph it names
    seq: int = 0
    enqueued_at: float = 0.0

    @classmethod
    def encode(cls, record: InspectionRecord, cache: GraphTextCache) -> _Pending:
        stored, shared = split_shared(record.connectivity)
        graphs: dict[str, str] = {}
        if shared:
            # Without its graphs the record is small, so encoding it again is cheap; each
            # graph is encoded once and then found in the cache, shared by every record.
            connectivity = _dumps(stored)
            for digest, matrix in shared.items():
                text = cache.get(digest)
                if text is None:
                    text = _dumps(matrix)
                    cache.put(digest, text)
                graphs[digest] = text
        elif record.connectivity_json is not None:
            connectivity = record.connectivity_json
        else:
            connectivity = _dumps(record.connectivity)
        return cls(
            id=record.id,
            model=record.model,
            version=int(record.version),
            task=record.task,
            created_at_us=_to_us(record.created_at, "created_at"),
            prediction=_dumps(record.prediction),
            connectivity=connectivity,
            graphs=graphs,
        )

    @property
    def key(self) -> _Key:
        return (self.created_at_us, self.id)

    @property
    def nbytes(self) -> int:
        return len(self.prediction) + len(self.connectivity)

    def params(self) -> tuple[str, str, int, str, int, str, bytes]:
        blob = zlib.compress(self.connectivity.encode(), _ZLIB_LEVEL)
        return (self.id, self.model, self.version, self.task, self.created_at_us, self.prediction, blob)

    def to_record(self, include_connectivity: bool) -> InspectionRecord:
        return InspectionRecord(
            id=self.id,
            model=self.model,
            version=self.version,
            task=self.task,
            created_at=_from_us(self.created_at_us),
            prediction=json.loads(self.prediction),
            connectivity=(
                attach_shared(json.loads(self.connectivity), lambda digest: json.loads(self.graphs[digest]))
                if include_connectivity
                else {}
            ),
        )


def _record_from_row(row: Sequence[Any], graph: Callable[[str], Any]) -> InspectionRecord:
    """A row of ``_COLUMNS``, optionally followed by the connectivity BLOB; ``graph(digest)``
    gives a shared graph."""
    connectivity = attach_shared(json.loads(zlib.decompress(row[6])), graph) if len(row) > 6 else {}
    return InspectionRecord(
        id=row[0],
        model=row[1],
        version=row[2],
        task=row[3],
        created_at=_from_us(row[4]),
        prediction=json.loads(row[5]),
        connectivity=connectivity,
    )


@contextlib.contextmanager
def _write_transaction(conn: sqlite3.Connection) -> Iterator[None]:
    # IMMEDIATE takes the write lock up front, so a busy file fails at BEGIN (after
    # busy_timeout) instead of half-way through a batch.
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        if conn.in_transaction:
            conn.rollback()
        raise
    conn.execute("COMMIT")


class _ReaderPool:
    """Read-only connections for reads running in worker threads, reused across calls.

    A connection is used by one thread at a time; WAL lets them read while the writer
    writes. A connection in use when the pool closes is closed when it comes back.
    """

    def __init__(self, uri: str) -> None:
        self._uri = uri
        self._idle: builtins.list[sqlite3.Connection] = []
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
            conn.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
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


class SQLiteInspectionStore(InspectionStore):
    """Inspection records in one SQLite file; see the module docstring for behaviour.

    ``max_age_s``/``max_records``: retention limits (``None``: unlimited).
    ``batch_size``/``flush_interval_s``: the most records per transaction, and the
    longest a record waits in memory before its batch is written.
    ``max_pending``/``max_pending_bytes``: when ``put`` starts to wait.
    ``retention_interval_s``: how often retention runs in the background.
    ``page_size``: rows fetched per query while listing.
    ``clock``: "now" for ``max_age_s`` (tests inject one).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        max_age_s: float | None = None,
        max_records: int | None = None,
        batch_size: int = 256,
        flush_interval_s: float = 0.05,
        max_pending: int = 10_000,
        max_pending_bytes: int = 256 * 2**20,
        retention_interval_s: float = 30.0,
        page_size: int = 256,
        clock: Callable[[], datetime] = utc_now,
    ) -> None:
        if max_age_s is not None and not max_age_s > 0:
            raise ValueError(f"max_age_s must be positive or None, got {max_age_s}")
        if max_records is not None and max_records < 1:
            raise ValueError(f"max_records must be at least 1 or None, got {max_records}")
        for name, value in (("batch_size", batch_size), ("max_pending", max_pending), ("page_size", page_size)):
            if value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        if max_pending_bytes < 1:
            raise ValueError(f"max_pending_bytes must be at least 1, got {max_pending_bytes}")
        if flush_interval_s < 0:
            raise ValueError(f"flush_interval_s must not be negative, got {flush_interval_s}")
        if not retention_interval_s > 0:
            raise ValueError(f"retention_interval_s must be positive, got {retention_interval_s}")

        self.path = Path(path)
        self.max_age_s = max_age_s
        self.max_records = max_records
        self._batch_size = batch_size
        self._flush_interval_s = flush_interval_s
        self._max_pending = max_pending
        self._max_pending_bytes = max_pending_bytes
        self._retention_interval_s = retention_interval_s
        self._page_size = page_size
        self._clock = clock

        self._state: _State = "new"
        # Queue order is write order; _pending maps an id to its newest queued version.
        self._queue: deque[_Pending] = deque()
        self._pending: dict[str, _Pending] = {}
        self._pending_bytes = 0
        self._seq = 0  # seq of the newest queued record
        self._durable_seq = 0  # seq of the newest committed record; commits happen in queue order
        self._flush_target = 0
        self._space_waiters = 0
        self._wake = asyncio.Event()
        # Replaced on every change waiters care about (see _pulse), so a waiter that
        # grabbed the old one is woken exactly once per change.
        self._progress = asyncio.Event()
        self._stop_retention = asyncio.Event()
        self._writer_error: BaseException | None = None
        self._graph_texts = GraphTextCache(_GRAPH_CACHE_BYTES)

        self._conn_lock = threading.Lock()  # the writer connection, across worker threads
        self._writer_conn: sqlite3.Connection | None = None
        self._readers: _ReaderPool | None = None
        self._writer_task: asyncio.Task[None] | None = None
        self._retention_task: asyncio.Task[None] | None = None
        self._closer: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return f"SQLiteInspectionStore({str(self.path)!r}, state={self._state})"

    @property
    def pending(self) -> int:
        """Records queued and not yet committed (for metrics)."""
        return len(self._queue)

    # --- lifecycle ------------------------------------------------------------------

    async def start(self) -> None:
        if self._state != "new":
            raise RuntimeError(f"{self!r} can only be started once")
        await asyncio.to_thread(self._open)
        self._state = "open"
        self._writer_task = asyncio.create_task(self._write_loop(), name=f"inspection-writer {self.path}")
        self._writer_task.add_done_callback(self._on_writer_done)
        if self.max_age_s is not None or self.max_records is not None:
            # Before serving, so a file kept under looser limits is trimmed by the time
            # start() returns. A failure here is not fatal: the background pass retries.
            try:
                await self.enforce_retention()
            except Exception:
                log.exception("inspection retention on %s failed at start; will try again", self.path)
            self._retention_task = asyncio.create_task(self._retention_loop(), name=f"inspection-retention {self.path}")

    async def close(self) -> None:
        if self._state == "new":
            self._state = "closed"
            return
        if self._closer is None:
            self._closer = asyncio.create_task(self._shutdown())
        # Shielded: a caller that gives up waiting must not leave connections half-closed.
        await asyncio.shield(self._closer)

    async def _shutdown(self) -> None:
        self._state = "closing"
        self._wake.set()
        self._stop_retention.set()
        try:
            tasks = [t for t in (self._retention_task, self._writer_task) if t is not None]
            if tasks:
                await asyncio.wait(tasks)
        finally:
            await asyncio.to_thread(self._close_connections)
            self._state = "closed"
            self._pulse()

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            conn.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
            (mode,) = conn.execute("PRAGMA journal_mode = WAL").fetchone()
            if str(mode).lower() != "wal":
                raise RuntimeError(
                    f"{self.path}: SQLite refused WAL mode (journal_mode is {mode!r}); "
                    "the inspection store needs a local filesystem"
                )
            conn.execute("PRAGMA synchronous = NORMAL")
            (version,) = conn.execute("PRAGMA user_version").fetchone()
            if version > _SCHEMA_VERSION:
                raise RuntimeError(
                    f"{self.path} has inspection schema {version}; this dgserve reads up to {_SCHEMA_VERSION}"
                )
            with _write_transaction(conn):
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {_SCHEMA_VERSION}")
            readers = _ReaderPool(f"{self.path.resolve().as_uri()}?mode=ro")
        except BaseException:
            conn.close()
            raise
        self._writer_conn = conn
        self._readers = readers

    def _close_connections(self) -> None:
        if self._readers is not None:
            self._readers.close()
        with self._conn_lock:
            conn, self._writer_conn = self._writer_conn, None
            if conn is not None:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("PRAGMA optimize")
                conn.close()

    def _check_readable(self) -> None:
        if self._state not in ("open", "closing"):
            raise RuntimeError(f"{self!r} is not open")

    # --- writing --------------------------------------------------------------------

    async def put(self, record: InspectionRecord) -> None:
        if self._state != "open":
            raise RuntimeError(f"{self!r} does not accept records")
        if self._writer_error is not None:
            raise RuntimeError(f"{self!r}: the writer has stopped") from self._writer_error
        pending = _Pending.encode(record, self._graph_texts)
        if self._full():
            self._space_waiters += 1
            self._wake.set()
            try:
                await self._wait_until(lambda: not self._full())
            finally:
                self._space_waiters -= 1
        self._seq += 1
        pending.seq = self._seq
        pending.enqueued_at = asyncio.get_running_loop().time()
        self._queue.append(pending)
        self._pending[pending.id] = pending
        self._pending_bytes += pending.nbytes
        if len(self._queue) == 1 or len(self._queue) >= self._batch_size:
            self._wake.set()

    async def flush(self) -> None:
        target = self._seq
        if self._durable_seq >= target:
            return
        self._flush_target = max(self._flush_target, target)
        self._wake.set()
        await self._wait_until(lambda: self._durable_seq >= target)

    def _full(self) -> bool:
        return bool(self._queue) and (
            len(self._queue) >= self._max_pending or self._pending_bytes >= self._max_pending_bytes
        )

    def _pulse(self) -> None:
        event, self._progress = self._progress, asyncio.Event()
        event.set()

    async def _wait_until(self, done: Callable[[], bool]) -> None:
        while not done():
            if self._writer_error is not None:
                raise RuntimeError(f"{self!r}: the writer has stopped") from self._writer_error
            await self._progress.wait()

    def _due_in(self, now: float) -> float:
        """Seconds until the head of the queue must be written; <= 0 means now."""
        if (
            len(self._queue) >= self._batch_size
            or self._flush_target > self._durable_seq
            or self._space_waiters
            or self._state != "open"
        ):
            return 0.0
        return self._queue[0].enqueued_at + self._flush_interval_s - now

    async def _write_loop(self) -> None:
        loop = asyncio.get_running_loop()
        failures = 0
        while True:
            self._wake.clear()
            if not self._queue:
                # A put waiting for room has not appended yet; leaving now would strand it.
                if self._state != "open" and not self._space_waiters:
                    return
                await self._wake.wait()
                continue
            wait_s = self._due_in(loop.time())
            if wait_s > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), wait_s)
                continue

            batch = list(itertools.islice(self._queue, self._batch_size))
            try:
                await asyncio.to_thread(self._write_batch, batch)
            except Exception as exc:
                failures += 1
                if self._state != "open" and failures >= _CLOSE_ATTEMPTS:
                    log.error(
                        "closing %s: giving up after %d failed writes; %d inspection records are lost",
                        self.path,
                        failures,
                        len(self._queue),
                        exc_info=exc,
                    )
                    self._writer_error = exc
                    return
                delay = min(_RETRY_MIN_S * 2 ** (failures - 1), _RETRY_MAX_S)
                log.warning(
                    "writing %d inspection records to %s failed (%s); they stay queued, retrying in %.2fs",
                    len(batch),
                    self.path,
                    exc,
                    delay,
                )
                await asyncio.sleep(delay)
                continue
            failures = 0
            for written in batch:
                self._queue.popleft()
                self._pending_bytes -= written.nbytes
                # A newer put of the same id is still queued: keep serving that one.
                if self._pending.get(written.id) is written:
                    del self._pending[written.id]
            self._durable_seq = batch[-1].seq
            self._pulse()

    def _write_batch(self, batch: Sequence[_Pending]) -> None:
        # Compress before BEGIN: the write lock is held only for the inserts.
        rows = [p.params() for p in batch]
        texts = {digest: text for p in batch for digest, text in p.graphs.items()}
        stored: set[str] = set()
        if texts:
            with self._conn_lock:
                conn = self._writer()
                stored = {d for d in texts if conn.execute("SELECT 1 FROM graphs WHERE digest = ?", (d,)).fetchone()}
        # Only this store writes, and it never deletes a graph, so one found above is still
        # there at COMMIT; the new ones are compressed outside the lock, like the records.
        graphs = [(d, zlib.compress(text.encode(), _ZLIB_LEVEL)) for d, text in texts.items() if d not in stored]
        with self._conn_lock:
            conn = self._writer()
            with _write_transaction(conn):
                conn.executemany("INSERT OR IGNORE INTO graphs (digest, body) VALUES (?, ?)", graphs)
                conn.executemany(_INSERT, rows)

    def _writer(self) -> sqlite3.Connection:
        if self._writer_conn is None:
            raise RuntimeError(f"{self!r} is not open")
        return self._writer_conn

    def _on_writer_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            self._writer_error = self._writer_error or RuntimeError("the writer task was cancelled")
        elif (exc := task.exception()) is not None:
            log.error("inspection writer for %s crashed", self.path, exc_info=exc)
            self._writer_error = exc
        self._pulse()

    # --- retention --------------------------------------------------------------------

    async def enforce_retention(self) -> int:
        """Apply ``max_age_s`` and ``max_records`` to written records now; returns how
        many were deleted."""
        self._check_readable()
        if self.max_age_s is None and self.max_records is None:
            return 0
        now_us = _to_us(self._clock(), "clock()")
        deleted = await asyncio.to_thread(self._delete_expired, now_us)
        if deleted:
            log.info("inspection retention deleted %d records from %s", deleted, self.path)
        return deleted

    def _delete_expired(self, now_us: int) -> int:
        deleted = 0
        with self._conn_lock:
            conn = self._writer()
            with _write_transaction(conn):
                if self.max_age_s is not None:
                    cutoff = now_us - round(self.max_age_s * 1_000_000)
                    deleted += conn.execute("DELETE FROM inspections WHERE created_at_us < ?", (cutoff,)).rowcount
                if self.max_records is not None:
                    # The newest record that does not fit; it and everything older go.
                    row = conn.execute(
                        "SELECT created_at_us, id FROM inspections "
                        "ORDER BY created_at_us DESC, id DESC LIMIT 1 OFFSET ?",
                        (self.max_records,),
                    ).fetchone()
                    if row is not None:
                        deleted += conn.execute(
                            "DELETE FROM inspections WHERE (created_at_us, id) <= (?, ?)", row
                        ).rowcount
        return deleted

    async def _retention_loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop_retention.wait(), self._retention_interval_s)
            if self._state != "open":
                return
            try:
                await self.enforce_retention()
            except Exception:
                log.exception("inspection retention on %s failed; will try again", self.path)

    # --- reading ----------------------------------------------------------------------

    def _readers_pool(self) -> _ReaderPool:
        if self._readers is None:
            raise RuntimeError(f"{self!r} is not open")
        return self._readers

    async def get(self, inspection_id: str) -> InspectionRecord:
        self._check_readable()
        # Removed from _pending only after its commit, so a miss here means the file
        # has it (or nobody stored it): there is no window in which it is in neither.
        pending = self._pending.get(inspection_id)
        if pending is not None:
            return pending.to_record(include_connectivity=True)
        record = await asyncio.to_thread(self._get_row, inspection_id)
        if record is None:
            raise InspectionNotFoundError(inspection_id)
        return record

    def _get_row(self, inspection_id: str) -> InspectionRecord | None:
        with self._readers_pool().connection() as conn:
            row = conn.execute(
                f"SELECT {_COLUMNS}, connectivity FROM inspections WHERE id = ?", (inspection_id,)
            ).fetchone()
            return None if row is None else _record_from_row(row, partial(self._graph, conn))

    def _graph(self, conn: sqlite3.Connection, digest: str) -> Any:
        """A shared graph by digest, from the cache or else the file (read in a worker thread)."""
        text = self._graph_texts.get(digest)
        if text is None:
            row = conn.execute("SELECT body FROM graphs WHERE digest = ?", (digest,)).fetchone()
            if row is None:
                raise RuntimeError(f"{self.path}: a record names graph {digest}, which the file lacks")
            text = zlib.decompress(row[0]).decode()
            self._graph_texts.put(digest, text)
        return json.loads(text)

    async def list(
        self,
        *,
        model: str | None = None,
        since: datetime | None = None,
        limit: int = 100,
        include_connectivity: bool = True,
    ) -> AsyncIterator[InspectionRecord]:
        """See ``InspectionStore.list``.

        Queued records are taken as of the first iteration and merged in order with
        pages read from the file. A record written while the listing runs can show up
        in both; it is yielded once.
        """
        if limit < 0:
            raise ValueError(f"limit must not be negative, got {limit}")
        self._check_readable()
        since_us = None if since is None else _to_us(since, "since")
        queued = sorted(
            (
                p
                for p in self._pending.values()
                if (model is None or p.model == model) and (since_us is None or p.created_at_us >= since_us)
            ),
            key=lambda p: p.key,
        )
        page: deque[tuple[_Key, InspectionRecord]] = deque()
        cursor: _Key | None = None
        file_done = False
        queued_at = 0
        last: _Key | None = None
        yielded = 0
        while yielded < limit:
            if not page and not file_done:
                want = min(self._page_size, limit - yielded)
                rows = await asyncio.to_thread(self._read_page, model, since_us, cursor, want, include_connectivity)
                page.extend(rows)
                file_done = len(rows) < want
                if rows:
                    cursor = rows[-1][0]
            head = page[0][0] if page else None
            if head is None and queued_at == len(queued):
                return
            # On a tie the queued copy goes first: it is the newer one if the id was put again.
            if head is not None and (queued_at == len(queued) or head < queued[queued_at].key):
                key, record = page.popleft()
            else:
                key, record = queued[queued_at].key, queued[queued_at].to_record(include_connectivity)
                queued_at += 1
            if key == last:
                continue
            last = key
            yield record
            yielded += 1

    def _read_page(
        self,
        model: str | None,
        since_us: int | None,
        after: _Key | None,
        limit: int,
        include_connectivity: bool,
    ) -> builtins.list[tuple[_Key, InspectionRecord]]:
        # Keyset pagination: each page starts after the last (created_at_us, id) seen,
        # an index range scan however deep the listing goes (OFFSET would rescan).
        where: builtins.list[str] = []
        params: builtins.list[Any] = []
        if model is not None:
            where.append("model = ?")
            params.append(model)
        if after is not None:
            where.append("(created_at_us, id) > (?, ?)")
            params.extend(after)
        elif since_us is not None:
            where.append("created_at_us >= ?")
            params.append(since_us)
        columns = f"{_COLUMNS}, connectivity" if include_connectivity else _COLUMNS
        sql = f"SELECT {columns} FROM inspections"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY created_at_us, id LIMIT ?"
        params.append(limit)
        with self._readers_pool().connection() as conn:
            rows = conn.execute(sql, params).fetchall()
            graph = partial(self._graph, conn)
            return [((row[4], row[0]), _record_from_row(row, graph)) for row in rows]

    async def count(self) -> int:
        self._check_readable()
        queued_ids = list(self._pending)
        return await asyncio.to_thread(self._count, queued_ids)

    def _count(self, queued_ids: Sequence[str]) -> int:
        # One read transaction, so a batch committed after queued_ids was taken is seen
        # by both queries and counted once.
        with self._readers_pool().connection() as conn:
            conn.execute("BEGIN")
            (stored,) = conn.execute("SELECT COUNT(*) FROM inspections").fetchone()
            overlap = 0
            for start in range(0, len(queued_ids), _ID_CHUNK):
                chunk = queued_ids[start : start + _ID_CHUNK]
                marks = ",".join("?" * len(chunk))
                (n,) = conn.execute(f"SELECT COUNT(*) FROM inspections WHERE id IN ({marks})", chunk).fetchone()
                overlap += n
            conn.execute("COMMIT")
        return int(stored) + len(queued_ids) - int(overlap)
