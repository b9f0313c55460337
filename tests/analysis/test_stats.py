"""Rollup sums (``dgserve.analysis.stats``) against the definition, record by record."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from dgserve.analysis.layout import Layout, Slot, parse_layout
from dgserve.analysis.stats import Row, partials, pattern_id

HOUR_US = 3600 * 1_000_000


def _layout(*slots: tuple[str, str, str, str, list[int]]) -> Layout:
    return parse_layout(json.dumps(slots))


DGNET_LIKE = _layout(
    ("stages", "layer1", "adjacency", "edges", [3, 3]),
    ("stages", "layer1", "executed", "frequency", [3]),
    ("stages", "layer1", "active_edge_fraction", "mean", []),
    ("stages", "layer2", "adjacency", "edges", [4, 4]),
)
GLORE_LIKE = _layout(("glore", "unit", "projection", "shares", [5]), ("stages", "only", "adjacency", "edges", [2, 2]))


def _own_stats(layout: Layout, features: np.ndarray) -> np.ndarray:
    """One record's sums as the module docstring defines them, slot by slot."""
    parts: list[float] = []
    for start, slot in zip(layout.offsets, layout.slots, strict=True):
        values = features[start : start + slot.raw_size].astype(np.float64)
        if slot.statistic == "edges":
            parts += [*(values != 0).astype(np.float64), *values, *(values * values)]
        else:
            parts += list(values)
    return np.array(parts)


def _rows(seed: int, count: int) -> list[Row]:
    rng = np.random.default_rng(seed)
    rows: list[Row] = []
    for _ in range(count):
        layout = DGNET_LIKE if rng.random() < 0.7 else GLORE_LIKE
        features = rng.random(layout.raw_size).astype(np.float32)
        features[rng.random(layout.raw_size) < 0.5] = 0  # closed edges, so patterns differ
        created_us = int(rng.integers(0, 3 * HOUR_US))
        rows.append((int(rng.integers(1, 3)), created_us, str(rng.choice(["cat", "dog"])),
                     str(rng.choice(["", "site=a"])), layout, features.tobytes()))  # fmt: skip
    return rows


@pytest.mark.parametrize(("seed", "count"), [(0, 1), (1, 8), (2, 40), (3, 300)])
def test_partials_are_the_sums_of_each_records_own_statistics_and_patterns(seed: int, count: int) -> None:
    rows = _rows(seed, count)
    expected: dict[tuple[int, int, str, str, str], tuple[int, np.ndarray, Counter[tuple[int, int]]]] = {}
    expected_bits: dict[int, bytes] = {}
    for version, created_us, label, tags, layout, blob in rows:
        features = np.frombuffer(blob, np.float32)
        key = (version, created_us - created_us % HOUR_US, label, tags, layout.digest)
        n, sums, patterns = expected.get(key, (0, np.zeros(0), Counter()))
        own = _own_stats(layout, features)
        for index, (start, slot) in enumerate(zip(layout.offsets, layout.slots, strict=True)):
            if slot.statistic == "edges":
                bits = np.packbits(features[start : start + slot.raw_size] != 0).tobytes()
                patterns[(index, pattern_id(slot, bits))] += 1
                expected_bits[pattern_id(slot, bits)] = bits
        expected[key] = (n + 1, own if not n else sums + own, patterns)

    found, bits_of = partials(rows, HOUR_US)

    assert found.keys() == expected.keys()
    for key, (n, sums, patterns) in expected.items():
        assert found[key].count == n
        np.testing.assert_allclose(found[key].stats, sums, rtol=1e-12, atol=0)
        assert found[key].patterns == dict(patterns)
    assert bits_of == expected_bits


def test_pattern_ids_stay_what_stored_rollups_name() -> None:
    # Stored rollups and the patterns table key on these ids: a new hash would orphan them.
    slot = Slot("stages", "layer1", "adjacency", "edges", (3, 3))
    assert pattern_id(slot, bytes([0b10110000, 0b10000000])) == 8122283665392537253
