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
from dgserve.inspection.backend import AnalysisPage, PageQuery, StoredRecord
from dgserve.inspection.rollups import filter_sql

__all__ = [
    "ANALYSIS_INSERT_COLUMNS",
    "ANALYSIS_TABLE",
    "COLUMNS",
    "Cursor",
    "FILL_ANALYSIS",
    "GET_COLUMNS",
    "INSERT_COLUMNS",
    "INSERT_THUMBNAIL_COLUMNS",
    "THUMBNAILS_TABLE",
    "analysis_page",
    "analysis_page_query",
    "analysis_params",
    "backfill",
    "compress",
    "decompress",
    "delete_expired",
    "forget_replaced",
    "from_row",
    "page_query",
    "record_params",
    "thumbnail_params",
]

# Every column a record is read back with but connectivity, which reads leave out when they can.
COLUMNS = "id, model, version, task, created_at_us, prediction, tags"
# What a write stores: COLUMNS, then what analysis reads (``backend.StoredRecord``), then connectivity.
INSERT_COLUMNS = f"{COLUMNS}, label, score, layout, features, connectivity"
_ANALYSIS_COLUMNS = "id, model, version, task, created_at_us, label, score, tags, layout, features"

# Level 1 is within 10% of level 6's size on connectivity JSON at a fraction of the CPU.
_ZLIB_LEVEL = 1

# The narrow table an export of one model reads (``analysis_rows``): each record's
# analysis columns, keyed by (model, created_at_us, id), so a model's records are one
# range of the key in listing order, about 400 bytes each, without the connectivity
# (SQLite clusters it: WITHOUT ROWID). Written and deleted with ``inspections``, in the
# same transactions; a store from before it fills it as it opens (``FILL_ANALYSIS``).
ANALYSIS_TABLE = "analysis_rows"
ANALYSIS_INSERT_COLUMNS = "model, created_at_us, id, version, task, label, score, tags, layout, features"
FILL_ANALYSIS = (f"INSERT INTO {ANALYSIS_TABLE} ({ANALYSIS_INSERT_COLUMNS}) "
                 f"SELECT {ANALYSIS_INSERT_COLUMNS} FROM inspections")  # fmt: skip
# Rows of the records that ``where`` selects in ``inspections`` (run before they go from it).
_FORGET_NARROW = (f"DELETE FROM {ANALYSIS_TABLE} WHERE (model, created_at_us, id) IN "
                  "(SELECT model, created_at_us, id FROM inspections WHERE {where})")  # fmt: skip
# Opt-in thumbnails (``DGSERVE_INSPECTION_THUMBNAILS``), one row per record that has one,
# apart from ``inspections`` so that nothing but ``get`` ever reads them.
THUMBNAILS_TABLE = "thumbnails"
INSERT_THUMBNAIL_COLUMNS = "id, image"
# ``get``'s columns: COLUMNS, the compressed connectivity, and the thumbnail or NULL.
GET_COLUMNS = (f"{COLUMNS}, connectivity, "
               f"(SELECT image FROM {THUMBNAILS_TABLE} t WHERE t.id = inspections.id)")  # fmt: skip
_FORGET_THUMBNAILS = f"DELETE FROM {THUMBNAILS_TABLE} WHERE id IN (SELECT id FROM inspections WHERE {{where}})"
_ID_CHUNK = 500  # bound parameters per statement: under SQLite's lowest limit (999)


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


def analysis_params(params: Sequence[Any]) -> tuple[Any, ...]:
    """``record_params``' values as ``ANALYSIS_INSERT_COLUMNS``' values."""
    return (params[1], params[4], params[0], params[2], params[3], params[7], params[8], params[6], params[9],
            params[10])  # fmt: skip


