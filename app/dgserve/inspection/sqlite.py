"""The embedded inspection backend: one SQLite file.

``InspectionStore`` (``writebehind.py``) queues records and calls this backend in
worker threads; what is specific to SQLite, and why:

* **Durability.** WAL journal with ``synchronous=NORMAL``: a committed batch survives
  a crash of the process; a power loss can lose the last batches before the WAL is
  checkpointed. Checkpoints run in a thread of their own, never in a commit that an
  answer waits for (``sqlite_connections.py``). A file system on which SQLite refuses
  WAL (some network mounts) is refused. One writer connection, behind a lock, writes each batch in one
  ``BEGIN IMMEDIATE`` transaction; reads use a pool of read-only connections, which
  WAL lets read while the writer writes. A small batch that an answer waits on is
  written on the event loop when the write lock is free (``write_batch_now``).
* **On disk.** Table ``inspections``. ``created_at_us`` is an integer of microseconds
  since the Unix epoch (UTC), so it sorts and compares exactly; both indexes end in
  ``id``, so listing pages by ``(created_at_us, id)`` is an index range scan, however
  deep the listing goes. ``prediction`` is compact JSON text. ``connectivity`` is
  compact JSON compressed with zlib (level 1) in a BLOB: on the registered models this
  is 2.1-3.7x smaller than the JSON (DG-Net ResNet-50: 2,336 -> 753 bytes), and level 6
  gains under 10% more for 3-7x the CPU on large payloads. ``PRAGMA user_version``
  holds the schema version; a file from a newer schema is refused rather than misread.
* **Shared graphs.** Table ``graphs`` keeps each shared matrix once under its
  ``adjacency_digest`` (zlib-compressed JSON), written in the same transaction as the
  first record that needs it. A GloRe-ResNet-50 record (4.1 MB of compact JSON, 1.9 MB
  compressed whole) is stored in 800 bytes, plus its three graphs (1.9 MB) once
  (``benchmarks/inspection_storage.py``). Schema 2 added the table; schema 1 files
  open and gain it.
* **Analysis.** Schema 3 adds each record's tags, top label and score, and its numbers
  (``features``, float32 in a layout kept once), the ``inspection_tags`` index, and the
  hourly rollups that summaries read (``rollups.py``), all written in the records'
  transaction. Older files gain the columns, and their records their numbers, as they
  open (``sqlrows.backfill``).
* **Exports** (schema 4) read ``analysis_rows``, a narrow copy of each record's analysis
  columns keyed by (model, created_at_us, id) and ``WITHOUT ROWID``, so one model's
  records are read in key order from contiguous pages, about 400 bytes a record instead
  of the whole row. Written and deleted in the records' transactions; older files fill
  it as they open. Schema 4 also adds ``thumbnails`` (id, JPEG), written only with
  ``DGSERVE_INSPECTION_THUMBNAILS`` on, read only by ``get``.
* **Retention** deletes rows; freed pages are reused by later writes, and the file
  does not shrink.

One process owns the file: several replicas need a shared backend, not several
writers on one SQLite file.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
from collections.abc import Collection, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from dgserve.analysis.summary import Selection
from dgserve.inspection import rollups
from dgserve.inspection.sqlite_connections import Checkpointer, ReaderPool, begin_now, enter_wal, write_transaction
from dgserve.inspection.backend import AnalysisPage, Filters, InspectionBackend, PageQuery, StoredRecord
from dgserve.inspection.sqlrows import (
    ANALYSIS_INSERT_COLUMNS,
    ANALYSIS_TABLE,
    FILL_ANALYSIS,
    GET_COLUMNS,
    INSERT_COLUMNS,
    INSERT_THUMBNAIL_COLUMNS,
    THUMBNAILS_TABLE,
    analysis_page,
    analysis_page_query,
    analysis_params,
    backfill,
    compress,
    decompress,
    delete_expired,
    forget_replaced,
    from_row,
    page_query,
    record_params,
    thumbnail_params,
)
from dgserve.inspection.writebehind import InspectionStore

__all__ = ["SQLiteBackend", "SQLiteInspectionStore"]

_SCHEMA_VERSION = 4
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
# Schema 3: analysis (rollups.py). Run once, on a file below version 3.
_SCHEMA_3 = """
ALTER TABLE inspections ADD COLUMN tags TEXT NOT NULL DEFAULT '{}';
ALTER TABLE inspections ADD COLUMN label TEXT NOT NULL DEFAULT '';
ALTER TABLE inspections ADD COLUMN score REAL;
ALTER TABLE inspections ADD COLUMN layout TEXT;
ALTER TABLE inspections ADD COLUMN features BLOB;
CREATE TABLE inspection_tags (
    id            TEXT    NOT NULL,
    key           TEXT    NOT NULL,
    value         TEXT    NOT NULL,
    created_at_us INTEGER NOT NULL,
    PRIMARY KEY (id, key)
);
CREATE INDEX inspection_tags_value ON inspection_tags (key, value, created_at_us, id);
CREATE INDEX inspection_tags_created ON inspection_tags (created_at_us, id);
CREATE TABLE layouts (digest TEXT NOT NULL PRIMARY KEY, body TEXT NOT NULL);
CREATE TABLE patterns (id INTEGER NOT NULL PRIMARY KEY, bits BLOB NOT NULL);
CREATE TABLE rollups (
    model     TEXT    NOT NULL,
    version   INTEGER NOT NULL,
    bucket_us INTEGER NOT NULL,
    label     TEXT    NOT NULL,
    tags      TEXT    NOT NULL,
    layout    TEXT    NOT NULL,
    count     INTEGER NOT NULL,
    stats     BLOB    NOT NULL,
    patterns  BLOB    NOT NULL,
    PRIMARY KEY (model, version, bucket_us, label, tags, layout)
)
"""
# Schema 4: the narrow table exports read (``sqlrows.ANALYSIS_TABLE``), clustered by its
# key, and the opt-in thumbnails.
_SCHEMA_4_THUMBNAILS = f"CREATE TABLE {THUMBNAILS_TABLE} (id TEXT NOT NULL PRIMARY KEY, image BLOB NOT NULL)"
_SCHEMA_4 = f"""
CREATE TABLE {ANALYSIS_TABLE} (
    model TEXT NOT NULL, created_at_us INTEGER NOT NULL, id TEXT NOT NULL,
    version INTEGER NOT NULL, task TEXT NOT NULL, label TEXT NOT NULL, score REAL, tags TEXT NOT NULL,
    layout TEXT, features BLOB,
    PRIMARY KEY (model, created_at_us, id)
) WITHOUT ROWID
"""
_INSERT = f"INSERT OR REPLACE INTO inspections ({INSERT_COLUMNS}) VALUES ({', '.join('?' * 12)})"
_INSERT_THUMBNAIL = f"INSERT INTO {THUMBNAILS_TABLE} ({INSERT_THUMBNAIL_COLUMNS}) VALUES (?, ?)"
_INSERT_ANALYSIS = f"INSERT OR REPLACE INTO {ANALYSIS_TABLE} ({ANALYSIS_INSERT_COLUMNS}) VALUES ({', '.join('?' * 10)})"

# Another process (a backup, the sqlite3 shell) may hold the file briefly.
_BUSY_TIMEOUT_MS = 5_000
# Under SQLite's lowest historical limit on bound parameters (999).
_ID_CHUNK = 500


# What ``write_batch_now`` writes on the event loop: a model batch's records, not a backlog.
_NOW_MAX_RECORDS = 64
_NOW_MAX_BYTES = 256 * 2**10


class SQLiteBackend(rollups.Reads, InspectionBackend):
    """Inspection rows in the SQLite file at ``path`` (its directories are created)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._conn_lock = threading.Lock()  # the writer connection, across worker threads
        self._writer_conn: sqlite3.Connection | None = None
        self._readers: ReaderPool | None = None
        self._checkpointer: Checkpointer | None = None

    @classmethod
    def from_url(cls, url: str) -> SQLiteBackend:
        """``sqlite:///<path>``, with SQLAlchemy's reading of the slashes: everything
        after the third slash is the path (``sqlite:////var/x.db`` is absolute)."""
        rest = url.split("://", 1)[1]
        if not rest.startswith("/") or not rest[1:].strip() or "?" in rest or "#" in rest:
            raise ValueError(
                f"invalid SQLite URL {url!r}: expected sqlite:///relative/path.db or "
                "sqlite:////absolute/path.db, without query or fragment (in-memory databases "
                "are not supported: records must survive a restart)"
            )
        return cls(rest[1:])

    def __repr__(self) -> str:
        return f"SQLiteBackend({str(self.path)!r})"

    @property
    def location(self) -> str:
        return str(self.path)

    # --- lifecycle ------------------------------------------------------------------

    def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            conn.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
            mode = enter_wal(conn, _BUSY_TIMEOUT_MS)
            if mode.lower() != "wal":
                raise RuntimeError(
                    f"{self.path}: SQLite refused WAL mode (journal_mode is {mode!r}); "
                    "the inspection store needs a local filesystem"
                )
            conn.execute("PRAGMA synchronous = NORMAL")
            conn.execute("PRAGMA wal_autocheckpoint = 0")  # the Checkpointer's thread does them
            with write_transaction(conn):  # read under the lock: processes opening it at once migrate in turn
                (version,) = conn.execute("PRAGMA user_version").fetchone()
                if version > _SCHEMA_VERSION:
                    raise RuntimeError(
                        f"{self.path} has inspection schema {version}; this dgserve reads up to {_SCHEMA_VERSION}"
                    )
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        conn.execute(statement)
                if version < 3:
                    for statement in _SCHEMA_3.split(";"):
                        if statement.strip():
                            conn.execute(statement)
                    if version:  # records from before analysis: count them too
                        backfill(_db(conn))
                if version < 4:  # after the backfill, so old records come with their numbers
                    conn.execute(_SCHEMA_4)
                    conn.execute(_SCHEMA_4_THUMBNAILS)
                    conn.execute(FILL_ANALYSIS)
                conn.execute(f"PRAGMA user_version = {_SCHEMA_VERSION}")
            readers = ReaderPool(f"{self.path.resolve().as_uri()}?mode=ro", _BUSY_TIMEOUT_MS)
            checkpointer = Checkpointer(self.path, _BUSY_TIMEOUT_MS)
            checkpointer.start()
        except BaseException:
            conn.close()
            raise
        self._writer_conn = conn
        self._readers = readers
        self._checkpointer = checkpointer

    def close(self) -> None:
        if self._readers is not None:
            self._readers.close()
        if self._checkpointer is not None:
            self._checkpointer.stop()
            self._checkpointer = None
        with self._conn_lock:
            conn, self._writer_conn = self._writer_conn, None
            if conn is not None:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("PRAGMA optimize")
                conn.close()

    def _writer(self) -> sqlite3.Connection:
        if self._writer_conn is None:
            raise RuntimeError(f"{self!r} is not open")
        return self._writer_conn

    def _reader(self) -> contextlib.AbstractContextManager[sqlite3.Connection]:
        if self._readers is None:
            raise RuntimeError(f"{self!r} is not open")
        return self._readers.connection()

    # --- writing --------------------------------------------------------------------

    def write_batch(self, records: Sequence[StoredRecord], graphs: Mapping[str, str]) -> None:
        # Compress before BEGIN: the write lock is held only for the inserts.
        rows = [record_params(r) for r in records]
        stored: set[str] = set()
        if graphs:
            with self._conn_lock:
                stored = _stored_graphs(self._writer(), graphs)
        # No writer (in any process) ever deletes a graph, so one found above is still
        # there at COMMIT; new ones are compressed outside the lock, like the rows.
        bodies = [(d, compress(text)) for d, text in graphs.items() if d not in stored]
        with self._conn_lock:
            conn = self._writer()
            with write_transaction(conn):
                _insert(conn, records, rows, bodies)
            self._wrote()

    def write_batch_now(self, records: Sequence[StoredRecord], graphs: Mapping[str, str]) -> bool:
        # A model batch's records take 0.5-1.4 ms to write here (8 records of the bundled
        # model on the 2-core hosts: benchmarks/inspection_write.py), less than the hand-off
        # to a worker thread and back, which on a busy event loop waits for the GIL. Whatever
        # could wait is left to write_batch: another thread or process holding the write
        # lock (retention, a truncating checkpoint, the other server process), a backlog,
        # a large record, a new shared graph to compress.
        size = sum(len(r.prediction) + len(r.connectivity or "") + len(r.thumbnail or b"") for r in records)
        if len(records) > _NOW_MAX_RECORDS or size > _NOW_MAX_BYTES or not self._conn_lock.acquire(blocking=False):
            return False
        try:
            conn = self._writer()
            if len(_stored_graphs(conn, graphs)) < len(graphs) or not begin_now(conn, _BUSY_TIMEOUT_MS):
                return False
            with write_transaction(conn, begun=True):
                _insert(conn, records, [record_params(r) for r in records], [])
            self._wrote()
            return True
        finally:
            self._conn_lock.release()

    def delete_expired(self, *, older_than_us: int | None, keep_newest: int | None) -> int:
        with self._conn_lock:
            conn = self._writer()
            with write_transaction(conn):
                db = _db(conn)
                deleted = delete_expired(conn.execute, "?", older_than_us=older_than_us, keep_newest=keep_newest,
                                         forget=lambda where, params: rollups.forget(db, where, params))  # fmt: skip
            self._wrote()
            return deleted

    def _wrote(self) -> None:
        if self._checkpointer is not None:
            self._checkpointer.wrote()

    # --- reading ----------------------------------------------------------------------

    def get(self, inspection_id: str) -> StoredRecord | None:
        with self._reader() as conn:
            row = conn.execute(
                f"SELECT {GET_COLUMNS} FROM inspections WHERE id = ?", (inspection_id,)
            ).fetchone()
        return None if row is None else from_row(row)

    def read_page(self, query: PageQuery) -> list[StoredRecord]:
        sql, params = page_query(query, "?")
        with self._reader() as conn:
            rows = conn.execute(sql, params).fetchall()
        return [from_row(row) for row in rows]

    def read_analysis_page(self, query: PageQuery) -> AnalysisPage:
        sql, params = analysis_page_query(query, "?")
        with self._reader() as conn:
            rows = conn.execute(sql, params).fetchall()
        return analysis_page(rows)

    def select(self, filters: Filters) -> Selection:
        with self._reader() as conn:
            conn.execute("BEGIN")  # one snapshot: rollups and edge records agree
            selection = rollups.select(_db(conn), filters)
            conn.execute("COMMIT")
        return selection

    @contextlib.contextmanager
    def _analysis_db(self) -> Iterator[rollups.Db]:
        with self._reader() as conn:
            yield _db(conn)

    def graph(self, digest: str) -> str | None:
        with self._reader() as conn:
            row = conn.execute("SELECT body FROM graphs WHERE digest = ?", (digest,)).fetchone()
        return None if row is None else decompress(row[0])

    def count(self, exclude: Collection[str] = ()) -> int:
        ids = list(exclude)
        # One read transaction, so a batch committed while this runs is seen by both
        # queries and subtracted exactly as it is counted.
        with self._reader() as conn:
            conn.execute("BEGIN")
            (stored,) = conn.execute("SELECT COUNT(*) FROM inspections").fetchone()
            overlap = 0
            for start in range(0, len(ids), _ID_CHUNK):
                chunk = ids[start : start + _ID_CHUNK]
                marks = ",".join("?" * len(chunk))
                (n,) = conn.execute(f"SELECT COUNT(*) FROM inspections WHERE id IN ({marks})", chunk).fetchone()
                overlap += n
            conn.execute("COMMIT")
        return int(stored) - int(overlap)


