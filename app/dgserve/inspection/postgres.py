"""The shared inspection backend: PostgreSQL, for several replicas.

Selected by ``DGSERVE_INSPECTION_URL=postgresql://user:password@host:port/db`` (or
``postgres://``; libpq's URL parameters such as ``sslmode`` or
``options=-csearch_path%3Dschema`` pass through). ``InspectionStore``
(``writebehind.py``) queues records and calls this backend in worker threads; what is
specific to PostgreSQL, and why:

* **Driver and pool.** psycopg 3 with psycopg_pool's synchronous ``ConnectionPool``: the
  backend interface is synchronous and called from worker threads. 1 to 4 connections
  per replica (the writer, plus reads running at once). Each checkout is checked with
  an empty query, so connections broken by a database restart are replaced rather
  than failing the next request; a checkout waits at most ``_CHECKOUT_TIMEOUT_S``. A
  database that cannot be reached makes reads raise ``NotReadyError`` (503) and makes
  batch writes fail, and the store keeps their records queued and retries.
* **Schema.** Versioned in ``dgserve_schema`` (one row per component, here
  ``inspections``). ``open`` migrates in one transaction under
  ``pg_advisory_xact_lock``: replicas starting at once take turns, and the later ones
  find the work done. DDL is transactional in PostgreSQL, so a failed migration leaves
  nothing behind. A newer version than this dgserve knows is refused, not misread.
* **Layout.** As in SQLite (``sqlrows.py``): ``created_at_us`` is a ``bigint`` of
  microseconds since the epoch, and both indexes end in ``id``, so keyset pages by
  ``(created_at_us, id)`` are index range scans. ``id`` and ``model`` are
  ``COLLATE "C"``: listings merge these pages with queued records in Python's string
  order, which is byte order, whatever the database's default collation is.
* **Connectivity is zlib-compressed (level 1) ``bytea``,** not text: 2-4x less to send
  and to keep, compressed in the replica's worker thread (which releases the GIL)
  rather than by the one database server every replica shares; PostgreSQL's own TOAST
  compression would save disk only, not the transfer, and costs the server's CPU.
  Those columns are ``STORAGE EXTERNAL`` so the server does not try to compress them
  again, and reads ask for binary results so they are not sent hex-encoded.
  ``prediction`` is small text, readable in ``psql``; not ``jsonb``, which would not
  give back the text it was given (key order, spacing).
* **Shared graphs** go once per digest into ``graphs`` with ``ON CONFLICT DO NOTHING``:
  replicas writing the same new graph at once both succeed, and it is kept once.
* **Analysis** (migration 2): tags, top label and score, each record's numbers, the
  tag index and hourly rollups (``rollups.py``), in the records' transaction. Replicas
  update the same rollup rows: each is locked (``FOR UPDATE``) in key order, so
  concurrent batches add up instead of overwriting, and never deadlock on each other.
  Migration 3 adds ``analysis_rows``, the narrow table a model's export reads in its
  key order (model, created_at_us, id), written with the records (``sqlrows.py``), and
  ``thumbnails``, the opt-in JPEGs (``DGSERVE_INSPECTION_THUMBNAILS``), read only by ``get``.
* **count** is one statement, so one snapshot. **Retention** runs on every replica;
  its deletes are idempotent, so replicas that race only find less to delete.
* **Passwords** never leave the URL: ``location`` is rebuilt from its parts without the
  password or the query (which may carry one), and libpq's messages do not contain it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Collection, Iterator, Mapping, Sequence
from typing import Any
from urllib.parse import quote

import psycopg
from psycopg import conninfo as pg_conninfo
from psycopg_pool import ConnectionPool, PoolClosed, PoolTimeout

from dgserve.analysis.summary import Selection
from dgserve.errors import NotReadyError
from dgserve.inspection import rollups
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

__all__ = ["SCHEMA_VERSION", "PostgreSQLBackend"]

# Migration N (1-based) takes the schema from version N-1 to N. Append, never edit.
_MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE inspections (
        id            text COLLATE "C" NOT NULL PRIMARY KEY,
        model         text COLLATE "C" NOT NULL,
        version       integer NOT NULL,
        task          text    NOT NULL,
        created_at_us bigint  NOT NULL,
        prediction    text    NOT NULL,
        connectivity  bytea   NOT NULL
    );
    ALTER TABLE inspections ALTER COLUMN connectivity SET STORAGE EXTERNAL;
    CREATE INDEX inspections_created ON inspections (created_at_us, id);
    CREATE INDEX inspections_model_created ON inspections (model, created_at_us, id);
    CREATE TABLE graphs (
        digest text  NOT NULL PRIMARY KEY,
        body   bytea NOT NULL
    );
    ALTER TABLE graphs ALTER COLUMN body SET STORAGE EXTERNAL;
    """,
    """
    ALTER TABLE inspections ADD COLUMN tags text NOT NULL DEFAULT '{}';
    ALTER TABLE inspections ADD COLUMN label text COLLATE "C" NOT NULL DEFAULT '';
    ALTER TABLE inspections ADD COLUMN score double precision;
    ALTER TABLE inspections ADD COLUMN layout text;
    ALTER TABLE inspections ADD COLUMN features bytea;
    CREATE TABLE inspection_tags (
        id            text COLLATE "C" NOT NULL,
        key           text COLLATE "C" NOT NULL,
        value         text COLLATE "C" NOT NULL,
        created_at_us bigint NOT NULL,
        PRIMARY KEY (id, key)
    );
    CREATE INDEX inspection_tags_value ON inspection_tags (key, value, created_at_us, id);
    CREATE INDEX inspection_tags_created ON inspection_tags (created_at_us, id);
    CREATE TABLE layouts (digest text PRIMARY KEY, body text NOT NULL);
    CREATE TABLE patterns (id bigint PRIMARY KEY, bits bytea NOT NULL);
    CREATE TABLE rollups (
        model     text COLLATE "C" NOT NULL,
        version   integer NOT NULL,
        bucket_us bigint  NOT NULL,
        label     text COLLATE "C" NOT NULL,
        tags      text COLLATE "C" NOT NULL,
        layout    text    NOT NULL,
        count     bigint  NOT NULL,
        stats     bytea   NOT NULL,
        patterns  bytea   NOT NULL,
        PRIMARY KEY (model, version, bucket_us, label, tags, layout)
    );
    """,
    f"""
    CREATE TABLE {ANALYSIS_TABLE} (
        model         text COLLATE "C" NOT NULL,
        created_at_us bigint  NOT NULL,
        id            text COLLATE "C" NOT NULL,
        version       integer NOT NULL,
        task          text    NOT NULL,
        label         text COLLATE "C" NOT NULL,
        score         double precision,
        tags          text    NOT NULL,
        layout        text,
        features      bytea,
        PRIMARY KEY (model, created_at_us, id)
    );
    CREATE TABLE {THUMBNAILS_TABLE} (id text COLLATE "C" NOT NULL PRIMARY KEY, image bytea NOT NULL);
    ALTER TABLE {THUMBNAILS_TABLE} ALTER COLUMN image SET STORAGE EXTERNAL;
    """,
)
SCHEMA_VERSION = len(_MIGRATIONS)
_ANALYSIS_VERSION = 2  # the migration that added analysis
_EXPORT_VERSION = 3  # the migration that added the narrow table exports read
_COMPONENT = "inspections"
# Any fixed 64-bit key will do, as long as nothing else in the database uses it.
_MIGRATION_LOCK = 0x6467_7365_7276_6531  # "dgserve1"

