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

import dataclasses
import functools
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from dgserve.analysis.layout import Layout
from dgserve.connectivity import kind_of
from dgserve.errors import InvalidAnalysisError
from dgserve.inspection.backend import AnalysisPage, AnalysisRow
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


_FIELDS = tuple(f.name for f in dataclasses.fields(AnalysisRow))


def _columns(rows: Sequence[AnalysisRow]) -> Sequence[Sequence[Any]]:
    """``rows`` column by column (``AnalysisRow``'s fields): a backend's ``AnalysisPage``
    already is; any other sequence of rows is transposed here."""
    if isinstance(rows, AnalysisPage):
        return rows.columns
    return [[getattr(r, name) for r in rows] for name in _FIELDS]


@functools.lru_cache(maxsize=4096)
def _tag_items(text: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    tags = from_canonical(text)
    return tuple(tags), tuple(tags.values())


def _tags(texts: Sequence[str]) -> pa.Array:
    # Tag sets repeat (a few per experiment): each distinct text is parsed once, and the
    # rows take their map from the distinct ones by index, in Arrow.
    encoded = pa.array(texts, pa.string()).dictionary_encode()
    keys: list[str] = []
    values: list[str] = []
    offsets = [0]
    for text in encoded.dictionary.to_pylist():
        k, v = _tag_items(text)
        keys.extend(k)
        values.extend(v)
        offsets.append(len(keys))
    distinct = pa.MapArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(keys, pa.string()),
                                       pa.array(values, pa.string()))  # fmt: skip
    return distinct.take(encoded.indices)


class _Numbers:
    """A page's features, decoded once per layout: ``digest -> (row indexes or None for
    every row, raw matrix)``. One ``frombuffer`` over the layout's concatenated blobs:
    no Python object per row."""

    def __init__(self, layouts_column: Sequence[str | None], features: Sequence[bytes | None],
                 layouts: Mapping[str, Layout]) -> None:  # fmt: skip
        self.size = len(layouts_column)
        self.layouts = layouts
        self.decoded: dict[str, tuple[np.ndarray | None, np.ndarray]] = {}
        if not self.size:
            return
        encoded = pa.array(layouts_column, pa.string()).dictionary_encode()
        digests = encoded.dictionary.to_pylist()
        if len(digests) == 1 and encoded.null_count == 0:  # the usual page: one model version
            if digests[0] in layouts:
                self.decoded[digests[0]] = (None, layouts[digests[0]].decode(features))  # type: ignore[arg-type]
            return
        codes = encoded.indices.fill_null(-1).to_numpy()
        for code, digest in enumerate(digests):
            if digest in layouts:
                rows = np.flatnonzero(codes == code)
                self.decoded[digest] = (rows, layouts[digest].decode([features[i] for i in rows]))  # type: ignore[misc]


def _slot_array(column: _Column, numbers: _Numbers) -> pa.Array:
    whole = [(d, i) for d, i in column.slots.items() if d in numbers.decoded and numbers.decoded[d][0] is None]
    if whole:  # every row of the page has this layout: its slot is the column
        digest, index = whole[0]
        values = numbers.layouts[digest].raw(numbers.decoded[digest][1], index)
        missing = None
    else:
        values = np.zeros((numbers.size, column.size), np.float32)
        present = np.zeros(numbers.size, bool)
        for digest, index in column.slots.items():
            if digest in numbers.decoded:
                rows, raw = numbers.decoded[digest]
                values[rows] = numbers.layouts[digest].raw(raw, index)
                present[rows] = True
        missing = None if present.all() else pa.array(~present)
    if column.statistic == "mean":
        return pa.array(np.ascontiguousarray(values[:, 0]), pa.float32(), mask=None if missing is None else ~present)
    flat = values != 0 if column.statistic == "frequency" else values
    return pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1)), column.size, mask=missing)


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
    ids, models, versions, tasks, created, labels, scores, tags, layouts, features, texts = _columns(rows)
    label = pa.array(labels, pa.string())
    arrays: list[pa.Array] = [
        pa.array(ids, pa.string()),
        pa.array(models, pa.string()),
        pa.array(versions, pa.int32()),
        pa.array(tasks, pa.string()),
        pa.array(created, pa.int64()).view(pa.timestamp("us", tz="UTC")),
        pc.if_else(pc.equal(label, ""), pa.scalar(None, pa.string()), label),  # no label is null
        pa.array(scores, pa.float64()),
        _tags(tags),
    ]
    connectivity = None
    if plan_.needs_connectivity:
        # Shared graphs are not put back: no exported column is a shared field.
        connectivity = [json.loads(text) if text else None for text in texts]
    numbers = _Numbers(layouts, features, plan_.layouts)
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
