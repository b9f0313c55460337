"""Matrices that many inspection records share, so that a store keeps them once.

A GloRe unit's interaction graph A_g is a weight. Every image that a model version
sees carries the same matrix: 256 x 256 for the Res4 units of a GloRe-ResNet-50,
about 1.3 MB of JSON each, and about 4 MB per record with all the units. Records name
the matrix by ``adjacency_digest`` (``dgserve.models.connectivity.adjacency_digest``).
A store keeps the record without the matrix, keeps the matrix once under its digest,
and puts it back when the record is read. Units without a digest are stored whole.

Nothing here touches a database: ``split_shared`` and ``attach_shared`` work on the
JSON-able connectivity dict, and ``GraphTextCache`` bounds how much encoded text a
store keeps in memory.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

__all__ = ["DIGEST_KEY", "MARKER", "SHARED_KEY", "GraphTextCache", "attach_shared", "split_shared"]

SHARED_KEY = "adjacency"
DIGEST_KEY = "adjacency_digest"
MARKER = "adjacency_shared"  # in a stored unit: its matrix is kept apart, under its digest


def split_shared(connectivity: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(connectivity without the shared matrices, {digest: matrix})``.

    Only a unit that has both a digest and its matrix (a list) is split; the matrix's
    place is taken by ``MARKER: true``, so a read restores exactly the units that were
    split and leaves alone one that arrived without its matrix. The input is not
    modified. Without any shareable unit, it is returned as it is with an empty dict.
    """
    units = connectivity.get("glore_units") or []
    if not any(_shareable(unit) for unit in units):
        return connectivity, {}
    shared: dict[str, Any] = {}
    kept = []
    for unit in units:
        if _shareable(unit):
            shared[unit[DIGEST_KEY]] = unit[SHARED_KEY]
            unit = {(MARKER if key == SHARED_KEY else key): (True if key == SHARED_KEY else value)
                    for key, value in unit.items()}
        kept.append(unit)
    return {**connectivity, "glore_units": kept}, shared


def _shareable(unit: dict[str, Any]) -> bool:
    return bool(unit.get(DIGEST_KEY)) and isinstance(unit.get(SHARED_KEY), list)


def attach_shared(connectivity: dict[str, Any], lookup: Callable[[str], Any]) -> dict[str, Any]:
    """Put back, in place, each matrix ``split_shared`` took out, from ``lookup(digest)``.

    The matrix goes back where it was, so the record reads exactly as it was produced.
    Returns ``connectivity``.
    """
    units = connectivity.get("glore_units") or []
    for index, unit in enumerate(units):
        if not unit.get(MARKER):
            continue
        matrix = lookup(unit[DIGEST_KEY])
        units[index] = {(SHARED_KEY if key == MARKER else key): (matrix if key == MARKER else value)
                        for key, value in unit.items()}
    return connectivity


class GraphTextCache:
    """Digest -> the matrix's JSON text, least recently used first out, ``max_bytes`` in all.

    Thread-safe: stores read records in worker threads. A miss only costs time (the
    caller encodes the matrix again, or reads it back from storage), never a wrong
    answer, so the bound can be small.
    """

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must not be negative, got {max_bytes}")
        self.max_bytes = max_bytes
        self._texts: OrderedDict[str, str] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._texts)

    def get(self, digest: str) -> str | None:
        with self._lock:
            text = self._texts.get(digest)
            if text is not None:
                self._texts.move_to_end(digest)
            return text

    def put(self, digest: str, text: str) -> None:
        if len(text) > self.max_bytes:
            return
        with self._lock:
            old = self._texts.pop(digest, None)
            if old is not None:
                self._bytes -= len(old)
            self._texts[digest] = text
            self._bytes += len(text)
            while self._bytes > self.max_bytes:
                _, evicted = self._texts.popitem(last=False)
                self._bytes -= len(evicted)
