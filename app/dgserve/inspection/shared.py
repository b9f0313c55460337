"""Matrices that many inspection records share, so that a store keeps them once.

A connectivity kind declares which of its fields are the same for every image of a
model version (``dgserve.connectivity.shared``), and which field names that value's
content (its digest). GloRe's interaction graph A_g is one: 256 x 256 for the Res4
units of a GloRe-ResNet-50, about 1.3 MB of JSON each, and about 4 MB per record with
all the units. A store keeps the record without the matrix, keeps the matrix once
under its digest, and puts it back when the record is read. Records without a digest
are stored whole.

Nothing here touches a database or knows a kind by name: ``split_shared`` and
``attach_shared`` work on the JSON-able connectivity dict through the kinds'
declarations, and ``GraphTextCache`` bounds how much encoded text a store keeps in
memory.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from dgserve.connectivity import kinds

__all__ = ["GraphTextCache", "attach_shared", "marker", "split_shared"]


def marker(field: str) -> str:
    """The key that takes a shared field's place in a stored record: ``adjacency_shared``."""
    return f"{field}_shared"


def split_shared(connectivity: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(connectivity without the shared matrices, {digest: matrix})``.

    Only a record that has both a digest and its value (a list) is split; the value's
    place is taken by ``marker(field): true``, so a read restores exactly the records
    that were split and leaves alone one that arrived without its matrix. The input is
    not modified. Without any shareable record, it is returned as it is with an empty dict.
    """
    shared: dict[str, Any] = {}
    out: dict[str, Any] | None = None
    for key, records in connectivity.items():
        fields = _shared_fields(key, records)
        if not fields or not any(_shareable(r, fields) for r in records):
            continue
        kept = []
        for record in records:
            for field, digest_field in fields.items():
                if _shareable_field(record, field, digest_field):
                    shared[record[digest_field]] = record[field]
                    record = {(marker(field) if k == field else k): (True if k == field else v)
                              for k, v in record.items()}
            kept.append(record)
        out = {**(out if out is not None else connectivity), key: kept}
    return (connectivity if out is None else out), shared


def _shared_fields(key: str, records: Any) -> dict[str, str]:
    # A store keeps whatever JSON it is given: keys that are no kind (or not a list of
    # records) have nothing to share and are stored as they are.
    if not isinstance(records, list):
        return {}
    for cls in kinds():
        if cls.kind == key:
            return dict(cls.shared_fields)
    return {}


def _shareable(record: dict[str, Any], fields: dict[str, str]) -> bool:
    return any(_shareable_field(record, f, d) for f, d in fields.items())


def _shareable_field(record: dict[str, Any], field: str, digest_field: str) -> bool:
    return isinstance(record, dict) and bool(record.get(digest_field)) and isinstance(record.get(field), list)


def attach_shared(connectivity: dict[str, Any], lookup: Callable[[str], Any]) -> dict[str, Any]:
    """Put back, in place, each value ``split_shared`` took out, from ``lookup(digest)``.

    The value goes back where it was, so the record reads exactly as it was produced.
    Returns ``connectivity``.
    """
    for key, records in connectivity.items():
        for field, digest_field in _shared_fields(key, records).items():
            mark = marker(field)
            for index, record in enumerate(records):
                if not isinstance(record, dict) or not record.get(mark):
                    continue
                value = lookup(record[digest_field])
                records[index] = {(field if k == mark else k): (value if k == mark else v)
                                  for k, v in record.items()}
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
