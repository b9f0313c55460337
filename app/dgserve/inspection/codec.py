"""``InspectionRecord`` <-> ``StoredRecord``: JSON text, with shared graphs kept apart.

Encoding happens on the caller's side of ``put`` (so a record that cannot be stored
fails at once, in the caller); decoding happens wherever the row was read. Both work
for every backend: the backend only ever sees the text.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from dgserve.analysis.layout import extract, top_prediction
from dgserve.inspection.backend import StoredRecord
from dgserve.inspection.record import InspectionRecord, from_us, to_us
from dgserve.inspection.shared import GraphTextCache, attach_shared, split_shared
from dgserve.inspection.tags import canonical, from_canonical

__all__ = ["decode", "dumps", "encode"]


def dumps(value: Any) -> str:
    """Compact JSON: what backends store, and what sizes the queue."""
    return json.dumps(value, separators=(",", ":"))


def encode(record: InspectionRecord, cache: GraphTextCache) -> tuple[StoredRecord, dict[str, str]]:
    """``(the row, {digest: JSON text of each shared graph the row names})``.

    Raises ``TypeError``/``ValueError`` for a record that is not JSON-able.
    """
    stored, shared = split_shared(record.connectivity)
    graphs: dict[str, str] = {}
    if shared:
        # Without its graphs the record is small, so encoding it again is cheap; each
        # graph is encoded once and then found in the cache, shared by every record.
        connectivity = dumps(stored)
        for digest, matrix in shared.items():
            text = cache.get(digest)
            if text is None:
                text = dumps(matrix)
                cache.put(digest, text)
            graphs[digest] = text
    elif record.connectivity_json is not None:
        connectivity = record.connectivity_json
    else:
        connectivity = dumps(record.connectivity)
    # What analysis reads is made here too, from the objects the caller already has:
    # a backend would otherwise parse the JSON again to find them.
    label, score = top_prediction(record.prediction)
    numbers = extract(record.connectivity)
    row = StoredRecord(
        id=record.id,
        model=record.model,
        version=int(record.version),
        task=record.task,
        created_at_us=to_us(record.created_at, "created_at"),
        prediction=dumps(record.prediction),
        connectivity=connectivity,
        tags=canonical(record.tags),
        label=label,
        score=score,
        layout=None if numbers is None else numbers[0].text,
        features=None if numbers is None else numbers[1],
        thumbnail=record.thumbnail,
    )
    return row, graphs


def decode(row: StoredRecord, graph: Callable[[str], Any], include_connectivity: bool = True) -> InspectionRecord:
    """The record ``row`` holds; ``graph(digest)`` gives back a shared graph, decoded.

    Without ``include_connectivity`` (or when the row was read without it) the record's
    ``connectivity`` is ``{}``.
    """
    connectivity: dict[str, Any] = {}
    if include_connectivity and row.connectivity is not None:
        connectivity = attach_shared(json.loads(row.connectivity), graph)
    return InspectionRecord(
        id=row.id,
        model=row.model,
        version=row.version,
        task=row.task,
        created_at=from_us(row.created_at_us),
        prediction=json.loads(row.prediction),
        connectivity=connectivity,
        tags=from_canonical(row.tags),
        thumbnail=row.thumbnail,
    )
