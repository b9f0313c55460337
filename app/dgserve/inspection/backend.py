"""What a storage backend does for ``InspectionStore``, and the rows it exchanges.

``InspectionStore`` (``writebehind.py``) owns everything that is the same whatever
keeps the records: the queue, back-pressure, retries, merging queued records into
reads, retention scheduling, JSON encoding and the shared-graph de-duplication. A
backend only stores and reads rows. It gets them already encoded: a record's
prediction and connectivity as compact JSON text, the connectivity without its shared
graphs (``dgserve.inspection.shared``), and each shared graph as JSON text under its
digest. How the backend lays them out (compression, tables, indexes) is its own
business, as long as what it reads back is the text it was given.

The methods are synchronous and blocking: the store calls them in worker threads
(``asyncio.to_thread``), several at once (a read while a batch is written, retention
while a listing pages), so every method must be thread-safe. One is called on the
event loop instead: ``write_batch_now``, which must never wait. ``open`` is called once
before any other method, ``close`` once after the store has stopped writing.
"""

from __future__ import annotations

import abc
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, overload

from dgserve.analysis.layout import Layout
from dgserve.analysis.summary import Selection
from dgserve.inspection.tags import from_canonical

__all__ = ["AnalysisPage", "AnalysisRow", "Filters", "InspectionBackend", "Key", "PageQuery", "StoredRecord"]

# A record's place in every listing: (created_at in microseconds since the epoch, id).
Key = tuple[int, str]


@dataclass(frozen=True, slots=True)
class StoredRecord:
    """One record as a backend stores it.

    ``created_at_us`` is microseconds since the Unix epoch (UTC). ``prediction`` and
    ``connectivity`` are compact JSON text; ``connectivity`` lacks the shared graphs
    (markers stand in their place) and is ``None`` when a read was asked to leave it out.

    What analysis reads, made by the encoder (``codec.py``) and only written, never read
    back, through this class: ``tags`` (canonical JSON, ``dgserve.inspection.tags``), the
    top prediction's ``label`` ("" if none) and ``score``, and the record's numbers
    (``features``, float32) in its ``layout`` (``dgserve.analysis.layout``, JSON text),
    both ``None`` when no module has anything to aggregate.
    """

    id: str
    model: str
    version: int
    task: str
    created_at_us: int
    prediction: str
    connectivity: str | None
    tags: str = "{}"
    label: str = ""
    score: float | None = None
    layout: str | None = None
    features: bytes | None = None
    # The opt-in thumbnail (JPEG bytes), kept apart from the row; ``get`` reads it back.
    thumbnail: bytes | None = None

    @property
    def key(self) -> Key:
        return (self.created_at_us, self.id)


@dataclass(frozen=True, slots=True)
class Filters:
    """Which records a listing, an export or a summary covers; ``None`` (or no tags) is no filter.

    ``since_us`` is inclusive, ``until_us`` exclusive; ``label`` is the top prediction's;
    every ``(key, value)`` of ``tags`` must be one of the record's tags.
    """

    model: str | None = None
    version: int | None = None
    since_us: int | None = None
    until_us: int | None = None
    label: str | None = None
    tags: tuple[tuple[str, str], ...] = ()

    def matches(self, row: StoredRecord) -> bool:
        """Whether a queued (encoded, not yet stored) record passes, as a backend would judge it."""
        if (self.model is not None and row.model != self.model) or (
            self.version is not None and row.version != self.version
        ):
            return False
        if (self.since_us is not None and row.created_at_us < self.since_us) or (
            self.until_us is not None and row.created_at_us >= self.until_us
        ):
            return False
        if self.label is not None and row.label != self.label:
            return False
        have = from_canonical(row.tags) if self.tags else {}
        return all(have.get(k) == v for k, v in self.tags)


@dataclass(frozen=True, slots=True)
class PageQuery(Filters):
    """Which stored records ``read_page`` returns: up to ``limit``, in ascending ``key``.

    Those ``Filters`` pass, and only those whose key is greater than ``after`` (the last
    key of the previous page: keyset pagination, so a deep page costs what the first
    does). Without ``include_connectivity`` rows come with ``connectivity=None``.
    """

    limit: int = 100
    after: Key | None = None
    include_connectivity: bool = True


@dataclass(frozen=True, slots=True)
class AnalysisRow:
    """One record as an export reads it: no prediction JSON, its numbers instead.

    ``layout`` is the digest of a layout (``InspectionBackend.layouts``); ``connectivity``
    is ``None`` unless the read asked for it.
    """

    id: str
    model: str
    version: int
    task: str
    created_at_us: int
    label: str
    score: float | None
    tags: str
    layout: str | None
    features: bytes | None
    connectivity: str | None

    @property
    def key(self) -> Key:
        return (self.created_at_us, self.id)


