"""Rollup sums -> the connectivity summary a researcher (or a picture, or a page) reads.

``summarise`` merges what a store read (``Selection``: rollup rows for whole time
buckets, plus sums made from the records of the partial buckets at the window's
edges), keeps the rows that pass the tag filters, groups them (by predicted label or
by one tag's value), and turns sums into statistics, slot by slot, the way each
slot's statistic (``dgserve.connectivity.Aggregate``) says:

* "edges": ``<field>_open_frequency`` (fraction of images with the edge open),
  ``<field>_mean`` and ``<field>_std`` (of the weight, closed edges counting 0), and
  ``<field>_patterns``: how many distinct open-edge sets, the entropy of their
  distribution in bits, and the ``top_k`` most frequent with count, share and their
  open edges as ``[target, source]`` pairs;
* "frequency": ``<field>_frequency``; "mean": ``<field>_mean``; "shares": ``<field>_share``.

Each group is ``{"key", "count", <kind>: [{<name field>: module, ...statistics}]}``,
and ``distance`` is the groups' pairwise mean |difference| of their profiles (every
edge's open frequency, and every share), over the entries that are not zero for all.
Everything is plain JSON in the layout's order, so a client can draw each stage's
matrix as a heatmap or a DAG without knowing any kind.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dgserve.analysis.layout import Layout
from dgserve.analysis.stats import PATTERN_DTYPE, Partial, stats_offsets, stats_size
from dgserve.connectivity import kind_of
from dgserve.errors import InvalidAnalysisError
from dgserve.inspection.tags import from_canonical

__all__ = ["RollupRow", "Selection", "summarise"]

# (version, bucket_us, label, tags, layout digest, count, stats float64 bytes, patterns bytes)
RollupRow = tuple[int, int, str, str, str, int, bytes, bytes]


@dataclass
class Selection:
    """What a store read for one summary: stored rollups, sums from edge records, and the layouts."""

    rollups: list[RollupRow] = field(default_factory=list)
    partials: dict[tuple[int, int, str, str, str], Partial] = field(default_factory=dict)
    layouts: dict[str, Layout] = field(default_factory=dict)


@functools.lru_cache(maxsize=4096)
def _tags(text: str) -> dict[str, str]:
    return from_canonical(text)


def _grouper(group_by: str | None, tags: Sequence[tuple[str, str]]) -> Callable[[str, str], str | None]:
    """``(label, tags text) -> group key``; ``None`` leaves the record out (a filter fails,
    or it lacks the tag grouped by). The empty key is the one group without ``group_by``."""
    tag_key = group_by[4:] if group_by and group_by.startswith("tag:") else None

    @functools.lru_cache(maxsize=65536)
    def group(label: str, text: str) -> str | None:
        have = _tags(text)
        if any(have.get(k) != v for k, v in tags):
            return None
        if group_by == "label":
            return label
        if tag_key is not None:
            return have.get(tag_key)
        return ""

    return group


@dataclass
class _Sums:
    count: int
    stats: np.ndarray
    patterns: dict[int, dict[int, int]]  # slot -> pattern id -> images


def _accumulate(selection: Selection, layout: Layout, group: Callable[[str, str], str | None]) -> dict[str, _Sums]:
    keys: dict[str, int] = {}
    rows = [r for r in selection.rollups if r[4] == layout.digest]
    index = [keys.setdefault(g, len(keys)) if (g := group(r[2], r[3])) is not None else -1 for r in rows]
    width = stats_size(layout)
    chosen = [i for i, g in enumerate(index) if g >= 0]
    gidx = np.array([index[i] for i in chosen], dtype=np.int64)
    sums = np.zeros((len(keys), width))
    counts = np.zeros(len(keys), dtype=np.int64)
    patterns: list[dict[int, dict[int, int]]] = [{} for _ in keys]
    if chosen:
        stats = np.frombuffer(b"".join(rows[i][6] for i in chosen), np.float64).reshape(len(chosen), width)
        np.add.at(sums, gidx, stats)
        np.add.at(counts, gidx, [rows[i][5] for i in chosen])
        blobs = [rows[i][7] for i in chosen]
        entries = np.frombuffer(b"".join(blobs), PATTERN_DTYPE)
        owner = np.repeat(gidx, [len(b) // PATTERN_DTYPE.itemsize for b in blobs])
        # Integer keys sort fast where a structured (group, slot, id) array would not.
        ids, id_index = np.unique(entries["id"], return_inverse=True)
        slots = int(entries["slot"].max()) + 1 if len(entries) else 1
        combined = (owner * slots + entries["slot"].astype(np.int64)) * len(ids) + id_index.reshape(-1)
        uniques, inverse = np.unique(combined, return_inverse=True)
        totals = np.bincount(inverse.reshape(-1), weights=entries["count"], minlength=len(uniques))
        for key, n in zip(uniques.tolist(), totals.tolist(), strict=True):
            if n:
                g, rest = divmod(key, slots * len(ids))
                slot, pid = divmod(rest, len(ids))
                counted = patterns[g].setdefault(slot, {})
                counted[int(ids[pid])] = counted.get(int(ids[pid]), 0) + round(n)
    out = {key: _Sums(int(counts[i]), sums[i], patterns[i]) for key, i in keys.items()}
    for (_, _, label, tags, digest), part in selection.partials.items():
        key = group(label, tags) if digest == layout.digest else None
        if key is None:
            continue
        sums_ = out.setdefault(key, _Sums(0, np.zeros(width), {}))
        sums_.count += part.count
        sums_.stats = sums_.stats + part.stats
        for (slot, pid), n in part.patterns.items():
            slot_patterns = sums_.patterns.setdefault(slot, {})
            slot_patterns[pid] = slot_patterns.get(pid, 0) + n
    return {k: v for k, v in out.items() if v.count > 0}


def _r(values: np.ndarray) -> Any:
    return np.round(values, 6).tolist()


def _slot_stats(layout: Layout, index: int, sums: _Sums, offset: int, top_k: int,
                bits: Mapping[int, bytes]) -> dict[str, Any]:  # fmt: skip
    slot, n = layout.slots[index], sums.count
    size = slot.raw_size
    values = sums.stats[offset : offset + size * (3 if slot.statistic == "edges" else 1)] / n
    if slot.statistic == "frequency":
        return {f"{slot.field}_frequency": _r(values)}
    if slot.statistic == "mean":
        return {f"{slot.field}_mean": round(float(values[0]), 6)}
    if slot.statistic == "shares":
        return {f"{slot.field}_share": _r(values)}
    opened, mean, square = values[:size], values[size : 2 * size], values[2 * size :]
    std = np.sqrt(np.maximum(square - mean * mean, 0.0))
    counted = sorted(sums.patterns.get(index, {}).items(), key=lambda kv: (-kv[1], kv[0]))
    shares = np.array([c for _, c in counted], dtype=np.float64) / n
    entropy = max(0.0, float(-(shares * np.log2(shares)).sum())) if len(shares) else 0.0
    top = []
    for pid, count in counted[:top_k]:
        grid = np.unpackbits(np.frombuffer(bits[pid], np.uint8))[:size].reshape(slot.shape)
        top.append({"count": count, "share": round(count / n, 6), "open": np.argwhere(grid).tolist()})
    return {
        f"{slot.field}_open_frequency": _r(opened.reshape(slot.shape)),
        f"{slot.field}_mean": _r(mean.reshape(slot.shape)),
        f"{slot.field}_std": _r(std.reshape(slot.shape)),
        f"{slot.field}_patterns": {"distinct": len(counted), "entropy_bits": round(entropy, 6), "top": top},
    }


def _profile(layout: Layout, sums: _Sums, offsets: Sequence[int]) -> np.ndarray:
    parts = []
    for slot, offset in zip(layout.slots, offsets, strict=True):
        if slot.statistic in ("edges", "shares"):
            parts.append(sums.stats[offset : offset + slot.raw_size] / sums.count)
    return np.concatenate(parts) if parts else np.zeros(0)


def _distance(profiles: np.ndarray) -> list[list[float]]:
    used = profiles.any(axis=0)
    if not used.any():
        return [[0.0] * len(profiles) for _ in profiles]
    kept = profiles[:, used]
    return _r(np.abs(kept[:, None, :] - kept[None, :, :]).mean(axis=2))


def summarise(
    selection: Selection,
    *,
    group_by: str | None,
    tags: Sequence[tuple[str, str]],
    kind: str | None,
    top_k: int,
    pattern_bits: Callable[[Iterable[int]], Mapping[int, bytes]],
) -> dict[str, Any]:
    """The summary of ``selection``; see the module docstring for its shape.

    ``pattern_bits`` gives the bits of the top patterns' ids (a store's lookup).
    """
    digests = {r[4] for r in selection.rollups if r[5]} | {k[4] for k, p in selection.partials.items() if p.count}
    if len(digests) > 1:
        versions = sorted({r[0] for r in selection.rollups} | {k[0] for k in selection.partials})
        raise InvalidAnalysisError(
            f"the selected records have {len(digests)} different module layouts (versions "
            f"{', '.join(map(str, versions))}); choose one with ?version="
        )
    if not digests:
        return {"count": 0, "ungrouped": 0, "modules": {}, "groups": [], "distance": {"keys": [], "matrix": []}}
    layout = selection.layouts[digests.pop()]
    if kind is not None and kind not in layout.modules():
        raise InvalidAnalysisError(
            f"this model's records have no {kind!r} modules; they have {', '.join(layout.modules()) or 'none'}"
        )
    group = _grouper(group_by, tags)
    everyone = _accumulate(selection, layout, _grouper(None, tags))
    groups = _accumulate(selection, layout, group) if group_by else everyone
    offsets = stats_offsets(layout)
    top_ids = {pid for sums in groups.values() for counted in sums.patterns.values()
               for pid, _ in sorted(counted.items(), key=lambda kv: (-kv[1], kv[0]))[:top_k]}  # fmt: skip
    bits = pattern_bits(top_ids)
    out_groups = []
    for key in sorted(groups):
        sums = groups[key]
        entry: dict[str, Any] = {"key": key if group_by else None, "count": sums.count}
        modules: dict[tuple[str, str], dict[str, Any]] = {}
        for index, slot in enumerate(layout.slots):
            if kind is not None and slot.kind != kind:
                continue
            name_field = kind_of(slot.kind).name_field
            module = modules.get((slot.kind, slot.module))
            if module is None:
                module = modules[(slot.kind, slot.module)] = {name_field: slot.module}
                entry.setdefault(slot.kind, []).append(module)
            module.update(_slot_stats(layout, index, sums, offsets[index], top_k, bits))
        out_groups.append(entry)
    total = everyone[""].count if "" in everyone else 0
    keys = sorted(groups)
    profiles = np.array([_profile(layout, groups[k], offsets) for k in keys])
    return {
        "count": total,
        "ungrouped": total - sum(g.count for g in groups.values()) if group_by else 0,
        "modules": {k: v for k, v in _describe(layout).items() if kind is None or k == kind},
        "groups": out_groups,
        "distance": {
            "metric": "mean |difference| of open-edge frequencies and node shares",
            "keys": keys if group_by else [None],
            "matrix": _distance(profiles),
        },
    }


def _describe(layout: Layout) -> dict[str, list[dict[str, Any]]]:
    """Per kind, each module's slots and their shapes: enough to lay out a picture."""
    out: dict[str, list[dict[str, Any]]] = {}
    seen: dict[tuple[str, str], dict[str, Any]] = {}
    for slot in layout.slots:
        module = seen.get((slot.kind, slot.module))
        if module is None:
            module = seen[(slot.kind, slot.module)] = {"name": slot.module, "fields": {}}
            out.setdefault(slot.kind, []).append(module)
        module["fields"][slot.field] = {"statistic": slot.statistic, "shape": list(slot.shape)}
    return out
