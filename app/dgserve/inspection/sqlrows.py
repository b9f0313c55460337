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

import json

from dgserve.analysis.layout import extract, parse_layout, top_prediction
from dgserve.inspection import rollups
from dgserve.inspection.backend import AnalysisRow, PageQuery, StoredRecord
from dgserve.inspection.rollups import filter_sql

__all__ = [
    "COLUMNS",
    "Cursor",
    "INSERT_COLUMNS",
    "analysis_page_query",
    "analysis_row",
    "backfill",
    "compress",
    "decompress",
    "delete_expired",
    "from_row",
    "page_query",
    "record_params",
]

# Every column a record is read back with but connectivity, which reads leave out when they can.
COLUMNS = "id, model, version, task, created_at_us, prediction, tags"
# What a write stores: COLUMNS, then what analysis reads (``backend.StoredRecord``), then connectivity.
INSERT_COLUMNS = f"{COLUMNS}, label, score, layout, features, connectivity"
_ANALYSIS_COLUMNS = "id, model, version, task, created_at_us, label, score, tags, layout, features"

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


def record_params(record: StoredRecord) -> tuple[Any, ...]:
    """``record`` as the values of ``INSERT_COLUMNS`` (connectivity compressed, the layout by digest)."""
    if record.connectivity is None:
        raise ValueError(f"inspection record {record.id} came to be written without its connectivity")
    blob = compress(record.connectivity)
    digest = None if record.layout is None else parse_layout(record.layout).digest
    return (record.id, record.model, record.version, record.task, record.created_at_us, record.prediction,
            record.tags, record.label, record.score, digest, record.features, blob)  # fmt: skip


def from_row(row: Sequence[Any]) -> StoredRecord:
    """A row of ``COLUMNS``, optionally followed by the compressed connectivity."""
    return StoredRecord(
        id=row[0],
        model=row[1],
        version=row[2],
        task=row[3],
        created_at_us=row[4],
        prediction=row[5],
        tags=row[6],
        connectivity=decompress(row[7]) if len(row) > 7 else None,
    )


def analysis_row(row: Sequence[Any]) -> AnalysisRow:
    """A row of ``analysis_page_query``'s columns."""
    # Positional, and no copy of bytes the driver already gave: exports read millions.
    features = row[9] if row[9] is None or type(row[9]) is bytes else bytes(row[9])
    return AnalysisRow(row[0], row[1], row[2], row[3], row[4], row[5], row[6], row[7], row[8], features,
                       decompress(row[10]) if len(row) > 10 else None)  # fmt: skip


def _paged(query: PageQuery, mark: str, columns: str) -> tuple[str, list[Any]]:
    # A later page starts past `since` already: one range condition keeps the scan simple.
    since = None if query.after is not None else query.since_us
    filters = PageQuery(model=query.model, version=query.version, since_us=since, until_us=query.until_us,
                        label=query.label, tags=query.tags)  # fmt: skip
    where, params = filter_sql(filters, mark)
    if query.after is not None:
        where.append(f"(inspections.created_at_us, inspections.id) > ({mark}, {mark})")
        params.extend(query.after)
    sql = f"SELECT {columns} FROM inspections"
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += f" ORDER BY created_at_us, id LIMIT {mark}"
    params.append(query.limit)
    return sql, params


def page_query(query: PageQuery, mark: str) -> tuple[str, list[Any]]:
    """The SELECT (and its parameters) for ``read_page``: a range scan of one index."""
    return _paged(query, mark, f"{COLUMNS}, connectivity" if query.include_connectivity else COLUMNS)


def analysis_page_query(query: PageQuery, mark: str) -> tuple[str, list[Any]]:
    """The SELECT for ``read_analysis_page``: ``analysis_row``'s columns, in key order."""
    columns = f"{_ANALYSIS_COLUMNS}, connectivity" if query.include_connectivity else _ANALYSIS_COLUMNS
    return _paged(query, mark, columns)


def delete_expired(
    execute: Execute,
    mark: str,
    *,
    older_than_us: int | None,
    keep_newest: int | None,
    forget: Callable[[str, Sequence[Any]], None],
) -> int:
    """Retention's deletes, run through ``execute`` inside the caller's transaction;
    ``forget(where, params)`` takes the records out of the rollups first."""
    deleted = 0
    if older_than_us is not None:
        forget(f"created_at_us < {mark}", (older_than_us,))
        deleted += execute(f"DELETE FROM inspections WHERE created_at_us < {mark}", (older_than_us,)).rowcount
    if keep_newest is not None:
        # The newest record that does not fit; it and everything older go.
        row = execute(
            f"SELECT created_at_us, id FROM inspections ORDER BY created_at_us DESC, id DESC LIMIT 1 OFFSET {mark}",
            (keep_newest,),
        ).fetchone()
        if row is not None:
            where = f"(created_at_us, id) <= ({mark}, {mark})"
            forget(where, tuple(row))
            deleted += execute(f"DELETE FROM inspections WHERE {where}", tuple(row)).rowcount
    return deleted


_BACKFILL_PAGE = 1000


def backfill(db: rollups.Db) -> int:
    """Give the records written before analysis existed (no ``features``) their label,
    score and numbers, and count them in the rollups; returns how many were given some.

    Run once, in the migration's transaction: a store that upgrades summarises its old
    records too. Keyset pages by id, so a record without anything to aggregate is
    passed over once, not read again.
    """
    done, after = 0, ""
    m = db.mark
    while rows := db.execute(
        f"SELECT id, prediction, connectivity FROM inspections WHERE id > {m} AND features IS NULL "
        f"ORDER BY id LIMIT {m}", (after, _BACKFILL_PAGE),
    ).fetchall():  # fmt: skip
        records = []
        for inspection_id, prediction, blob in rows:
            label, score = top_prediction(json.loads(prediction))
            numbers = extract(json.loads(decompress(blob)))
            if numbers is not None:
                records.append((label, score, numbers[0].text, numbers[1], inspection_id))
        after = rows[-1][0]
        if not records:
            continue
        # Through the write path: the rows are read back as StoredRecords and written again.
        ids = [r[4] for r in records]
        old = db.execute(f"SELECT {COLUMNS}, connectivity FROM inspections WHERE id IN ({','.join([m] * len(ids))})",
                         ids).fetchall()  # fmt: skip
        fresh = {r[4]: r for r in records}
        updated = []
        for row in old:
            label, score, layout, features, _ = fresh[row[0]]
            base = from_row(row)
            updated.append(StoredRecord(base.id, base.model, base.version, base.task, base.created_at_us,
                                        base.prediction, None, base.tags, label, score, layout, features))  # fmt: skip
        rollups.write(db, updated)
        db.executemany(f"UPDATE inspections SET label = {m}, score = {m}, layout = {m}, features = {m} WHERE id = {m}",
                       [(r.label, r.score, parse_layout(r.layout).digest, r.features, r.id)
                        for r in updated if r.layout is not None])  # fmt: skip
        done += len(updated)
    return done
