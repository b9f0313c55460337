"""Inspection records as a Parquet stream: one row per image, one row group per page read.

Columns: ``id``, ``model``, ``version``, ``task``, ``created_at`` (timestamp, UTC),
``label`` and ``score`` (the top prediction), ``tags`` (map of string to string), then
one column per slot of the selected records' layouts (``layout.py``), named as the
Open Inference Protocol names a module's output plus the field, ``stages/layer1/adjacency``:

* "edges": the n x n matrix as a fixed-size list of n*n float32, row-major ``[target][source]``;
* "frequency": a fixed-size list of booleans (``executed``);
* "mean": a float32; "shares": ``<field>_share``, a fixed-size list of float32 (per category);
* and each kind's ``tensor`` field that no "edges" or "frequency" slot holds whole (a
  GloRe unit's ``projection`` map) as a list of lists, read from the record's JSON;
  only then is that JSON read at all.

A record without a column's module has null there. Everything but the JSON-read columns
comes from the stored float32 numbers without parsing, page by page, so memory is one
page whatever the number of records.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dgserve.analysis.layout import Layout
from dgserve.connectivity import kind_of
from dgserve.errors import InvalidAnalysisError
from dgserve.inspection.backend import AnalysisRow
from dgserve.inspection.tags import from_canonical

__all__ = ["MEDIA_TYPE", "Plan", "parquet_chunks", "plan"]

MEDIA_TYPE = "application/vnd.apache.parquet"

_BASE = pa.schema([
    ("id", pa.string()), ("model", pa.string()), ("version", pa.int32()), ("task", pa.string()),
    ("created_at", pa.timestamp("us", tz="UTC")), ("label", pa.string()), ("score", pa.float64()),
    ("tags", pa.map_(pa.string(), pa.string())),
])  # fmt: skip
_ARROW = {"FP32": pa.float32(), "INT32": pa.int32()}


@dataclass(frozen=True)
class _Column:
    name: str
    type: pa.DataType
    statistic: str  # a slot's statistic, or "json" for a tensor field read from the record
    size: int  # values per row ("edges", "frequency", "shares"); 1 otherwise
    # For "json": (kind, module, field); else layout digest -> slot index.
    json_path: tuple[str, str, str] | None
    slots: dict[str, int]


@dataclass(frozen=True)
class Plan:
    schema: pa.Schema
    columns: tuple[_Column, ...]
    layouts: Mapping[str, Layout]

    @property
    def needs_connectivity(self) -> bool:
        return any(c.statistic == "json" for c in self.columns)


def _slot_type(statistic: str, size: int) -> pa.DataType:
    if statistic == "edges" or statistic == "shares":
        return pa.list_(pa.float32(), size)
    if statistic == "frequency":
        return pa.list_(pa.bool_(), size)
    return pa.float32()


def plan(layouts: Mapping[str, Layout]) -> Plan:
    """The columns for records of these layouts; ``InvalidAnalysisError`` if two layouts
    give one column different shapes (say, two versions of different architectures)."""
    columns: dict[str, _Column] = {}
    for digest, layout in sorted(layouts.items()):
        held = set()
        for index, slot in enumerate(layout.slots):
            name = f"{slot.name}_share" if slot.statistic == "shares" else slot.name
            if slot.statistic in ("edges", "frequency"):  # the field itself, not a figure of it
                held.add((slot.kind, slot.module, slot.field))
            column = _Column(name, _slot_type(slot.statistic, slot.raw_size), slot.statistic, slot.raw_size, None, {})
            have = columns.setdefault(name, column)
            if have.type != column.type:
                raise InvalidAnalysisError(f"column {name} has different shapes in the selected records; "
                                           "export one model version at a time (?model=&version=)")  # fmt: skip
            have.slots[digest] = index
        for kind, module in {(s.kind, s.module) for s in layout.slots}:
            tensor = kind_of(kind).tensor
            if tensor is not None and (kind, module, tensor.field) not in held:
                name = f"{kind}/{module}/{tensor.field}"
                item = _ARROW.get(tensor.datatype, pa.float32())
                columns.setdefault(name, _Column(name, pa.list_(pa.list_(item)), "json", 1, (kind, module, tensor.field), {}))
    ordered = tuple(columns.values())
    schema = pa.schema([*_BASE, *(pa.field(c.name, c.type) for c in ordered)])
    return Plan(schema, ordered, dict(layouts))


@functools.lru_cache(maxsize=4096)
def _tag_items(text: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    tags = from_canonical(text)
    return tuple(tags), tuple(tags.values())


def _tags(rows: Sequence[AnalysisRow]) -> pa.Array:
    # Tag sets repeat (a few per experiment), so each distinct text is parsed once.
    keys: list[str] = []
    values: list[str] = []
    offsets = [0]
    for row in rows:
        k, v = _tag_items(row.tags)
        keys.extend(k)
        values.extend(v)
        offsets.append(len(keys))
    return pa.MapArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(keys, pa.string()), pa.array(values, pa.string()))


class _Numbers:
    """A page's features, decoded once per layout: ``digest -> (row indexes, raw matrix)``."""

    def __init__(self, rows: Sequence[AnalysisRow], layouts: Mapping[str, Layout]) -> None:
        by_layout: dict[str, list[int]] = {}
        for i, row in enumerate(rows):
            if row.layout is not None and row.features is not None:
                by_layout.setdefault(row.layout, []).append(i)
        self.size = len(rows)
        self.layouts = layouts
        self.decoded = {d: (np.array(ix), layouts[d].decode([rows[i].features for i in ix]))  # type: ignore[misc]
                        for d, ix in by_layout.items() if d in layouts}  # fmt: skip


