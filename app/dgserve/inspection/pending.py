"""The write-behind queue: serialised records waiting to be written, and their writer.

``InspectionStore`` owns one ``PendingQueue``. ``put`` appends without touching
storage; one writer task takes up to ``batch_size`` records at a time and hands them
to ``write`` (the backend's ``write_batch``) in a worker thread. A batch is written
when it is full, when its oldest record has waited ``flush_interval_s``, or at once
when someone flushes, waits for room, or stops the queue. A batch that someone waits
on goes to ``write_now`` (``write_batch_now``) first, on the loop, which writes it
only if it can do so without waiting.

When the queue is full (storage is down or behind), ``when_full`` decides: ``"wait"``
makes ``put`` wait for room (back-pressure, nothing lost), ``"drop"`` refuses the new
record at once, so callers never wait on storage. Each dropped record is counted
through the ``QueueObserver``; the log says when dropping starts (with the first
dropped id) and, once there is room again, how many were dropped.

Records leave the queue only once their batch has committed, so a record is always
either here or in storage. A failed batch stays queued and is retried with
exponential back-off; once stopping, it is tried ``CLOSE_ATTEMPTS`` times and then
given up on, with an error naming how many records are lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final, Literal, Protocol, get_args

from dgserve.inspection.backend import StoredRecord

__all__ = [
    "CLOSE_ATTEMPTS",
    "DROP_REASONS",
    "Batching",
    "DropReason",
    "Pending",
    "PendingQueue",
    "QueueObserver",
    "WhenFull",
]

log = logging.getLogger(__name__)

_RETRY_MIN_S = 0.05
_RETRY_MAX_S = 5.0
CLOSE_ATTEMPTS = 3

WriteBatch = Callable[[Sequence[StoredRecord], Mapping[str, str]], None]
# The backend's write_batch_now: writes at once on the loop, or says False and writes nothing.
WriteBatchNow = Callable[[Sequence[StoredRecord], Mapping[str, str]], bool]
WhenFull = Literal["wait", "drop"]
# Why records were lost: refused by a full queue, or given up on when closing.
DropReason = Literal["queue_full", "closing"]
DROP_REASONS: Final[tuple[DropReason, ...]] = get_args(DropReason)


class QueueObserver(Protocol):
    """What the queue reports as it happens; ``dgserve.metrics.Metrics`` is one, and counts it."""

    def inspection_records_dropped(self, count: int, reason: DropReason) -> None: ...

    def inspection_write_failed(self) -> None: ...


class _Unobserved:
    def inspection_records_dropped(self, count: int, reason: DropReason) -> None:
        pass

    def inspection_write_failed(self) -> None:
        pass


@dataclass(frozen=True, slots=True)
class Batching:
    """When the writer writes, and when ``put`` waits.

    ``batch_size``: the most records per transaction. ``flush_interval_s``: the longest
    a record waits in memory before its batch is written. ``max_pending`` records or
    ``max_pending_bytes`` of serialised text queued make the queue full; a single
    record larger than ``max_pending_bytes`` is still accepted when it is empty.
    ``when_full``: ``"wait"`` (``put`` waits for room) or ``"drop"`` (the new record is
    dropped and counted).
    """

    batch_size: int
    flush_interval_s: float
    max_pending: int
    max_pending_bytes: int
    when_full: WhenFull = "wait"

    def __post_init__(self) -> None:
        for name, value in (("batch_size", self.batch_size), ("max_pending", self.max_pending)):
            if value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        if self.max_pending_bytes < 1:
            raise ValueError(f"max_pending_bytes must be at least 1, got {self.max_pending_bytes}")
        if self.flush_interval_s < 0:
            raise ValueError(f"flush_interval_s must not be negative, got {self.flush_interval_s}")
        if self.when_full not in get_args(WhenFull):
            raise ValueError(f"when_full must be 'wait' or 'drop', got {self.when_full!r}")


@dataclass(slots=True)
class Pending:
    """A queued record, already serialised.

    Keeping the JSON rather than the caller's objects bounds memory by the text's size
    (a Python float costs 32 bytes, its JSON about 19) and means a caller that mutates
    its dicts after ``put`` cannot change what is stored.
    """

    row: StoredRecord
    graphs: dict[str, str]  # digest -> JSON text of each shared graph the row names
    seq: int
    enqueued_at: float

    @property
    def nbytes(self) -> int:
        return len(self.row.prediction) + len(self.row.connectivity or "") + len(self.row.thumbnail or b"")


class PendingQueue:
    """Queued records by id, and the task that writes them through ``write``, batched
    as ``batching`` says. ``location`` names the storage in log messages; ``observer``
    hears of drops and failed writes. ``write_now``, where given, is tried first for a
    batch that someone waits on (``flush``, ``commit``)."""

    def __init__(
        self,
        write: WriteBatch,
        location: str,
        batching: Batching,
        observer: QueueObserver | None = None,
        write_now: WriteBatchNow | None = None,
    ) -> None:
        self._write = write
        self._write_now = write_now
        self._location = location
        self._batching = batching
        self._observer: QueueObserver = observer or _Unobserved()
        # Records dropped since the queue last had room, and the first one's id (for the log).
        self._dropping = 0
        self._first_dropped = ""
        # Queue order is write order; _by_id maps an id to its newest queued version.
        self._queue: deque[Pending] = deque()
        self._by_id: dict[str, Pending] = {}
        self._bytes = 0
        self._seq = 0  # seq of the newest queued record
        self._durable_seq = 0  # seq of the newest committed record; commits happen in queue order
        self._flush_target = 0
        self._space_waiters = 0
        self._stopping = False
        self._wake = asyncio.Event()
        # Replaced on every change waiters care about (see _pulse), so a waiter that
        # grabbed the old one is woken exactly once per change.
        self._progress = asyncio.Event()
        # Answers waiting for a commit (``commit``): the seq each needs, and its future, in seq order.
        self._committers: deque[tuple[int, asyncio.Future[bool]]] = deque()
        self._abandoned = 0  # of those, timed out or cancelled before their commit (see commit)
        self._error: BaseException | None = None
        self._failing = False  # the last write failed: storage is down or refusing
        self._task: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return f"inspection writer for {self._location}"

    def __len__(self) -> int:
        """Records queued and not yet committed, repeats of an id included."""
        return len(self._queue)

    def get(self, inspection_id: str) -> Pending | None:
        """The newest queued version of this id."""
        return self._by_id.get(inspection_id)

    def newest(self) -> Iterable[Pending]:
        """The newest queued version of every queued id."""
        return self._by_id.values()

    def raise_if_stopped(self) -> None:
        if self._error is not None:
            raise self._stopped()

    def _stopped(self) -> RuntimeError:
        stopped = RuntimeError(f"{self!r} has stopped")
        stopped.__cause__ = self._error
        return stopped

    # --- the writer task --------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.create_task(self._write_loop(), name=repr(self))
        self._task.add_done_callback(self._on_done)

    def stop(self) -> asyncio.Task[None] | None:
        """Write what is queued (and what waiting ``put`` calls still add), then end;
        returns the writer task, which ends when that is done or given up on."""
        self._stopping = True
        self._wake.set()
        return self._task

    async def put(self, row: StoredRecord, graphs: dict[str, str]) -> bool:
        """Queue ``row``; when the queue is full, wait for room or drop it (``when_full``).
        Returns whether it was queued."""
        if self._full() and self._batching.when_full == "drop":
            self._drop(row.id)
            return False
        if self._full():
            self._space_waiters += 1
            self._wake.set()
            try:
                await self._wait_until(lambda: not self._full())
            finally:
                self._space_waiters -= 1
        self._seq += 1
        pending = Pending(row, graphs, seq=self._seq, enqueued_at=asyncio.get_running_loop().time())
        self._queue.append(pending)
        self._by_id[row.id] = pending
        self._bytes += pending.nbytes
        if len(self._queue) == 1 or len(self._queue) >= self._batching.batch_size:
            self._wake.set()
        if self._dropping:
            self._end_dropping("has room again")
        return True

    def _drop(self, inspection_id: str) -> None:
        if not self._dropping:
            self._first_dropped = inspection_id
            log.warning(
                "the inspection queue for %s is full (%d records, %d bytes): dropping new records "
                "until it has room, starting with %s",
                self._location,
                len(self._queue),
                self._bytes,
                inspection_id,
            )
        self._dropping += 1
        self._observer.inspection_records_dropped(1, "queue_full")
        self._wake.set()  # a full queue is due now, whatever its flush interval

    def _end_dropping(self, why: str) -> None:
        log.warning(
            "the inspection queue for %s %s: %d records were dropped while it was full, the first %s",
            self._location,
            why,
            self._dropping,
            self._first_dropped,
        )
        self._dropping = 0

    async def flush(self) -> None:
        """Wait until every record queued before this call is committed."""
        target = self._seq
        if self._durable_seq >= target:
            return
        self._flush_target = max(self._flush_target, target)
        self._wake.set()
        await self._wait_until(lambda: self._durable_seq >= target)

    async def commit(self, timeout_s: float) -> bool:
        """Like ``flush``, but for answering: ``True`` once everything queued before the
        call is committed, ``False`` after ``timeout_s``, or at once while writes are
        failing, so that no answer waits on storage that is down.

        Concurrent callers share the writes (group commit): whoever finds a write under
        way is served by the next one, which takes everything queued by then. Each waits on
        a future the writer settles as it commits (``_pulse``), not on ``wait_for(flush())``:
        a task per answer, and three more turns of a busy loop before it went out.
        """
        if self._durable_seq >= self._seq:
            return True
        if self._failing:
            return False
        self.raise_if_stopped()
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[bool] = loop.create_future()
        self._committers.append((self._seq, waiter))
        self._flush_target = max(self._flush_target, self._seq)
        self._wake.set()
        timer = loop.call_later(timeout_s, _settle, waiter, False)
        try:
            return await waiter
        finally:
            timer.cancel()
            if waiter.cancelled() or (waiter.exception() is None and not waiter.result()):
                # A write that hangs without failing drops no waiter: past half, keep the live ones.
                self._abandoned += 1
                if self._abandoned * 2 > len(self._committers):
                    self._committers = deque(c for c in self._committers if not c[1].done())
                    self._abandoned = 0

    def _full(self) -> bool:
        limits = self._batching
        return bool(self._queue) and (len(self._queue) >= limits.max_pending or self._bytes >= limits.max_pending_bytes)

    def _pulse(self) -> None:
        event, self._progress = self._progress, asyncio.Event()
        event.set()
        committers = self._committers
        while committers and (committers[0][0] <= self._durable_seq or committers[0][1].done()):
            _settle(committers.popleft()[1], True)  # committed (or timed out, or cancelled, already)
        while self._error is not None and committers:  # the writer is gone: nobody waits for it
            waiter = committers.popleft()[1]
            if not waiter.done():
                waiter.set_exception(self._stopped())

    async def _wait_until(self, done: Callable[[], bool]) -> None:
        while not done():
            self.raise_if_stopped()
            await self._progress.wait()

    def _due_in(self, now: float) -> float:
        """Seconds until the head of the queue must be written; <= 0 means now."""
        if (
            len(self._queue) >= self._batching.batch_size
            or self._flush_target > self._durable_seq
            or self._space_waiters
            or self._dropping
            or self._stopping
        ):
            return 0.0
        return self._queue[0].enqueued_at + self._batching.flush_interval_s - now

    async def _write_loop(self) -> None:
        loop = asyncio.get_running_loop()
        failures = 0
        while True:
            self._wake.clear()
            if not self._queue:
                # A put waiting for room has not appended yet; leaving now would strand it.
                if self._stopping and not self._space_waiters:
                    return
                await self._wake.wait()
                continue
            wait_s = self._due_in(loop.time())
            if wait_s > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), wait_s)
                continue

            batch = list(itertools.islice(self._queue, self._batching.batch_size))
            graphs = {digest: text for p in batch for digest, text in p.graphs.items()}
            rows = [p.row for p in batch]
            try:
                # An answer waits on this batch: the backend writes it here if it can without
                # waiting, which costs it less than the hand-off to a thread and back. A
                # retry goes to the thread.
                waited_on = self._flush_target > self._durable_seq and not failures
                write_now = self._write_now if waited_on else None
                if write_now is None or not write_now(rows, graphs):
                    await asyncio.to_thread(self._write, rows, graphs)
            except Exception as exc:
                failures += 1
                self._failing = True
                self._observer.inspection_write_failed()
                if self._stopping and failures >= CLOSE_ATTEMPTS:
                    log.error("closing %s: giving up after %d failed writes; %d inspection records are lost",
                              self._location, failures, len(self._queue), exc_info=exc)  # fmt: skip
                    self._observer.inspection_records_dropped(len(self._queue), "closing")
                    self._error = exc
                    return
                delay = min(_RETRY_MIN_S * 2 ** (failures - 1), _RETRY_MAX_S)
                log.warning("writing %d inspection records to %s failed (%s); they stay queued, retrying in %.2fs",
                            len(batch), self._location, exc, delay)  # fmt: skip
                await asyncio.sleep(delay)
                continue
            failures, self._failing = 0, False
            for written in batch:
                self._queue.popleft()
                self._bytes -= written.nbytes
                # A newer put of the same id is still queued: keep serving that one.
                if self._by_id.get(written.row.id) is written:
                    del self._by_id[written.row.id]
            self._durable_seq = batch[-1].seq
            self._pulse()

    def _on_done(self, task: asyncio.Task[None]) -> None:
        if self._dropping:
            self._end_dropping("has stopped")
        if task.cancelled():
            self._error = self._error or RuntimeError("the writer task was cancelled")
        elif (exc := task.exception()) is not None:
            log.error("inspection writer for %s crashed", self._location, exc_info=exc)
            self._error = exc
        self._pulse()


def _settle(waiter: asyncio.Future[bool], committed: bool) -> None:
    if not waiter.done():
        waiter.set_result(committed)
