"""The analysis side of the SQL backends: tags, layouts, patterns and rollups, kept in
the same transaction as the records they describe.

Tables (schema 3 in SQLite, migration 2 in PostgreSQL):

* ``inspection_tags (id, key, value, created_at_us)``, indexed on ``(key, value,
  created_at_us, id)``: a tag filter is an index lookup, and deletes follow the
  records' own ``created_at_us``/``id`` conditions;
* ``layouts (digest, body)``: each layout once (``dgserve.analysis.layout``);
* ``patterns (id, bits)``: each open-edge pattern's bits once;
* ``rollups``: per ``(model, version, bucket_us, label, tags, layout)``, with
  ``bucket_us`` the start of the record's hour, the number of records, the sums of their
  statistics (float64 bytes) and their pattern counts (``stats.PATTERN_DTYPE`` bytes).

Every write adds the batch's sums (after taking out those of records it replaces), and
every retention delete takes out the sums of the records it deletes, so rollups always
equal what the stored records add up to. Updates are read-modify-write of each touched
row, in key order: ``Db.lock`` is ``FOR UPDATE`` on PostgreSQL, where replicas write at
once, and nothing on SQLite, where one connection writes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from dgserve.analysis.layout import Layout, parse_layout
from dgserve.analysis.stats import Partial, Row, decode_patterns, encode_patterns, partials, stats_size
from dgserve.analysis.summary import Selection
from dgserve.inspection.backend import Filters, StoredRecord
from dgserve.inspection.tags import from_canonical

__all__ = ["BUCKET_US", "Db", "Reads", "filter_sql", "forget", "layouts", "pattern_bits", "select", "selected_layouts",
           "tag_keys", "write"]  # fmt: skip

BUCKET_US = 3600 * 1_000_000  # an hour: few rows per day, and at most two hours' records read raw
_CHUNK = 500  # ids per IN (...): under SQLite's lowest historical limit on parameters
_FETCH = 10_000  # rows per fetch while summing deletes: memory stays bounded
_ANALYSIS = "version, created_at_us, label, tags, layout, features"


@dataclass(frozen=True)
class Db:
    """A connection inside the caller's transaction, as these functions use it."""

    execute: Callable[[str, Sequence[Any]], Any]
    executemany: Callable[[str, Sequence[Sequence[Any]]], Any]
    mark: str
    lock: str = ""


def filter_sql(filters: Filters, mark: str, table: str = "inspections") -> tuple[list[str], list[Any]]:
    """WHERE conditions (and parameters) that select ``filters``' records from ``table``."""
    where: list[str] = []
    params: list[Any] = []
    for column, value, op in (("model", filters.model, "="), ("version", filters.version, "="),
                              ("created_at_us", filters.since_us, ">="), ("created_at_us", filters.until_us, "<"),
                              ("label", filters.label, "=")):  # fmt: skip
        if value is not None:
            where.append(f"{table}.{column} {op} {mark}")
            params.append(value)
    for key, value in filters.tags:
        where.append(f"EXISTS (SELECT 1 FROM inspection_tags t WHERE t.id = {table}.id "
                     f"AND t.key = {mark} AND t.value = {mark})")  # fmt: skip
        params += [key, value]
    return where, params


def _lookup(db: Db, sql: str, keys: Iterable[Any]) -> list[Any]:
    """The rows of ``sql`` (ending in ``IN``) for every one of ``keys``, a chunk at a time."""
    wanted = sorted(set(keys))
    found: list[Any] = []
    for start in range(0, len(wanted), _CHUNK):
        chunk = wanted[start : start + _CHUNK]
        found += db.execute(f"{sql} ({','.join([db.mark] * len(chunk))})", chunk).fetchall()
    return found


def layouts(db: Db, digests: Iterable[str]) -> dict[str, Layout]:
    return {d: parse_layout(body) for d, body in _lookup(db, "SELECT digest, body FROM layouts WHERE digest IN", digests)}


def pattern_bits(db: Db, ids: Iterable[int]) -> dict[int, bytes]:
    return {int(i): bytes(b) for i, b in _lookup(db, "SELECT id, bits FROM patterns WHERE id IN", ids)}


def _rows(db: Db, raw: Sequence[Sequence[Any]]) -> list[Row]:
    """Stored analysis columns (``_ANALYSIS``) as rows for ``partials``."""
    known = layouts(db, {r[4] for r in raw})
    return [(r[0], r[1], r[2], r[3], known[r[4]], bytes(r[5])) for r in raw if r[4] in known]