def _slot_array(column: _Column, numbers: _Numbers) -> pa.Array:
    values = np.zeros((numbers.size, column.size), np.float32)
    present = np.zeros(numbers.size, bool)
    for digest, index in column.slots.items():
        if digest in numbers.decoded:
            rows, raw = numbers.decoded[digest]
            values[rows] = numbers.layouts[digest].raw(raw, index)
            present[rows] = True
    if column.statistic == "mean":
        return pa.array(values[:, 0], pa.float32(), mask=~present)
    flat = pa.array((values != 0).reshape(-1)) if column.statistic == "frequency" else pa.array(values.reshape(-1))
    return pa.FixedSizeListArray.from_arrays(flat, column.size, mask=pa.array(~present))


def _json_array(column: _Column, connectivity: Sequence[dict[str, Any] | None]) -> pa.Array:
    assert column.json_path is not None
    kind, module, field = column.json_path
    name_field = kind_of(kind).name_field
    out: list[Any] = []
    for record in connectivity:
        found = None
        for entry in (record or {}).get(kind) or ():
            if entry.get(name_field) == module:
                found = entry.get(field)
                break
        out.append(found)
    return pa.array(out, column.type)


def _batch(plan_: Plan, rows: Sequence[AnalysisRow]) -> pa.RecordBatch:
    created = np.array([r.created_at_us for r in rows], np.int64)
    arrays: list[pa.Array] = [
        pa.array([r.id for r in rows], pa.string()),
        pa.array([r.model for r in rows], pa.string()),
        pa.array([r.version for r in rows], pa.int32()),
        pa.array([r.task for r in rows], pa.string()),
        pa.array(created, pa.int64()).view(pa.timestamp("us", tz="UTC")),
        pa.array([r.label or None for r in rows], pa.string()),
        pa.array([r.score for r in rows], pa.float64()),
        _tags(rows),
    ]
    connectivity = None
    if plan_.needs_connectivity:
        # Shared graphs are not put back: no exported column is a shared field.
        connectivity = [json.loads(r.connectivity) if r.connectivity else None for r in rows]
    numbers = _Numbers(rows, plan_.layouts)
    for column in plan_.columns:
        if column.statistic == "json":
            assert connectivity is not None
            arrays.append(_json_array(column, connectivity))
        else:
            arrays.append(_slot_array(column, numbers))
    return pa.RecordBatch.from_arrays(arrays, schema=plan_.schema)


class _Sink:
    """A write-only file that hands what is written to whoever drains it."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self.closed = False
        self._written = 0

    def write(self, data: Any) -> int:
        chunk = bytes(data)
        self._parts.append(chunk)
        self._written += len(chunk)
        return len(chunk)

    def tell(self) -> int:
        return self._written

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True

    def drain(self) -> bytes:
        out, self._parts = b"".join(self._parts), []
        return out


def _read_ahead(pages: Iterator[Sequence[AnalysisRow]]) -> Iterator[Sequence[AnalysisRow]]:
    """``pages``, the next one read in a thread while this one is encoded: the database
    driver and Arrow both release the GIL, so the two overlap. Two pages in memory at most."""
    with ThreadPoolExecutor(1, thread_name_prefix="dgserve-export-read") as pool:
        ahead = pool.submit(next, pages, None)
        while (rows := ahead.result()) is not None:
            ahead = pool.submit(next, pages, None)
            yield rows


def parquet_chunks(plan_: Plan, pages: Iterator[Sequence[AnalysisRow]]) -> Iterator[bytes]:
    """The Parquet file's bytes, a row group per page, as they are ready."""
    sink = _Sink()
    # Dictionaries only where values repeat: on ids and numbers they cost time for nothing.
    options: dict[str, Any] = {"compression": "zstd", "use_dictionary": ["model", "task", "label"]}
    with pq.ParquetWriter(sink, plan_.schema, **options) as writer:  # type: ignore[arg-type]
        for rows in _read_ahead(pages):
            writer.write_batch(_batch(plan_, rows), row_group_size=len(rows))
            chunk = sink.drain()
            if chunk:
                yield chunk
    tail = sink.drain()
    if tail:
        yield tail
