"""Sums that add up: what a rollup keeps of many records, and how sums become a summary.

A record's contribution to a rollup (``stats_of``) is one float64 vector per layout
(``layout.py``) of sums, so that rollups can be added to and subtracted from at write
and retention time, merged across time buckets at read time, and turned into means and
standard deviations only at the end:

* "edges" (n x n): per entry, open (1 if the weight is not 0), the weight, its square;
* "frequency" (n): the values (0/1); "mean" (1): the value; "shares" (k): the shares.

Path patterns are counted apart: per "edges" slot the set of open entries, packed into
bits, is named by a 64-bit id (``pattern_id``, a hash of the bits), and a rollup keeps
``(slot, id, count)`` triples (``PATTERN_DTYPE``); the bits themselves are stored once
per id, since a stage has few distinct patterns however many images pass.
"""

from __future__ import annotations

import functools
import hashlib
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from dgserve.analysis.layout import Layout, Slot

__all__ = [
    "PATTERN_DTYPE",
    "Partial",
    "Row",
    "decode_patterns",
    "encode_patterns",
    "partials",
    "pattern_id",
    "stats_of",
    "stats_size",
]

# One counted pattern in a rollup: which slot of the layout, the pattern's id, how many images.
PATTERN_DTYPE = np.dtype([("slot", "<u4"), ("id", "<i8"), ("count", "<i8")])

_STATS_PER_ENTRY = {"edges": 3, "frequency": 1, "mean": 1, "shares": 1}


def stats_size(layout: Layout) -> int:
    return sum(_STATS_PER_ENTRY[s.statistic] * s.raw_size for s in layout.slots)


def stats_of(layout: Layout, raw: np.ndarray) -> np.ndarray:
    """``(images, stats_size)`` float64 contributions from ``(images, raw_size)`` features."""
    values = raw.astype(np.float64)
    # Every statistic of every slot in one gather, not a few small arrays per slot: a
    # write of a few records pays this per transaction, and per-slot numpy calls were most of it.
    return np.concatenate([values, values != 0, values * values], axis=1)[:, _plan(layout).gather]


def stats_offsets(layout: Layout) -> list[int]:
    """Where each slot's sums start in a stats vector."""
    offsets, at = [], 0
    for slot in layout.slots:
        offsets.append(at)
        at += _STATS_PER_ENTRY[slot.statistic] * slot.raw_size
    return offsets


def pattern_id(slot: Slot, bits: bytes) -> int:
    """A signed 64-bit name for one pattern of ``slot`` (signed: SQL integers are)."""
    return _pattern_id(slot.shape, bits)


@functools.lru_cache(maxsize=4096)  # a stage has few distinct patterns: most writes hash none
def _pattern_id(shape: tuple[int, ...], bits: bytes) -> int:
    digest = hashlib.blake2b(repr(shape).encode() + bits, digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


@dataclass(frozen=True, slots=True)
class _Plan:
    """What ``stats_of`` and ``partials`` need of a layout, worked out once per layout."""

    size: int  # stats_size
    # Columns of [values | open | squares] (each raw_size wide) in stats order.
    gather: np.ndarray
    edges: tuple[int, ...]  # the index of every "edges" slot


# By digest: hashing a Layout itself costs more than the lookup saves. Layouts are few (one
# per model version); the bound only keeps a long-lived process from collecting them.
_PLANS: dict[str, _Plan] = {}
_MAX_PLANS = 256


def _plan(layout: Layout) -> _Plan:
    plan = _PLANS.get(layout.digest)
    if plan is None:
        n = layout.raw_size
        columns: list[np.ndarray] = []
        for start, slot in zip(layout.offsets, layout.slots, strict=True):
            own = np.arange(start, start + slot.raw_size)
            columns += [own + n, own, own + 2 * n] if slot.statistic == "edges" else [own]
        gather = np.concatenate(columns) if columns else np.zeros(0, np.intp)
        edges = tuple(i for i, s in enumerate(layout.slots) if s.statistic == "edges")
        plan = _Plan(stats_size(layout), gather, edges)
        if len(_PLANS) >= _MAX_PLANS:
            _PLANS.clear()
        _PLANS[layout.digest] = plan
    return plan


def _patterns(layout: Layout, raw: np.ndarray, index: list[int]) -> Iterable[tuple[int, Counter[tuple[int, bytes]]]]:
    """Per "edges" slot: ``(slot index, images per (key index, packed open bits))``."""
    for slot_index in _plan(layout).edges:
        packed = np.ascontiguousarray(np.packbits(layout.raw(raw, slot_index) != 0, axis=1))
        # One bytes object per image, made in C; counted in C by Counter.
        rows: list[bytes] = packed.view(np.dtype((np.void, packed.shape[1]))).reshape(-1).tolist()
        yield slot_index, Counter(zip(index, rows, strict=True))


@dataclass(slots=True)
class Partial:
    """Sums over some records of one layout: how many, their stats, their pattern counts."""

    count: int
    stats: np.ndarray
    patterns: dict[tuple[int, int], int] = field(default_factory=dict)  # (slot, id) -> images

    def add(self, other: Partial, sign: int = 1) -> None:
        self.count += sign * other.count
        self.stats += sign * other.stats
        for key, n in other.patterns.items():
            left = self.patterns.get(key, 0) + sign * n
            if left:
                self.patterns[key] = left
            else:
                self.patterns.pop(key, None)


# One record as analysis reads it: (version, created_at_us, label, tags, layout, features).
Row = tuple[int, int, str, str, Layout, bytes]
# A rollup's key: (version, time bucket start in us, label, tags, layout digest).
Key = tuple[int, int, str, str, str]


def partials(rows: Sequence[Row], bucket_us: int) -> tuple[dict[Key, Partial], dict[int, bytes]]:
    """Records summed per rollup key, and the bits of every pattern id they name."""
    by_layout: dict[str, list[Row]] = {}
    for row in rows:
        by_layout.setdefault(row[4].digest, []).append(row)
    out: dict[Key, Partial] = {}
    bits_of: dict[int, bytes] = {}
    for group in by_layout.values():
        layout = group[0][4]
        raw = layout.decode([r[5] for r in group])
        keys: dict[Key, int] = {}
        index = [keys.setdefault((r[0], r[1] - r[1] % bucket_us, r[2], r[3], layout.digest), len(keys)) for r in group]
        sums = np.zeros((len(keys), _plan(layout).size))
        np.add.at(sums, index, stats_of(layout, raw))
        counts = np.bincount(index, minlength=len(keys))
        found = [Partial(int(counts[i]), sums[i]) for i in range(len(keys))]
        for slot_index, counted in _patterns(layout, raw, index):
            slot = layout.slots[slot_index]
            for (key_index, bits), n in counted.items():
                pid = pattern_id(slot, bits)
                bits_of[pid] = bits
                found[key_index].patterns[(slot_index, pid)] = n
        out.update(zip(keys, found, strict=True))
    return out, bits_of


def encode_patterns(patterns: dict[tuple[int, int], int]) -> bytes:
    items = sorted(patterns.items())
    array = np.array([(slot, pid, n) for (slot, pid), n in items], dtype=PATTERN_DTYPE)
    return array.tobytes()


def decode_patterns(blob: bytes) -> dict[tuple[int, int], int]:
    array = np.frombuffer(blob, PATTERN_DTYPE)
    return {(int(s), int(i)): int(n) for s, i, n in zip(array["slot"], array["id"], array["count"], strict=True)}