def _apply(db: Db, model: str, deltas: dict[tuple[int, int, str, str, str], Partial]) -> None:
    m = db.mark
    key_sql = f"model = {m} AND version = {m} AND bucket_us = {m} AND label = {m} AND tags = {m} AND layout = {m}"
    for key in sorted(deltas):
        delta = deltas[key]
        if not delta.count and not delta.patterns and not delta.stats.any():
            continue
        params = (model, *key)
        db.execute(f"INSERT INTO rollups (model, version, bucket_us, label, tags, layout, count, stats, patterns) "
                   f"VALUES ({m}, {m}, {m}, {m}, {m}, {m}, 0, {m}, {m}) ON CONFLICT DO NOTHING",
                   (*params, np.zeros(len(delta.stats)).tobytes(), b""))  # fmt: skip
        count, stats, patterns = db.execute(
            f"SELECT count, stats, patterns FROM rollups WHERE {key_sql}{db.lock}", params
        ).fetchone()
        total = Partial(int(count), np.frombuffer(bytes(stats), np.float64).copy(), decode_patterns(bytes(patterns)))
        total.add(delta)
        if total.count <= 0:
            db.execute(f"DELETE FROM rollups WHERE {key_sql}", params)
        else:
            db.execute(f"UPDATE rollups SET count = {m}, stats = {m}, patterns = {m} WHERE {key_sql}",
                       (total.count, total.stats.tobytes(), encode_patterns(total.patterns), *params))  # fmt: skip


def _net(plus: dict[str, list[Row]], minus: dict[str, list[Row]]) -> dict[str, tuple[dict[Any, Partial], dict[int, bytes]]]:
    out: dict[str, tuple[dict[Any, Partial], dict[int, bytes]]] = {}
    for model in sorted(plus.keys() | minus.keys()):
        added, bits = partials(plus.get(model, []), BUCKET_US)
        removed, _ = partials(minus.get(model, []), BUCKET_US)
        for key, part in removed.items():
            net = added.setdefault(key, Partial(0, np.zeros_like(part.stats)))
            net.add(part, -1)
        out[model] = (added, bits)
    return out


def write(db: Db, records: Sequence[StoredRecord]) -> None:
    """The analysis side of writing ``records`` (a repeated id: the last wins), before
    the records themselves are written."""
    last = {r.id: r for r in records}
    ids = list(last)
    replaced: dict[str, list[Any]] = {}
    for start in range(0, len(ids), _CHUNK):
        chunk = ids[start : start + _CHUNK]
        marks = ",".join([db.mark] * len(chunk))
        db.executemany(f"DELETE FROM inspection_tags WHERE id = {db.mark}", [(i,) for i in chunk])
        old = db.execute(f"SELECT model, {_ANALYSIS} FROM inspections WHERE id IN ({marks}) "
                         "AND features IS NOT NULL", chunk).fetchall()  # fmt: skip
        for row in old:
            replaced.setdefault(row[0], []).append(row[1:])
    minus = {model: _rows(db, rows) for model, rows in replaced.items()}
    layout_texts = {parse_layout(r.layout).digest: r.layout for r in last.values() if r.layout is not None}
    plus: dict[str, list[Row]] = {}
    for r in last.values():
        if r.features is not None and r.layout is not None:
            plus.setdefault(r.model, []).append((r.version, r.created_at_us, r.label, r.tags, parse_layout(r.layout), r.features))
    db.executemany(f"INSERT INTO layouts (digest, body) VALUES ({db.mark}, {db.mark}) ON CONFLICT DO NOTHING",
                   sorted(layout_texts.items()))  # fmt: skip
    tag_rows = [(r.id, k, v, r.created_at_us) for r in last.values() for k, v in from_canonical(r.tags).items()]
    db.executemany(f"INSERT INTO inspection_tags (id, key, value, created_at_us) VALUES "
                   f"({db.mark}, {db.mark}, {db.mark}, {db.mark})", tag_rows)  # fmt: skip
    for model, (deltas, bits) in _net(plus, minus).items():
        db.executemany(f"INSERT INTO patterns (id, bits) VALUES ({db.mark}, {db.mark}) ON CONFLICT DO NOTHING",
                       sorted(bits.items()))  # fmt: skip
        _apply(db, model, deltas)


def forget(db: Db, where: str, params: Sequence[Any]) -> None:
    """Take the records ``where`` selects (a condition on ``created_at_us`` and ``id``) out
    of the rollups and tags, before the caller deletes them."""
    cursor = db.execute(f"SELECT model, {_ANALYSIS} FROM inspections WHERE {where} AND features IS NOT NULL", params)
    while batch := cursor.fetchmany(_FETCH):
        by_model: dict[str, list[Any]] = {}
        for row in batch:
            by_model.setdefault(row[0], []).append(row[1:])
        # Summed per fetch, not per record: one read-modify-write per touched rollup row.
        minus = {model: _rows(db, rows) for model, rows in by_model.items()}
        for model, (deltas, _) in _net({}, minus).items():
            _apply(db, model, deltas)
    db.execute(f"DELETE FROM inspection_tags WHERE {where}", params)


