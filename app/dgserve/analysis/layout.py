"""What analysis keeps of one record: a layout of numeric slots, and the record's numbers.

Every module of every connectivity kind that declares ``aggregates``
(``dgserve.connectivity``) gives one ``Slot`` per aggregate: the DG-Net stage
``layer1`` gives ``stages/layer1/adjacency`` (an edge matrix), ``.../executed`` (a
frequency) and ``.../active_edge_fraction`` (a mean); a GloRe unit gives its
``projection`` as shares over its graph nodes. A record's ``Layout`` is its slots in
order, the same for every image of a model version, so it is stored once under its
digest; the record keeps only ``features``, one float32 vector in that layout. Nothing
here knows a kind or a model by name.

Sizes per statistic (``Slot.raw_size``): "edges" n*n weights (row-major,
``[target][source]``), "frequency" n values of 0/1, "mean" one value, "shares" one share
per category (this image's fraction of entries assigned to it).
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from dgserve.connectivity import kinds

__all__ = ["Layout", "Slot", "extract", "parse_layout", "top_prediction"]


@dataclass(frozen=True, slots=True)
class Slot:
    kind: str
    module: str
    field: str
    statistic: str
    shape: tuple[int, ...]

    @property
    def raw_size(self) -> int:
        return math.prod(self.shape)

    @property
    def name(self) -> str:
        """``stages/layer1/adjacency``: as the Open Inference Protocol names a module's output."""
        return f"{self.kind}/{self.module}/{self.field}"


@dataclass(frozen=True, slots=True)
class Layout:
    """The slots of a model version's records, with each slot's offset in ``features``."""

    slots: tuple[Slot, ...]
    text: str  # canonical JSON: what stores keep
    digest: str
    offsets: tuple[int, ...]
    raw_size: int

    def modules(self) -> dict[str, list[str]]:
        """``{kind: [module, ...]}`` in record order."""
        out: dict[str, list[str]] = {}
        for slot in self.slots:
            names = out.setdefault(slot.kind, [])
            if slot.module not in names:
                names.append(slot.module)
        return out

    def raw(self, features: np.ndarray, index: int) -> np.ndarray:
        """Slot ``index``'s columns of an ``(images, raw_size)`` feature matrix."""
        start = self.offsets[index]
        return features[:, start : start + self.slots[index].raw_size]

    def decode(self, blobs: Sequence[bytes]) -> np.ndarray:
        """``(len(blobs), raw_size)`` float32 from stored ``features`` blobs of this layout."""
        if not blobs:
            return np.zeros((0, self.raw_size), np.float32)
        return np.frombuffer(b"".join(blobs), np.float32).reshape(len(blobs), self.raw_size)


def _make_layout(slots: tuple[Slot, ...]) -> Layout:
    text = json.dumps([[s.kind, s.module, s.field, s.statistic, list(s.shape)] for s in slots], separators=(",", ":"))
    offsets, at = [], 0
    for slot in slots:
        offsets.append(at)
        at += slot.raw_size
    digest = hashlib.sha256(text.encode()).hexdigest()[:24]
    return Layout(slots, text, digest, tuple(offsets), at)


@functools.lru_cache(maxsize=256)
def parse_layout(text: str) -> Layout:
    """The layout stored as ``text`` (``Layout.text``); cached, layouts are few."""
    slots = tuple(Slot(kind, module, field, statistic, tuple(shape)) for kind, module, field, statistic, shape in json.loads(text))
    return _make_layout(slots)


@functools.lru_cache(maxsize=256)
def _cached_layout(slots: tuple[Slot, ...]) -> Layout:
    return _make_layout(slots)


def _raw(statistic: str, value: Any, size: int | None) -> tuple[tuple[int, ...], np.ndarray] | None:
    """``(shape, raw numbers)`` of one field, or ``None`` if it is not what the statistic reads."""
    if statistic == "mean":
        return ((), np.array([float(value)], np.float32)) if isinstance(value, int | float) else None
    array = np.asarray(value, dtype=np.float32 if statistic != "shares" else np.int64)
    if statistic == "edges":
        if array.ndim != 2 or array.shape[0] != array.shape[1]:
            return None
        return array.shape, array.reshape(-1)
    if statistic == "frequency":
        return (array.shape, array.astype(np.float32)) if array.ndim == 1 else None
    # shares: how the image's entries spread over ``size`` categories (-1 and others: none)
    if size is None or size < 1:
        return None
    flat = array.reshape(-1)
    flat = flat[(flat >= 0) & (flat < size)]
    counts = np.bincount(flat, minlength=size).astype(np.float32)
    return (size,), counts / max(array.size, 1)


def extract(connectivity: Mapping[str, Any]) -> tuple[Layout, bytes] | None:
    """``(layout, float32 features)`` of one record's connectivity (``ImageConnectivity.to_dict()``),
    or ``None`` when no module has anything to aggregate.

    A module that lacks a declared field (a record built by hand, an older writer)
    simply has no slot for it.
    """
    slots: list[Slot] = []
    parts: list[np.ndarray] = []
    for cls in kinds():
        if not cls.aggregates:
            continue
        for record in connectivity.get(cls.kind) or ():
            if not isinstance(record, Mapping):
                continue
            module = str(record.get(cls.name_field, ""))
            for agg in cls.aggregates:
                value = record.get(agg.field)
                size = record.get(agg.size_field) if agg.size_field else None
                if value is None:
                    continue
                try:
                    got = _raw(agg.statistic, value, size if isinstance(size, int) else None)
                except (TypeError, ValueError):
                    got = None  # ragged or non-numeric: not this statistic's input
                if got is None:
                    continue
                shape, numbers = got
                slots.append(Slot(cls.kind, module, agg.field, agg.statistic, shape))
                parts.append(numbers)
    if not slots:
        return None
    layout = _cached_layout(tuple(slots))
    return layout, np.concatenate(parts).astype(np.float32, copy=False).tobytes()


def top_prediction(prediction: Mapping[str, Any]) -> tuple[str, float | None]:
    """The best-scoring prediction's label and score (``("", None)`` when there is none).

    Every task's predictions are a list of dicts with ``label`` and ``score``
    (classification best first, detection by box); the highest score wins either way.
    """
    best: tuple[str, float | None] = ("", None)
    for item in prediction.get("predictions") or ():
        if not isinstance(item, Mapping) or not isinstance(item.get("label"), str):
            continue
        score = item.get("score")
        score = float(score) if isinstance(score, int | float) else None
        if best[0] == "" or (score is not None and (best[1] is None or score > best[1])):
            best = (item["label"], score)
    return best
