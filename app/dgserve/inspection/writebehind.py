"""``InspectionStore``: records queued in memory and written behind, over any backend.

How it behaves, and why (the backend, ``backend.py``, only stores and reads rows):

* **put never touches storage.** ``put`` serialises the record to compact JSON (so a
  record that cannot be stored fails at once, in the caller) and appends it to an
  in-memory queue. One writer task takes up to ``batch_size`` records at a time and
  hands them to the backend as one transaction, in a worker thread
  (``asyncio.to_thread``), so the event loop never waits on the database or the disk.
  A batch that an answer waits on is offered to the backend's ``write_batch_now``
  first, which writes it on the loop only where that cannot wait (SQLite: a free
  write lock and a few small records).
  A batch is written when it is full, when its oldest record has waited
  ``flush_interval_s``, or at once when someone calls ``flush``/``close``.
  Serialising stays on the caller's side because moving it would not help: the C
  JSON encoder holds the GIL, so in a thread it stalls the loop just as long (about
  30 ms per MB of JSON), while compression, which releases the GIL, runs in the
  backend's thread.
* **Queued records are readable.** Records stay in memory, keyed by id, until their
  transaction has committed; ``get`` looks there first and ``list`` merges them with
  the backend's pages, so a record can be read as soon as ``put`` returns.
* **A full queue waits or drops (``when_full``).** When ``max_pending`` records or
  ``max_pending_bytes`` of serialised data are queued (storage has fallen behind or
  is down), ``"wait"`` (the default) makes ``put`` wait until the writer has made
  room: back-pressure, nothing lost, and callers that must not wait can bound ``put``
  with ``asyncio.wait_for``. ``"drop"`` makes ``put`` return ``False`` at once without
  queuing the record, so a caller never waits on storage; drops are counted through
  ``observer`` and logged (``pending.py``). A single record larger than
  ``max_pending_bytes`` is still accepted when the queue is empty.
* **Write failures are retried.** A failed batch stays queued (and readable) and is
  retried with exponential back-off up to 5 s. During ``close`` a batch is tried
  ``CLOSE_ATTEMPTS`` (3) times and then given up on with an error naming how many
  records were lost, so shutdown cannot hang on a broken disk or database
  (``pending.py``).
* **Retention** (``max_age_s``, ``max_records``) runs inside ``start()`` and then
  every ``retention_interval_s`` in the background, or when ``enforce_retention`` is
  called. It deletes the oldest records by ``created_at``: those older than
  ``max_age_s``, then all but the newest ``max_records``. Between runs the store can
  hold records past either limit; queued records count once they are written.
* **Listing** yields oldest first by ``(created_at, id)`` and reads the backend in
  keyset pages of ``page_size``, merged with the queued records; a record seen both
  queued and written is yielded once, and ``count`` counts it once.
* **Shared graphs are kept once.** A GloRe unit's A_g is the same in every record of a
  model version, so a record goes to the backend without it, and the graph goes once
  under its digest (``dgserve.inspection.shared``). Reads put it back, so what is read
  equals what was put. Encoded graphs are cached (``GraphTextCache``), so a graph is
  encoded, and read back from the backend, about once however many records name it.
* **Analysis** (``summary``, ``analysis_pages``: ``analysis.py``) reads what the
  backend has committed, at most ``HEAVY_READS`` at a time, in worker threads.
* **Durability** is the backend's: ``flush`` returns once every record queued before
  the call has been committed by it; ``close`` flushes first.

Use ``async with store:`` or call ``start()``/``close()`` yourself.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import dataclasses
import json
import logging
from collections import deque
from collections.abc import AsyncIterator, Callable
from datetime import datetime
from types import TracebackType
from typing import Any, Literal, Self

from dgserve.errors import InspectionNotFoundError
from dgserve.inspection.analysis import HEAVY_READS, AnalysisReads
from dgserve.inspection.backend import Filters, InspectionBackend, Key, PageQuery
from dgserve.inspection.codec import decode, encode
from dgserve.inspection.pending import Batching, Pending, PendingQueue, QueueObserver, WhenFull
from dgserve.inspection.record import InspectionRecord, to_us, utc_now
from dgserve.inspection.shared import GraphTextCache

__all__ = ["InspectionStore"]

log = logging.getLogger(__name__)

# Encoded graphs kept in memory: a GloRe-ResNet-50's units take about 7 MB.
_GRAPH_CACHE_BYTES = 64 * 2**20

_State = Literal["new", "open", "closing", "closed"]


def _queued_record(pending: Pending, include_connectivity: bool) -> InspectionRecord:
    return decode(pending.row, lambda digest: json.loads(pending.graphs[digest]), include_connectivity)


class InspectionStore(AnalysisReads):
    """Inspection records over ``backend``; see the module docstring for behaviour.

    ``max_age_s``/``max_records``: retention limits (``None``: unlimited).
    ``batch_size``/``flush_interval_s``: the most records per transaction, and the
    longest a record waits in memory before its batch is written.
    ``max_pending``/``max_pending_bytes``: when the queue is full; ``when_full``: then
    ``put`` waits (``"wait"``) or drops the record (``"drop"``).
    ``observer``: hears of dropped records and failed writes (metrics).
    ``retention_interval_s``: how often retention runs in the background.
    ``page_size``: rows fetched per backend read while listing.
    ``clock``: "now" for ``max_age_s`` (tests inject one).
    """

    def __init__(
        self,
        backend: InspectionBackend,
        *,
        max_age_s: float | None = None,  # retention
        max_records: int | None = None,
        batch_size: int = 256,  # batching and back-pressure (Batching)
        flush_interval_s: float = 0.05,
        max_pending: int = 10_000,
        max_pending_bytes: int = 256 * 2**20,
        when_full: WhenFull = "wait",
        observer: QueueObserver | None = None,
        retention_interval_s: float = 30.0,  # background work and reads
        page_size: int = 256,
        clock: Callable[[], datetime] = utc_now,
    ) -> None:
        if max_age_s is not None and not max_age_s > 0:
            raise ValueError(f"max_age_s must be positive or None, got {max_age_s}")
        if max_records is not None and max_records < 1:
            raise ValueError(f"max_records must be at least 1 or None, got {max_records}")
        batching = Batching(batch_size, flush_interval_s, max_pending, max_pending_bytes, when_full)
        if page_size < 1:
            raise ValueError(f"page_size must be at least 1, got {page_size}")
        if not retention_interval_s > 0:
            raise ValueError(f"retention_interval_s must be positive, got {retention_interval_s}")

        self.backend = backend
        self.max_age_s = max_age_s
        self.max_records = max_records
        self._retention_interval_s = retention_interval_s
        self._page_size = page_size
        self._clock = clock

        self._state: _State = "new"
        self._queue = PendingQueue(backend.write_batch, backend.location, batching, observer, backend.write_batch_now)
        self._stop_retention = asyncio.Event()
        self._graph_texts = GraphTextCache(_GRAPH_CACHE_BYTES)
        self._retention_task: asyncio.Task[None] | None = None
        self._closer: asyncio.Task[None] | None = None
        self._heavy = asyncio.Semaphore(HEAVY_READS)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.backend.location!r}, state={self._state})"

    @property
    def pending(self) -> int:
        """Records queued and not yet committed (for metrics)."""
        return len(self._queue)

    # --- lifecycle ------------------------------------------------------------------

    async def start(self) -> None:
        """Open the backend and start background work. Call once."""
        if self._state != "new":
            raise RuntimeError(f"{self!r} can only be started once")
        await asyncio.to_thread(self.backend.open)
        self._state = "open"
        self._queue.start()
        if self.max_age_s is not None or self.max_records is not None:
            # Before serving, so storage kept under looser limits is trimmed by the time
            # start() returns. A failure here is not fatal: the background pass retries.
            try:
                await self.enforce_retention()
            except Exception:
                log.exception("inspection retention on %s failed at start; will try again", self.backend.location)
            self._retention_task = asyncio.create_task(
                self._retention_loop(), name=f"inspection-retention {self.backend.location}"
            )

    async def close(self) -> None:
        """Write everything queued, stop background work and close the backend.

        Idempotent. Later ``put`` calls raise ``RuntimeError``.
        """
        if self._state == "new":
            self._state = "closed"
            return
        if self._closer is None:
            self._closer = asyncio.create_task(self._shutdown())
        # Shielded: a caller that gives up waiting must not leave connections half-closed.
        await asyncio.shield(self._closer)

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def _shutdown(self) -> None:
        self._state = "closing"
        self._stop_retention.set()
        try:
            tasks = [t for t in (self._retention_task, self._queue.stop()) if t is not None]
            if tasks:
                await asyncio.wait(tasks)
        finally:
            await asyncio.to_thread(self.backend.close)
            self._state = "closed"

    def _check_readable(self) -> None:
        if self._state not in ("open", "closing"):
            raise RuntimeError(f"{self!r} is not open")

    # --- writing --------------------------------------------------------------------

    async def put(self, record: InspectionRecord) -> bool:
        """Queue ``record`` for writing; an existing record with its id is replaced.

        Raises ``TypeError``/``ValueError`` at once for a record that cannot be
        serialised. While the queue is full, waits (``when_full="wait"``) or drops the
        record and returns ``False`` (``"drop"``); returns ``True`` once it is queued.
        """
        if self._state != "open":
            raise RuntimeError(f"{self!r} does not accept records")
        self._queue.raise_if_stopped()
        row, graphs = encode(record, self._graph_texts)
        return await self._queue.put(row, graphs)

    async def flush(self) -> None:
        """Wait until every record queued before this call is durable."""
        await self._queue.flush()

    async def commit(self, timeout_s: float) -> bool:
        """Whether every record queued before this call became durable within ``timeout_s``.

        ``False`` at once while writes are failing (storage down): an answer must not wait
        on it. Concurrent calls share one write (group commit).
        """
        return await self._queue.commit(timeout_s)

    # --- retention --------------------------------------------------------------------

    async def enforce_retention(self) -> int:
        """Apply ``max_age_s`` and ``max_records`` to written records now; returns how
        many were deleted."""
        self._check_readable()
        if self.max_age_s is None and self.max_records is None:
            return 0
        older_than_us = None
        if self.max_age_s is not None:
            older_than_us = to_us(self._clock(), "clock()") - round(self.max_age_s * 1_000_000)
        deleted = await asyncio.to_thread(
            self.backend.delete_expired, older_than_us=older_than_us, keep_newest=self.max_records
        )
        if deleted:
            log.info("inspection retention deleted %d records from %s", deleted, self.backend.location)
        return deleted

    async def _retention_loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop_retention.wait(), self._retention_interval_s)
            if self._state != "open":
                return
            try:
                await self.enforce_retention()
            except Exception:
                log.exception("inspection retention on %s failed; will try again", self.backend.location)

    # --- reading ----------------------------------------------------------------------

    async def get(self, inspection_id: str) -> InspectionRecord:
        """The record with this id; ``InspectionNotFoundError`` if there is none."""
        self._check_readable()
        # Leaves the queue only after its commit, so a miss here means the backend
        # has it (or nobody stored it): there is no window in which it is in neither.
        pending = self._queue.get(inspection_id)
        if pending is not None:
            return _queued_record(pending, include_connectivity=True)
        record = await asyncio.to_thread(self._read_one, inspection_id)
        if record is None:
            raise InspectionNotFoundError(inspection_id)
        return record

    def _read_one(self, inspection_id: str) -> InspectionRecord | None:
        row = self.backend.get(inspection_id)
        return None if row is None else decode(row, self._graph)

    def _graph(self, digest: str) -> Any:
        """A shared graph by digest, from the cache or else the backend (in a worker thread)."""
        text = self._graph_texts.get(digest)
        if text is None:
            text = self.backend.graph(digest)
            if text is None:
                raise RuntimeError(f"{self.backend.location}: a record names graph {digest}, which is not stored")
            self._graph_texts.put(digest, text)
        return json.loads(text)

    async def list(
        self,
        *,
        model: str | None = None,
        since: datetime | None = None,
        limit: int = 100,
        include_connectivity: bool = True,
        filters: Filters | None = None,
    ) -> AsyncIterator[InspectionRecord]:
        """Up to ``limit`` records, oldest first (``created_at``, then ``id``).

        ``model`` keeps only that model's records; ``since`` (timezone-aware) keeps
        those created at or after it; ``filters`` adds version, until, label and tags
        (its own ``model``/``since_us`` give way to the arguments when those are set).
        With ``include_connectivity=False`` the large ``connectivity`` field is not
        read and comes back as ``{}``.

        Queued records are taken as of the first iteration and merged in order with
        pages read from the backend. A record written while the listing runs can show
        up in both; it is yielded once.
        """
        if limit < 0:
            raise ValueError(f"limit must not be negative, got {limit}")
        self._check_readable()
        base = filters or Filters()
        if model is not None:
            base = dataclasses.replace(base, model=model)
        if since is not None:
            base = dataclasses.replace(base, since_us=to_us(since, "since"))
        queued = sorted((p for p in self._queue.newest() if base.matches(p.row)), key=lambda p: p.row.key)
        query = PageQuery(**{f.name: getattr(base, f.name) for f in dataclasses.fields(Filters)},
                          limit=self._page_size, include_connectivity=include_connectivity)  # fmt: skip
        page: deque[tuple[Key, InspectionRecord]] = deque()
        stored_done = False
        queued_at = 0
        last: Key | None = None
        yielded = 0
        while yielded < limit:
            if not page and not stored_done:
                query = dataclasses.replace(query, limit=min(self._page_size, limit - yielded))
                rows = await asyncio.to_thread(self._read_page, query)
                page.extend(rows)
                stored_done = len(rows) < query.limit
                if rows:
                    query = dataclasses.replace(query, after=rows[-1][0])
            head = page[0][0] if page else None
            if head is None and queued_at == len(queued):
                return
            # On a tie the queued copy goes first: it is the newer one if the id was put again.
            if head is not None and (queued_at == len(queued) or head < queued[queued_at].row.key):
                key, record = page.popleft()
            else:
                key, record = queued[queued_at].row.key, _queued_record(queued[queued_at], include_connectivity)
                queued_at += 1
            if key == last:
                continue
            last = key
            yield record
            yielded += 1

    def _read_page(self, query: PageQuery) -> builtins.list[tuple[Key, InspectionRecord]]:
        rows = self.backend.read_page(query)
        return [(row.key, decode(row, self._graph, query.include_connectivity)) for row in rows]

    async def count(self) -> int:
        """How many records the store holds, queued ones included, each once."""
        self._check_readable()
        queued_ids = [p.row.id for p in self._queue.newest()]
        return len(queued_ids) + await asyncio.to_thread(self.backend.count, queued_ids)
