"""Dynamic batching in pure asyncio: many callers, one bounded queue, a pool of workers.

Callers ``await batcher.submit(item)``; workers take batches off one shared queue and
each runs its own handler (one per device instance), so N workers compute N batches at
once. A batch is released when it holds ``max_batch_size`` items, or when its oldest
item has waited ``max_delay_s``, whichever comes first.

Guarantees every caller relies on:

* ``submit`` never blocks on a full queue: it raises ``QueueFullError`` at once.
* A caller's deadline is enforced by a timer on the caller's side, so the error arrives
  at the deadline even when every worker is busy; a request still queued then, or whose
  caller was cancelled, is dropped and never reaches a handler.
* Every future gets a result or an exception, whatever fails: the handler raising,
  returning the wrong number of results, being cancelled, or the batcher stopping.

Nothing here imports torch or FastAPI; handlers run the model (in a thread) themselves.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Generic, Literal, Protocol, TypeVar

from dgserve.errors import DeadlineExceededError, NotReadyError, QueueFullError, ShuttingDownError
from dgserve.serving.drain_estimate import DrainEstimate
from dgserve.serving.reservation import Reservation

__all__ = ["BatchObserver", "DynamicBatcher", "Handler", "RejectReason"]

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

Handler = Callable[[list[T]], Awaitable[Sequence[R]]]
"""``async def handler(items) -> results``, one result per item, in the same order."""

RejectReason = Literal["queue_full", "deadline", "cancelled", "shutting_down"]


class BatchObserver(Protocol):
    """Metrics hooks. Called on the event loop, so they must be quick and not block.

    An observer that raises is logged and ignored: metrics never break serving.
    """

    def batch_formed(self, size: int, queue_wait_s: Sequence[float]) -> None:
        """A worker took ``size`` items; ``queue_wait_s[i]`` is how long item i queued."""

    def batch_done(self, size: int, compute_s: float, ok: bool) -> None:
        """A handler call finished (``ok=False``: it raised, miscounted or was cancelled)."""

    def rejected(self, reason: RejectReason) -> None:
        """One request ended without a result from a handler, for ``reason``."""


@dataclass(eq=False)  # identity equality: deque.remove must find this very entry
class _Entry(Generic[T, R]):
    item: T
    future: asyncio.Future[R]
    enqueued_at: float
    deadline: float | None


class DynamicBatcher(Generic[T, R]):
    """One model's request queue and its pool of workers (one per handler).

    ``stop()`` stops accepting work, lets in-flight batches finish, and fails queued
    requests with ``ShuttingDownError`` -- or, with ``drain=True``, serves them first.
    """

    def __init__(
        self,
        handlers: Sequence[Handler[T, R]],
        *,
        max_batch_size: int,
        max_delay_s: float,
        max_queue_size: int,
        name: str = "batcher",
        observer: BatchObserver | None = None,
    ) -> None:
        if not handlers:
            raise ValueError("need at least one handler (one per worker)")
        if max_batch_size < 1 or max_queue_size < 1:
            raise ValueError("max_batch_size and max_queue_size must be >= 1")
        if max_delay_s < 0:
            raise ValueError("max_delay_s must be >= 0")
        self.name = name
        self.max_batch_size = max_batch_size
        self.max_delay_s = max_delay_s
        self.max_queue_size = max_queue_size
        self._handlers = list(handlers)
        self._observer = observer
        self._queue: deque[_Entry[T, R]] = deque()
        # Only the worker holding _forming waits on _wakeup, so one Event is enough;
        # the others queue on the lock and form the next batch in FIFO order.
        self._forming = asyncio.Lock()
        self._wakeup = asyncio.Event()
        self._workers: list[asyncio.Task[None]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        self._in_flight = 0
        self._reserved = 0  # places held by admitted requests still decoding (Reservation)
        self._active_at = -math.inf  # loop time of the last arrival or finished batch (idle_s)
        self.estimate = DrainEstimate(max_batch_size, len(self._handlers))  # for Retry-After

    # --- public API -----------------------------------------------------------

    @property
    def queue_depth(self) -> int:
        """Requests waiting for a worker."""
        return len(self._queue)

    @property
    def full(self) -> bool:
        """Whether a request arriving now would be refused for want of room (no side effects)."""
        return len(self._queue) + self._reserved >= self.max_queue_size

    @property
    def in_flight(self) -> int:
        """Items inside handler calls right now."""
        return self._in_flight

    @property
    def idle_s(self) -> float:
        """Seconds since a request last arrived or a batch last finished; 0 while any waits or computes."""
        idle = not (self._queue or self._in_flight)
        return (self._loop.time() - self._active_at if self._loop else math.inf) if idle else 0.0

    @property
    def num_workers(self) -> int:
        return len(self._handlers)

    def start(self) -> None:
        """Start one worker task per handler on the running loop."""
        if self._loop is not None:
            raise RuntimeError(f"{self.name}: already started")
        self._loop = asyncio.get_running_loop()
        self._workers = [
            self._loop.create_task(self._worker(h), name=f"{self.name}-worker-{i}")
            for i, h in enumerate(self._handlers)
        ]

    def check_admission(self) -> None:
        """Raise (and count) what ``submit`` would raise now for want of room.

        Callers with costly work before ``submit`` (decoding a body) ask first, so an
        overloaded model refuses cheaply; ``QueueFullError`` carries the drain estimate.
        """
        self._check_open()
        if self.full:
            self._notify_rejected("queue_full")
            raise QueueFullError(
                f"{self.name}: queue full ({self.max_queue_size} waiting)",
                retry_after_s=self.estimate.retry_after_s(len(self._queue)),
            )

    def _check_open(self) -> None:
        if self._closed:
            self._notify_rejected("shutting_down")
            raise ShuttingDownError(f"{self.name} is shutting down")
        if self._loop is None:
            raise NotReadyError(f"{self.name} has not been started")

    def reserve(self) -> Reservation:
        """``check_admission``, then hold a place for the caller's item until it is submitted."""
        self.check_admission()
        return Reservation(self)

    async def submit(self, item: T, *, deadline: float | None = None, reservation: Reservation | None = None) -> R:
        """Queue ``item`` and wait for its result.

        ``deadline`` is an absolute ``loop.time()``. Raises ``QueueFullError`` (queue
        full, at once), ``DeadlineExceededError`` (at the deadline, queued or computing),
        ``ShuttingDownError``, ``NotReadyError`` (before ``start()``), or whatever the
        handler raised for this item's batch.
        """
        if reservation is not None and reservation.take():
            self._check_open()  # its place was held: only a stop refuses it now
        else:
            self.check_admission()
        loop = self._loop
        assert loop is not None  # check_admission raised otherwise
        now = loop.time()
        if deadline is not None and deadline <= now:
            self._notify_rejected("deadline")
            raise DeadlineExceededError(f"{self.name}: deadline already passed at submit")

        entry: _Entry[T, R] = _Entry(item, loop.create_future(), now, deadline)
        self._queue.append(entry)
        self._active_at = now
        self._wakeup.set()
        timer = loop.call_at(deadline, self._expire, entry) if deadline is not None else None
        try:
            return await entry.future
        except asyncio.CancelledError:
            # The client went away. Awaiting has normally cancelled the future already,
            # so a worker will skip it; removing it now also frees its queue slot.
            entry.future.cancel()
            if entry.future.cancelled():
                self._discard(entry)
                self._notify_rejected("cancelled")
            else:
                entry.future.exception()  # it finished first: mark the outcome retrieved
            raise
        finally:
            if timer is not None:
                timer.cancel()

    async def stop(self, *, drain: bool = False, timeout: float | None = None) -> None:
        """Stop accepting work and wait for the workers to exit.

        In-flight batches always finish. Queued requests fail with ``ShuttingDownError``
        unless ``drain=True``, in which case they are served first. After ``timeout``
        seconds the workers are cancelled and whatever they held or left queued fails
        with ``ShuttingDownError``. Safe to call more than once.
        """
        if not self._closed:
            self._closed = True
            if not drain:
                self._fail_queued()
            self._wakeup.set()  # idle workers see _closed and exit
        workers = self._workers
        try:
            if workers:
                await asyncio.wait(workers, timeout=timeout)
        finally:
            for task in workers:
                task.cancel()  # no-op for those already done
        # Retrieves every worker's outcome, so none is logged as never retrieved.
        await asyncio.gather(*workers, return_exceptions=True)
        self._fail_queued()  # a drain cut short by the timeout may have left some

    async def __aenter__(self) -> DynamicBatcher[T, R]:
        self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    # --- workers --------------------------------------------------------------

    async def _worker(self, handler: Handler[T, R]) -> None:
        while (batch := await self._next_batch()) is not None:
            await self._run_batch(handler, batch)

    async def _next_batch(self) -> list[_Entry[T, R]] | None:
        """Wait for a batch to be due and take it; None once closed and empty."""
        assert self._loop is not None
        async with self._forming:
            while True:
                self._drop_dead_head()
                if not self._queue:
                    if self._closed:
                        return None
                    await self._wait_for_wakeup(None)
                    continue
                # The delay runs from the oldest item's arrival, not from when this
                # worker got here: items that queued behind a busy pool go out at once.
                flush_at = self._queue[0].enqueued_at + self.max_delay_s
                due = (
                    len(self._queue) >= self.max_batch_size
                    or self._closed  # draining: nothing more will arrive, don't wait
                    or self._loop.time() >= flush_at
                )
                if not due:
                    await self._wait_for_wakeup(flush_at)
                    continue
                batch = self._take_batch()
                if batch:
                    return batch

    async def _wait_for_wakeup(self, until: float | None) -> None:
        # Clearing and checking happen with no await in between, so no wakeup is lost.
        self._wakeup.clear()
        if until is None:
            await self._wakeup.wait()
            return
        try:
            async with asyncio.timeout_at(until):
                await self._wakeup.wait()
        except TimeoutError:
            pass

    def _take_batch(self) -> list[_Entry[T, R]]:
        batch: list[_Entry[T, R]] = []
        while self._queue and len(batch) < self.max_batch_size:
            entry = self._queue.popleft()
            if self._is_live(entry):  # dead entries don't take a slot
                batch.append(entry)
        return batch

    def _drop_dead_head(self) -> None:
        # A dead head would otherwise set the flush time for the live items behind it.
        while self._queue:
            head = self._queue[0]
            if self._is_live(head):
                return
            self._discard(head)  # _is_live may have removed it already

    def _is_live(self, entry: _Entry[T, R]) -> bool:
        assert self._loop is not None
        if entry.deadline is not None and entry.deadline <= self._loop.time():
            self._expire(entry)  # its timer may not have run yet; never compute it
        return not entry.future.done()

    async def _run_batch(self, handler: Handler[T, R], batch: list[_Entry[T, R]]) -> None:
        assert self._loop is not None
        started = self._loop.time()
        waits = [started - e.enqueued_at for e in batch]
        self._notify(lambda o: o.batch_formed(len(batch), waits))
        self._in_flight += len(batch)
        try:
            try:
                results = await handler([e.item for e in batch])
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise  # stop() is cancelling this worker
                # The handler cancelled itself; its callers must not read that as
                # their own cancellation, and this worker keeps serving.
                raise RuntimeError(f"{self.name}: handler was cancelled") from None
            if len(results) != len(batch):
                raise RuntimeError(
                    f"{self.name}: handler returned {len(results)} results "
                    f"for a batch of {len(batch)}"
                )
        except Exception as exc:
            log.warning("%s: batch of %d failed: %r", self.name, len(batch), exc)
            self._fail(batch, exc)
            self._batch_done(len(batch), started, ok=False)
            return
        except BaseException:
            self._fail(batch, ShuttingDownError(f"{self.name}: stopped during compute"))
            self._batch_done(len(batch), started, ok=False)
            raise
        finally:
            self._in_flight -= len(batch)
            self._active_at = self._loop.time()
        for entry, result in zip(batch, results):
            if not entry.future.done():  # its caller may have left or timed out meanwhile
                entry.future.set_result(result)
        self._batch_done(len(batch), started, ok=True)

    def _batch_done(self, size: int, started: float, *, ok: bool) -> None:
        assert self._loop is not None
        took = self._loop.time() - started
        self.estimate.batch_took(took)
        self._notify(lambda o: o.batch_done(size, took, ok))

    # --- request bookkeeping --------------------------------------------------

    def _expire(self, entry: _Entry[T, R]) -> None:
        if entry.future.done():
            return
        self._discard(entry)
        assert self._loop is not None
        waited = self._loop.time() - entry.enqueued_at
        entry.future.set_exception(
            DeadlineExceededError(f"{self.name}: deadline passed after {waited:.3f}s")
        )
        self._notify_rejected("deadline")

    def _discard(self, entry: _Entry[T, R]) -> None:
        try:
            self._queue.remove(entry)
        except ValueError:
            pass  # already taken by a worker, or already dropped

    def _fail_queued(self) -> None:
        while self._queue:
            entry = self._queue.popleft()
            if not entry.future.done():
                entry.future.set_exception(ShuttingDownError(f"{self.name} is shutting down"))
                self._notify_rejected("shutting_down")

    @staticmethod
    def _fail(batch: list[_Entry[T, R]], exc: BaseException) -> None:
        for entry in batch:
            if not entry.future.done():
                entry.future.set_exception(exc)

    def _notify_rejected(self, reason: RejectReason) -> None:
        self._notify(lambda o: o.rejected(reason))

    def _notify(self, call: Callable[[BatchObserver], None]) -> None:
        if self._observer is None:
            return
        try:
            call(self._observer)
        except Exception:
            log.exception("%s: observer hook failed", self.name)
