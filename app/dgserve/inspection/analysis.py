"""The analysis reads of ``InspectionStore``: summaries and export pages, kept bounded.

They read what the backend has committed, after waiting a moment (``commit``) for the
records queued before the call, so that an answer just given is counted. Summaries and
exports are heavy reads: at most ``HEAVY_READS`` run at once, each in a worker thread
(never on the event loop that inference answers on); another waits up to
``HEAVY_WAIT_S`` for its turn, then gets a 503 with ``Retry-After``.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import dataclasses
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

from dgserve.analysis.layout import Layout
from dgserve.analysis.summary import summarise
from dgserve.errors import InvalidAnalysisError, QueueFullError
from dgserve.inspection.backend import AnalysisRow, Filters, InspectionBackend, PageQuery
from dgserve.inspection.pending import PendingQueue

__all__ = ["HEAVY_READS", "HEAVY_WAIT_S", "AnalysisReads", "analysis_pages"]

# Summaries and exports at once, and how long another waits for its turn before a 503.
HEAVY_READS = 2
HEAVY_WAIT_S = 30.0
# How long a summary or export waits for records queued before it to be committed.
_ANALYSIS_COMMIT_S = 2.0


class AnalysisReads:
    """What ``InspectionStore`` adds for analysis; it provides the attributes declared here."""

    backend: InspectionBackend
    _queue: PendingQueue
    _heavy: asyncio.Semaphore
    _check_readable: Callable[[], None]  # raises unless the store is open

    @contextlib.asynccontextmanager
    async def heavy_read(self) -> AsyncIterator[bool]:
        """A turn for one summary or export: ``HEAVY_READS`` at once; 503 after ``HEAVY_WAIT_S``.

        Yields whether every record queued before it is committed, so that a read of the
        backend alone (a reader process's) sees them; ``False`` while storage lags or is down.
        """
        self._check_readable()
        try:
            await asyncio.wait_for(self._heavy.acquire(), HEAVY_WAIT_S)
        except TimeoutError:
            raise QueueFullError("every analysis slot is busy; try again shortly", retry_after_s=5.0) from None
        try:
            # So records answered just now are counted.
            yield await self._queue.commit(_ANALYSIS_COMMIT_S)
        finally:
            self._heavy.release()

    async def summary(
        self, filters: Filters, *, group_by: str | None = None, kind: str | None = None, top_k: int = 5
    ) -> dict[str, Any]:
        """The connectivity summary of ``filters``' records (``dgserve.analysis.summary``);
        ``filters.model`` is required. ``InvalidAnalysisError`` (422) for a tag key, filtered
        or grouped by, that no record of the model has, or a kind it has not."""
        if filters.model is None:
            raise ValueError("a summary is of one model")
        wanted = {k for k, _ in filters.tags} | ({group_by[4:]} if group_by and group_by.startswith("tag:") else set())
        async with self.heavy_read():
            if wanted:
                known = await asyncio.to_thread(self.backend.tag_keys, filters.model)
                unknown = sorted(wanted - known)
                if unknown:
                    have = ", ".join(sorted(known)) or "none"
                    raise InvalidAnalysisError(
                        f"no record of model {filters.model!r} has tag key {', '.join(map(repr, unknown))}; "
                        f"its tag keys: {have}"
                    )
            return await asyncio.to_thread(self._summarise, filters, group_by, kind, top_k)

    def _summarise(self, filters: Filters, group_by: str | None, kind: str | None, top_k: int) -> dict[str, Any]:
        selection = self.backend.select(filters)
        return summarise(selection, group_by=group_by, tags=filters.tags, kind=kind, top_k=top_k,
                         pattern_bits=self.backend.pattern_bits)  # fmt: skip

    async def layouts(self, filters: Filters) -> dict[str, Layout]:
        """Every layout among the records ``filters`` selects (``InspectionBackend.layouts``)."""
        self._check_readable()
        return await asyncio.to_thread(self.backend.layouts, filters)

    def analysis_pages(
        self, filters: Filters, *, page_size: int, include_connectivity: bool
    ) -> Iterator[builtins.list[AnalysisRow]]:
        """Committed records ``filters`` selects, oldest first, a page at a time.

        Blocking: iterate it in a worker thread, inside ``heavy_read``.
        """
        return analysis_pages(self.backend, filters, page_size=page_size, include_connectivity=include_connectivity)


def analysis_pages(
    backend: InspectionBackend, filters: Filters, *, page_size: int, include_connectivity: bool
) -> Iterator[builtins.list[AnalysisRow]]:
    """``AnalysisReads.analysis_pages`` over any open backend (a reader process has its own)."""
    query = PageQuery(**{f.name: getattr(filters, f.name) for f in dataclasses.fields(Filters)},
                      limit=page_size, include_connectivity=include_connectivity)  # fmt: skip
    while True:
        rows = backend.read_analysis_page(query)
        if rows:
            yield rows
        if len(rows) < page_size:
            return
        query = dataclasses.replace(query, after=rows[-1].key)