def _bucket_range(filters: Filters) -> tuple[int | None, int | None]:
    """The whole buckets inside ``[since, until)``: ``lo`` rounded up, ``hi`` down."""
    lo = None if filters.since_us is None else -(-filters.since_us // BUCKET_US) * BUCKET_US
    hi = None if filters.until_us is None else filters.until_us // BUCKET_US * BUCKET_US
    return lo, hi


def _rollup_where(filters: Filters, mark: str, lo: int | None, hi: int | None) -> tuple[str, list[Any]]:
    where, params = [], []
    for column, value, op in (("model", filters.model, "="), ("version", filters.version, "="),
                              ("label", filters.label, "="), ("bucket_us", lo, ">="), ("bucket_us", hi, "<")):  # fmt: skip
        if value is not None:
            where.append(f"{column} {op} {mark}")
            params.append(value)
    return (" WHERE " + " AND ".join(where)) if where else "", params


def select(db: Db, filters: Filters) -> Selection:
    """Rollups of the whole hours in the window, plus sums of the records in the partial
    hours at its edges (read one by one: at most two hours of them)."""
    lo, hi = _bucket_range(filters)
    selection = Selection()
    edges: list[tuple[int | None, int | None]] = []
    if lo is not None and hi is not None and lo >= hi:
        edges.append((filters.since_us, filters.until_us))  # the window is inside one or two hours
    else:
        where, params = _rollup_where(filters, db.mark, lo, hi)
        selection.rollups = [
            (int(v), int(b), lab, tags, lay, int(n), bytes(s), bytes(p))
            for v, b, lab, tags, lay, n, s, p in db.execute(
                f"SELECT version, bucket_us, label, tags, layout, count, stats, patterns FROM rollups{where}", params
            ).fetchall()
        ]
        if filters.since_us is not None and lo is not None and filters.since_us < lo:
            edges.append((filters.since_us, lo))
        if filters.until_us is not None and hi is not None and hi < filters.until_us:
            edges.append((hi, filters.until_us))
    raw: list[Any] = []
    for since, until in edges:
        edge = Filters(filters.model, filters.version, since, until, filters.label, filters.tags)
        where_list, params = filter_sql(edge, db.mark)
        sql = f"SELECT {_ANALYSIS} FROM inspections WHERE {' AND '.join(where_list)} AND features IS NOT NULL"
        raw += db.execute(sql, params).fetchall()
    selection.partials, _ = partials(_rows(db, raw), BUCKET_US)
    selection.layouts = layouts(db, {r[4] for r in selection.rollups} | {k[4] for k in selection.partials})
    for layout in selection.layouts.values():
        # A stored row of another width would be misread; refuse rather than guess.
        width = 8 * stats_size(layout)
        bad = [r for r in selection.rollups if r[4] == layout.digest and len(r[6]) != width]
        if bad:
            raise RuntimeError(f"rollup rows of layout {layout.digest} have the wrong width")
    return selection


def selected_layouts(db: Db, filters: Filters) -> dict[str, Layout]:
    """Layouts of the rollups whose hours overlap the window: a superset of the records'."""
    lo = None if filters.since_us is None else filters.since_us // BUCKET_US * BUCKET_US
    where, params = _rollup_where(Filters(filters.model, filters.version), db.mark, lo, filters.until_us)
    digests = [d for (d,) in db.execute(f"SELECT DISTINCT layout FROM rollups{where}", params).fetchall()]
    return layouts(db, digests)


def tag_keys(db: Db, model: str) -> set[str]:
    rows = db.execute(f"SELECT DISTINCT tags FROM rollups WHERE model = {db.mark}", (model,)).fetchall()
    return {key for (text,) in rows for key in from_canonical(text)}


class Reads:
    """The analysis reads that both SQL backends answer alike, given a ``Db`` to read in."""

    _analysis_db: Callable[[], contextlib.AbstractContextManager[Db]]  # the backend's: a connection as a Db

    def layouts(self, filters: Filters) -> dict[str, Layout]:
        with self._analysis_db() as db:
            return selected_layouts(db, filters)

    def pattern_bits(self, ids: Iterable[int]) -> dict[int, bytes]:
        with self._analysis_db() as db:
            return pattern_bits(db, ids)

    def tag_keys(self, model: str) -> set[str]:
        with self._analysis_db() as db:
            return tag_keys(db, model)