_UPSERT = (
    f"INSERT INTO inspections ({INSERT_COLUMNS}) VALUES ({', '.join(['%s'] * 12)}) ON CONFLICT (id) DO UPDATE SET "
    + ", ".join(f"{c} = EXCLUDED.{c}" for c in INSERT_COLUMNS.split(", ") if c != "id")
)
_INSERT_THUMBNAIL = f"INSERT INTO {THUMBNAILS_TABLE} ({INSERT_THUMBNAIL_COLUMNS}) VALUES (%s, %s)"
_UPSERT_ANALYSIS = (
    f"INSERT INTO {ANALYSIS_TABLE} ({ANALYSIS_INSERT_COLUMNS}) VALUES ({', '.join(['%s'] * 10)}) "
    "ON CONFLICT (model, created_at_us, id) DO UPDATE SET "
    + ", ".join(f"{c} = EXCLUDED.{c}" for c in ANALYSIS_INSERT_COLUMNS.split(", ")[3:])
)

# Defaults for what the URL does not set: a black-holed host must not hang start-up or a
# write for minutes, and pg_stat_activity should say who is connected.
_CONNECT_DEFAULTS = {"connect_timeout": "5", "application_name": "dgserve"}
_POOL_MIN, _POOL_MAX = 1, 4
# How long a read or a write waits for a connection: long enough for a restarting
# database, short enough that a request fails before its client gives up.
_CHECKOUT_TIMEOUT_S = 5.0
# The pool's own reconnection backs off (1, 2, 4, ... s) for this long, then gives up
# until the next checkout asks again: so a database that comes back is found within
# about 16 s, however long it was away.
_RECONNECT_TIMEOUT_S = 30.0
_CLOSE_TIMEOUT_S = 5.0