def forget_replaced(execute: Execute, mark: str, ids: Sequence[str]) -> None:
    """Take out of the narrow table and the thumbnails the rows of those of ``ids`` already
    stored: a record written again may have another time, so another key there, and no
    thumbnail. Run before the write."""
    for start in range(0, len(ids), _ID_CHUNK):
        chunk = ids[start : start + _ID_CHUNK]
        marks = ",".join([mark] * len(chunk))
        execute(_FORGET_NARROW.format(where=f"id IN ({marks})"), chunk)
        execute(f"DELETE FROM {THUMBNAILS_TABLE} WHERE id IN ({marks})", chunk)


def thumbnail_params(records: Sequence[StoredRecord]) -> list[tuple[str, bytes]]:
    """The ``INSERT_THUMBNAIL_COLUMNS`` values of the records that have a thumbnail."""
    return [(r.id, r.thumbnail) for r in records if r.thumbnail is not None]


def from_row(row: Sequence[Any]) -> StoredRecord:
    """A row of ``COLUMNS``, optionally followed by the compressed connectivity and the
    thumbnail (``GET_COLUMNS``)."""
    return StoredRecord(
        id=row[0],
        model=row[1],
        version=row[2],
        task=row[3],
        created_at_us=row[4],
        prediction=row[5],
        tags=row[6],
        connectivity=decompress(row[7]) if len(row) > 7 else None,
        thumbnail=bytes(row[8]) if len(row) > 8 and row[8] is not None else None,
    )


def analysis_page(rows: Sequence[Sequence[Any]]) -> AnalysisPage:
    """Rows of ``analysis_page_query``'s columns as one page, transposed in one pass:
    no Python object per row beyond what the driver made."""
    if not rows:
        return AnalysisPage([()] * 11, 0)
    columns: list[Sequence[Any]] = list(zip(*rows, strict=True))
    if len(columns) > 10:
        columns[10] = [decompress(blob) for blob in columns[10]]
    else:
        columns.append((None,) * len(rows))
    return AnalysisPage(columns, len(rows))


def _paged(query: PageQuery, mark: str, columns: str, table: str = "inspections") -> tuple[str, list[Any]]:
    # A later page starts past `since` already: one range condition keeps the scan simple.
    since = None if query.after is not None else query.since_us
    filters = PageQuery(model=query.model, version=query.version, since_us=since, until_us=query.until_us,
                        label=query.label, tags=query.tags)  # fmt: skip
    where, params = filter_sql(filters, mark, table)
    if query.after is not None:
        where.append(f"({table}.created_at_us, {table}.id) > ({mark}, {mark})")
        params.extend(query.after)
    sql = f"SELECT {columns} FROM {table}"
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += f" ORDER BY created_at_us, id LIMIT {mark}"
    params.append(query.limit)
    return sql, params


def page_query(query: PageQuery, mark: str) -> tuple[str, list[Any]]:
    """The SELECT (and its parameters) for ``read_page``: a range scan of one index."""
    return _paged(query, mark, f"{COLUMNS}, connectivity" if query.include_connectivity else COLUMNS)


def analysis_page_query(query: PageQuery, mark: str) -> tuple[str, list[Any]]:
    """The SELECT for ``read_analysis_page``: ``analysis_page``'s columns, in key order."""
    if query.include_connectivity:
        return _paged(query, mark, f"{_ANALYSIS_COLUMNS}, connectivity")
    if query.model is not None:  # one model's records: the narrow table, in its key order
        return _paged(query, mark, _ANALYSIS_COLUMNS, ANALYSIS_TABLE)
    return _paged(query, mark, _ANALYSIS_COLUMNS)


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
        execute(_FORGET_NARROW.format(where=f"created_at_us < {mark}"), (older_than_us,))
        execute(_FORGET_THUMBNAILS.format(where=f"created_at_us < {mark}"), (older_than_us,))
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
            execute(_FORGET_NARROW.format(where=where), tuple(row))
            execute(_FORGET_THUMBNAILS.format(where=where), tuple(row))
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