class AnalysisPage(Sequence[AnalysisRow]):
    """A page of ``AnalysisRow``s kept column by column, as the driver's rows transposed once.

    An export builds its Arrow arrays from ``columns`` without a Python object per row;
    indexing still gives ``AnalysisRow``s (a page's last key pages on).
    ``columns`` follows ``AnalysisRow``'s fields: ``connectivity`` is all ``None`` unless read.
    """

    __slots__ = ("_size", "columns")

    def __init__(self, columns: Sequence[Sequence[Any]], size: int) -> None:
        if len(columns) != 11 or any(len(c) != size for c in columns):
            raise ValueError(f"an analysis page is 11 columns of {size} values")
        self.columns: tuple[Sequence[Any], ...] = tuple(columns)
        self._size = size

    def __len__(self) -> int:
        return self._size

    @overload
    def __getitem__(self, index: int) -> AnalysisRow: ...

    @overload
    def __getitem__(self, index: slice) -> list[AnalysisRow]: ...

    def __getitem__(self, index: int | slice) -> AnalysisRow | list[AnalysisRow]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(self._size))]
        c = self.columns
        return AnalysisRow(*(column[index] for column in c))


class InspectionBackend(abc.ABC):
    """Durable storage of ``StoredRecord`` rows and shared graphs; see the module docstring."""

    @property
    @abc.abstractmethod
    def location(self) -> str:
        """Where the records are, for log and error messages (a path, a URL without
        its password)."""

    @abc.abstractmethod
    def open(self) -> None:
        """Connect, and create or upgrade the schema; raise if the storage cannot be used
        (say, it was written by a newer schema). On failure nothing is left open."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release connections. Idempotent; reads still running may finish or raise
        ``RuntimeError``, and later calls raise it."""

    @abc.abstractmethod
    def write_batch(self, records: Sequence[StoredRecord], graphs: Mapping[str, str]) -> None:
        """Store ``records`` in one transaction: all of them or, on error, none.

        A record replaces any stored one with its id; ``records`` come in put order,
        so with a repeated id the last wins. ``graphs`` maps the digest of every shared
        graph the records name to its JSON text; a digest always names the same graph,
        so one already stored is kept as it is (best found cheaply, not compressed or sent
        again). New graphs commit in the same transaction as the first records naming them.
        """

    def write_batch_now(self, records: Sequence[StoredRecord], graphs: Mapping[str, str]) -> bool:
        """``write_batch``, on the event loop, for a batch that an answer waits on.

        Write at once and return ``True`` only where nothing can make the call wait: no
        lock held elsewhere, no round trip to a server, little to encode. Otherwise
        write nothing and return ``False``; the store then writes the batch through
        ``write_batch`` in a worker thread. The default never writes now.
        """
        return False

    @abc.abstractmethod
    def get(self, inspection_id: str) -> StoredRecord | None:
        """The stored record with this id, connectivity included; ``None`` if there is none."""

    @abc.abstractmethod
    def read_page(self, query: PageQuery) -> list[StoredRecord]:
        """The stored records ``query`` selects, in ascending ``key`` order."""

    @abc.abstractmethod
    def graph(self, digest: str) -> str | None:
        """The JSON text of the shared graph stored under ``digest``; ``None`` if absent."""

    @abc.abstractmethod
    def delete_expired(self, *, older_than_us: int | None, keep_newest: int | None) -> int:
        """Apply retention in one transaction; returns how many records were deleted.

        First the records created before ``older_than_us``; then, if more than
        ``keep_newest`` are left, all but the newest ``keep_newest`` by ``key``.
        ``None`` skips that rule. Shared graphs are kept: they outlive the records that
        name them (one per unit per model version, not one per image).
        """

    # --- analysis ---------------------------------------------------------------------
    # A backend keeps, in the transaction that writes or deletes records, rollups: per
    # (model, version, hour, label, tags, layout), sums of the records' statistics
    # (``dgserve.analysis.stats``), so that a summary reads a few rows per hour instead
    # of every record. ``sqlrows.py`` and ``rollups.py`` hold the SQL both backends share.

    @abc.abstractmethod
    def read_analysis_page(self, query: PageQuery) -> Sequence[AnalysisRow]:
        """Like ``read_page``, as ``AnalysisRow``s (connectivity only if ``query`` asks);
        an ``AnalysisPage`` where the backend can, so exports read it by column."""

    @abc.abstractmethod
    def select(self, filters: Filters) -> Selection:
        """The rollups and edge-of-window sums a summary of ``filters`` needs (``filters.model`` is set)."""

    @abc.abstractmethod
    def layouts(self, filters: Filters) -> dict[str, Layout]:
        """Every layout among the records ``filters`` selects (at the time buckets' grain)."""

    @abc.abstractmethod
    def pattern_bits(self, ids: Iterable[int]) -> dict[int, bytes]:
        """The packed bits of each stored pattern id (``dgserve.analysis.stats.pattern_id``)."""

    @abc.abstractmethod
    def tag_keys(self, model: str) -> set[str]:
        """Every tag key that some stored record of ``model`` has."""

    @abc.abstractmethod
    def count(self, exclude: Collection[str] = ()) -> int:
        """How many records are stored, leaving out those whose id is in ``exclude``.

        Read in one snapshot: the store passes the ids it has queued and adds their
        number, so each record is counted once, even one whose batch commits meanwhile.
        """
