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

import hashlib
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
    parts: list[np.ndarray] = []
    for index, slot in enumerate(layout.slots):
        values = layout.raw(raw, index).astype(np.float64)
        if slot.statistic == "edges":
            parts += [(values != 0).astype(np.float64), values, values * values]
        else:
            parts.append(values)
    return np.concatenate(parts, axis=1) if parts else np.zeros((len(raw), 0))


def stats_offsets(layout: Layout) -> list[int]:
    """Where each slot's sums start in a stats vector."""
    offsets, at = [], 0
    for slot in layout.slots:
        offsets.append(at)
        at += _STATS_PER_ENTRY[slot.statistic] * slot.raw_size
    return offsets


def pattern_id(slot: Slot, bits: bytes) -> int:
    """A signed 64-bit name for one pattern of ``slot`` (signed: SQL integers are)."""
    digest = hashlib.blake2b(repr(slot.shape).encode() + bits, digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


def _patterns(layout: Layout, raw: np.ndarray) -> Iterable[tuple[int, np.ndarray, list[int], list[bytes]]]:
    """Per "edges" slot: ``(slot index, each image's index into the uniques, unique ids, unique bits)``."""
    for index, slot in enumerate(layout.slots):
        if slot.statistic != "edges":
            continue
        packed = np.packbits(layout.raw(raw, index) != 0, axis=1)
        rows = np.ascontiguousarray(packed).view(np.dtype((np.void, packed.shape[1]))).reshape(-1)
        uniques, inverse = np.unique(rows, return_inverse=True)
        bits = [u.tobytes() for u in uniques]
        yield index, inverse.reshape(-1), [pattern_id(slot, b) for b in bits], bits


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
        index = np.array([keys.setdefault((r[0], r[1] - r[1] % bucket_us, r[2], r[3], layout.digest), len(keys))
                          for r in group])  # fmt: skip
        sums = np.zeros((len(keys), stats_size(layout)))
        np.add.at(sums, index, stats_of(layout, raw))
        counts = np.bincount(index, minlength=len(keys))
        found = [Partial(int(counts[i]), sums[i]) for i in range(len(keys))]
        for slot, inverse, ids, bits in _patterns(layout, raw):
            bits_of.update(zip(ids, bits, strict=True))
            pairs, n = np.unique(index * len(ids) + inverse, return_counts=True)
            for pair, count in zip(pairs.tolist(), n.tolist(), strict=True):
                found[pair // len(ids)].patterns[(slot, ids[pair % len(ids)])] = count
        out.update(zip(keys, found, strict=True))
    return out, bits_of


def encode_patterns(patterns: dict[tuple[int, int], int]) -> bytes:
    items = sorted(patterns.items())
    array = np.array([(slot, pid, n) for (slot, pid), n in items], dtype=PATTERN_DTYPE)
    return array.tobytes()


def decode_patterns(blob: bytes) -> dict[tuple[int, int], int]:
    array = np.frombuffer(blob, PATTERN_DTYPE)
    return {(int(s), int(i)): int(n) for s, i, n in zip(array["slot"], array["id"], array["count"], strict=True)}