class PostgreSQLBackend(rollups.Reads, InspectionBackend):
    """Inspection rows in the PostgreSQL database at ``url`` (any libpq URL or DSN)."""

    def __init__(self, url: str) -> None:
        try:
            params = pg_conninfo.conninfo_to_dict(url)
        except psycopg.ProgrammingError as exc:
            # libpq's message names the part it could not parse, never the password.
            raise ValueError(f"invalid PostgreSQL URL for the inspection store: {exc}") from None
        self._conninfo = url
        self._connect_kwargs = {k: v for k, v in _CONNECT_DEFAULTS.items() if k not in params}
        self._location = _redacted(params)
        self._pool: ConnectionPool[psycopg.Connection[Any]] | None = None

    @classmethod
    def from_url(cls, url: str) -> PostgreSQLBackend:
        """A ``postgresql://`` or ``postgres://`` URL, its scheme in any case (libpq wants
        it in lower case)."""
        scheme, rest = url.split("://", 1)
        return cls(f"{scheme.lower()}://{rest}")

    def __repr__(self) -> str:
        return f"PostgreSQLBackend({self._location!r})"

    @property
    def location(self) -> str:
        return self._location

    # --- lifecycle ------------------------------------------------------------------

    def open(self) -> None:
        # A direct connection first: its failure says why ("connection refused"), where
        # a pool would only time out; and the schema is ready before any pooled use.
        with psycopg.connect(self._conninfo, **self._connect_kwargs) as conn:
            self._migrate(conn)
        pool: ConnectionPool[psycopg.Connection[Any]] = ConnectionPool(
            self._conninfo,
            kwargs=self._connect_kwargs,
            min_size=_POOL_MIN,
            max_size=_POOL_MAX,
            open=False,
            check=ConnectionPool.check_connection,
            timeout=_CHECKOUT_TIMEOUT_S,
            reconnect_timeout=_RECONNECT_TIMEOUT_S,
            name="dgserve-inspections",
        )
        pool.open(wait=False)
        self._pool = pool

    def _migrate(self, conn: psycopg.Connection[Any]) -> None:
        """Bring the schema to ``SCHEMA_VERSION`` in ``conn``'s one transaction."""
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
        conn.execute(
            "CREATE TABLE IF NOT EXISTS dgserve_schema (component text PRIMARY KEY, version integer NOT NULL)"
        )
        row = conn.execute("SELECT version FROM dgserve_schema WHERE component = %s", (_COMPONENT,)).fetchone()
        version = 0 if row is None else int(row[0])
        if version > SCHEMA_VERSION:
            raise RuntimeError(
                f"{self._location} has inspection schema {version}; this dgserve reads up to {SCHEMA_VERSION}"
            )
        if version == SCHEMA_VERSION:
            return
        for migration in _MIGRATIONS[version:]:
            conn.execute(migration)  # several statements: allowed without parameters
        if 0 < version < _ANALYSIS_VERSION:  # records from before analysis: count them too
            backfill(_db(conn))
        if 0 < version < _EXPORT_VERSION:  # after the backfill, so old records come with their numbers
            conn.execute(FILL_ANALYSIS)
        conn.execute(
            "INSERT INTO dgserve_schema (component, version) VALUES (%s, %s) "
            "ON CONFLICT (component) DO UPDATE SET version = EXCLUDED.version",
            (_COMPONENT, SCHEMA_VERSION),
        )

    def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.close(timeout=_CLOSE_TIMEOUT_S)

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[psycopg.Connection[Any]]:
        """A pooled connection in one transaction: committed on success, else rolled back."""
        pool = self._pool
        if pool is None:
            raise RuntimeError(f"{self!r} is not open")
        try:
            with pool.connection() as conn:
                yield conn
        except PoolClosed as exc:
            raise RuntimeError(f"{self!r} is closed") from exc
        except (PoolTimeout, psycopg.OperationalError) as exc:
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise NotReadyError(f"inspection store {self._location} is unavailable: {message}") from exc

    # --- writing --------------------------------------------------------------------

    def write_batch(self, records: Sequence[StoredRecord], graphs: Mapping[str, str]) -> None:
        # Compress before taking a connection: it is held only for the statements.
        rows = [record_params(r) for r in records]
        stored: set[str] = set()
        if graphs:
            with self._transaction() as conn:
                sql = "SELECT digest FROM graphs WHERE digest = ANY(%s::text[])"
                stored = {d for (d,) in conn.execute(sql, (list(graphs),))}
        # A graph is never deleted, so one found above is still there at COMMIT; one
        # another replica adds meanwhile is skipped by ON CONFLICT.
        bodies = [(d, compress(text)) for d, text in graphs.items() if d not in stored]
        with self._transaction() as conn, conn.cursor() as cur:
            if bodies:
                cur.executemany("INSERT INTO graphs (digest, body) VALUES (%s, %s) ON CONFLICT DO NOTHING", bodies)
            rollups.write(_db(conn), records)  # reads the rows it replaces, so first
            forget_replaced(lambda sql, params: conn.execute(sql, params), "%s", [r.id for r in records])
            cur.executemany(_UPSERT, rows)
            cur.executemany(_UPSERT_ANALYSIS, [analysis_params(r) for r in rows])
            if thumbnails := thumbnail_params(records):
                cur.executemany(_INSERT_THUMBNAIL, thumbnails)

    def delete_expired(self, *, older_than_us: int | None, keep_newest: int | None) -> int:
        with self._transaction() as conn:
            db = _db(conn)
            return delete_expired(conn.execute, "%s", older_than_us=older_than_us, keep_newest=keep_newest,
                                  forget=lambda where, params: rollups.forget(db, where, params))  # fmt: skip

    # --- reading ----------------------------------------------------------------------

    def get(self, inspection_id: str) -> StoredRecord | None:
        sql = f"SELECT {GET_COLUMNS} FROM inspections WHERE id = %s"
        with self._transaction() as conn:
            row = conn.execute(sql, (inspection_id,), binary=True).fetchone()
        return None if row is None else from_row(row)

    def read_page(self, query: PageQuery) -> list[StoredRecord]:
        sql, params = page_query(query, "%s")
        with self._transaction() as conn:
            rows = conn.execute(sql, params, binary=True).fetchall()
        return [from_row(row) for row in rows]

    def read_analysis_page(self, query: PageQuery) -> AnalysisPage:
        sql, params = analysis_page_query(query, "%s")
        with self._transaction() as conn:
            rows = conn.execute(sql, params, binary=True).fetchall()
        return analysis_page(rows)

    def select(self, filters: Filters) -> Selection:
        with self._transaction() as conn:
            # One snapshot: rollups and edge records agree even while replicas write.
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            return rollups.select(_db(conn), filters)

    @contextlib.contextmanager
    def _analysis_db(self) -> Iterator[rollups.Db]:
        with self._transaction() as conn:
            yield _db(conn)

    def graph(self, digest: str) -> str | None:
        with self._transaction() as conn:
            row = conn.execute("SELECT body FROM graphs WHERE digest = %s", (digest,), binary=True).fetchone()
        return None if row is None else decompress(row[0])

    def count(self, exclude: Collection[str] = ()) -> int:
        # One statement is one snapshot: a batch committing meanwhile is either in both
        # counts or in neither.
        sql = (
            "SELECT (SELECT count(*) FROM inspections) "
            "- (SELECT count(*) FROM inspections WHERE id = ANY(%s::text[]))"
        )
        with self._transaction() as conn:
            row = conn.execute(sql, (list(exclude),)).fetchone()
        assert row is not None
        return int(row[0])


def _db(conn: psycopg.Connection[Any]) -> rollups.Db:
    def execute(sql: str, params: Sequence[Any]) -> Any:
        return conn.execute(sql, params, binary=True)

    def executemany(sql: str, rows: Sequence[Sequence[Any]]) -> None:
        if rows:
            with conn.cursor() as cur:
                cur.executemany(sql, rows)

    return rollups.Db(execute, executemany, "%s", " FOR UPDATE")


def _redacted(params: Mapping[str, Any]) -> str:
    """``postgresql://user@host:port/dbname`` from parsed connection parameters: no
    password, no other parameters."""
    user = params.get("user")
    port = params.get("port")
    host = params.get("host") or params.get("hostaddr") or ""
    netloc = f"{user}@" if user else ""
    if host.startswith("/"):  # a Unix socket directory, percent-encoded as libpq reads it
        netloc += quote(host, safe="")
    else:
        netloc += f"[{host}]" if ":" in host and "," not in host else host
    if port:
        netloc += f":{port}"
    return f"postgresql://{netloc}/{params.get('dbname') or ''}"