def _stored_graphs(conn: sqlite3.Connection, graphs: Mapping[str, str]) -> set[str]:
    return {d for d in graphs if conn.execute("SELECT 1 FROM graphs WHERE digest = ?", (d,)).fetchone()}


def _insert(conn: sqlite3.Connection, records: Sequence[StoredRecord], rows: list[tuple[Any, ...]],
            bodies: list[tuple[str, bytes]]) -> None:  # fmt: skip
    """The writes of one batch, inside its transaction: new graphs, rollups, rows."""
    conn.executemany("INSERT OR IGNORE INTO graphs (digest, body) VALUES (?, ?)", bodies)
    rollups.write(_db(conn), records)  # reads the rows it replaces, so first
    forget_replaced(conn.execute, "?", [r.id for r in records])
    conn.executemany(_INSERT, rows)
    conn.executemany(_INSERT_ANALYSIS, [analysis_params(r) for r in rows])
    conn.executemany(_INSERT_THUMBNAIL, thumbnail_params(records))


def _db(conn: sqlite3.Connection) -> rollups.Db:
    return rollups.Db(conn.execute, conn.executemany, "?")


class SQLiteInspectionStore(InspectionStore):
    """``InspectionStore(SQLiteBackend(path), **options)``, for callers that hold a path.

    ``options`` are ``InspectionStore``'s (``max_age_s``, ``batch_size``, ...).
    """

    backend: SQLiteBackend

    def __init__(self, path: str | os.PathLike[str], **options: Any) -> None:
        super().__init__(SQLiteBackend(path), **options)

    @property
    def path(self) -> Path:
        return self.backend.path
