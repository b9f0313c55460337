"""What the SQL backends (``sqlite.py``, ``postgres.py``) share: the row layout, the
compression of connectivity, and the listing and retention queries.

Both keep the same columns, so a record reads back the same whichever wrote it, and
the queries that decide what a listing or retention sees are written once. The
placeholder differs by driver (``?`` for sqlite3, ``%s`` for psycopg): each query is
built with the caller's ``mark``.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from dgserve.inspection.backend import PageQuery, StoredRecord

__all__ = ["COLUMNS", "Cursor", "compress", "decompress", "delete_expired", "from_row", "page_query", "record_params"]

# Every column but connectivity, which reads leave out when they can.
COLUMNS = "id, model, version, task, created_at_us, prediction"

# Level 1 is within 10% of level 6's size on connectivity JSON at a fraction of the CPU.
_ZLIB_LEVEL = 1


class Cursor(Protocol):
    """The part of a DB-API cursor these queries use (sqlite3 and psycopg both have it)."""

    @property
    def rowcount(self) -> int: ...

    def fetchone(self) -> Any: ...


Execute = Callable[[str, Sequence[Any]], Cursor]


def compress(text: str) -> bytes:
    return zlib.compress(text.encode(), _ZLIB_LEVEL)


def decompress(blob: bytes) -> str:
    return zlib.decompress(blob).decode()


def record_params(record: StoredRecord) -> tuple[str, str, int, str, int, str, bytes]:
    """``record`` as the values of ``COLUMNS`` followed by its compressed connectivity."""
    if record.connectivity is None:
        raise ValueError(f"inspection record {record.id} came to be written without its connectivity")
    blob = compress(record.connectivity)
    return (record.id, record.model, record.version, record.task, record.created_at_us, record.prediction, blob)


def from_row(row: Sequence[Any]) -> StoredRecord:
    """A row of ``COLUMNS``, optionally followed by the compressed connectivity."""
    return StoredRecord(
        id=row[0],
        model=row[1],
        version=row[2],
        task=row[3],
        created_at_us=row[4],
        prediction=row[5],
        connectivity=decompress(row[6]) if len(row) > 6 else None,
    )


def page_query(query: PageQuery, mark: str) -> tuple[str, list[Any]]:
    """The SELECT (and its parameters) for ``read_page``: a range scan of one index."""
    where: list[str] = []
    params: list[Any] = []
    if query.model is not None:
        where.append(f"model = {mark}")
        params.append(query.model)
    # A later page starts past `since` already: one range condition keeps the scan simple.
    if query.after is not None:
        where.append(f"(created_at_us, id) > ({mark}, {mark})")
        params.extend(query.after)
    elif query.since_us is not None:
        where.append(f"created_at_us >= {mark}")
        params.append(query.since_us)
    columns = f"{COLUMNS}, connectivity" if query.include_connectivity else COLUMNS
    sql = f"SELECT {columns} FROM inspections"
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += f" ORDER BY created_at_us, id LIMIT {mark}"
    params.append(query.limit)
    return sql, params


def delete_expired(execute: Execute, mark: str, *, older_than_us: int | None, keep_newest: int | None) -> int:
    """Retention's deletes, run through ``execute`` inside the caller's transaction."""
    deleted = 0
    if older_than_us is not None:
        deleted += execute(f"DELETE FROM inspections WHERE created_at_us < {mark}", (older_than_us,)).rowcount
    if keep_newest is not None:
        # The newest record that does not fit; it and everything older go.
        row = execute(
            f"SELECT created_at_us, id FROM inspections ORDER BY created_at_us DESC, id DESC LIMIT 1 OFFSET {mark}",
            (keep_newest,),
        ).fetchone()
        if row is not None:
            sql = f"DELETE FROM inspections WHERE (created_at_us, id) <= ({mark}, {mark})"
            deleted += execute(sql, tuple(row)).rowcount
    return deleted
