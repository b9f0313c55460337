"""Heavy reads in low-priority reader processes, so that they never starve inference.

A listing builds each record's JSON, an export encodes Parquet, a summary merges
rollups and a picture draws with matplotlib: all of it Python holding the GIL. Run in
the server's threads, on two cores, it took most of the CPU and the GIL from the event
loop, the decode threads and the model worker (inference kept 0.08x its throughput
beside a looping listing; ``docs/performance.md``). ``ReaderPool`` runs that work in
up to ``workers`` child processes instead, each started once (at its first read) at
niceness ``niceness``, so the kernel gives the CPU to inference first and the reads
take what is left. Each child opens the backend itself (``readjobs.py``) and streams
the response body back over a pipe; the server only forwards bytes.

* **At most ``workers`` reads at once**; another waits up to ``HEAVY_WAIT_S`` for a
  child, then gets a 503 with ``Retry-After``.
* **Bounded memory**: a child sends at most ``WINDOW`` chunks ahead of the client.
* **A client that goes away** cancels the work at the child's next chunk; the child
  then takes the next read. One that does not answer the cancel within
  ``_CANCEL_TIMEOUT_S`` is killed and replaced.
* **A child that dies** fails its read with a 503 ``read_worker_failed`` (JSON, when
  the answer has not started) and is replaced by the next read.
* **No orphans**: ``close`` stops every child; a child whose server dies sees its pipe
  close and exits, and children are daemonic (killed at the interpreter's exit).
* **Inference first** (``yield_s``, ``DGSERVE_READ_YIELD_MS``): unless ``idle_s()`` says
  this process's inference has been quiet for ``_QUIET_S`` (no request arriving or
  computing), a read waits for that, up to ``yield_s``, before it takes a process and
  before each further chunk. Niceness orders the children's CPU against inference, but
  not the server's own work for a read (its HTTP, forwarding the chunks) nor the
  client's; a summary looped back to back cost inference about a sixth of its
  throughput on two cores. Waiting paces a read under load; an idle server reads at
  full speed.

The pipe is read in a thread of the pool's own (one per child), never on the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

from dgserve import errors
from dgserve.inspection.analysis import HEAVY_WAIT_S
from dgserve.inspection.readjobs import Job, _child_main

__all__ = ["ReaderPool"]

log = logging.getLogger(__name__)

# Inference counts as quiet after this long with no request arriving or computing. The
# instant test (nothing queued now) let reads through in the gaps between one batch's
# answers and the next requests, a few milliseconds under a steady load.
_QUIET_S = 0.05
_START_TIMEOUT_S = 60.0  # imports and opening the backend, at nice 19 on a busy machine
_CANCEL_TIMEOUT_S = 30.0
_EXIT_TIMEOUT_S = 5.0


class _Child:
    """One reader process and the server's end of its pipe."""

    def __init__(self, process: BaseProcess, conn: Connection, executor: ThreadPoolExecutor) -> None:
        self.process, self.conn, self._executor = process, conn, executor
        self._pending: asyncio.Future[Any] | None = None
        self._sending: asyncio.Future[None] | None = None

    async def receive(self) -> Any:
        """The child's next message. A read cancelled meanwhile leaves its receive to the next
        caller, so one thread at most ever reads the pipe."""
        if self._pending is None:
            self._pending = asyncio.get_running_loop().run_in_executor(self._executor, self.conn.recv)
        future = self._pending
        try:
            return await asyncio.shield(future)
        finally:
            if future.done():
                self._pending = None

    async def send(self, message: Any) -> None:
        # In a thread: a picture's record can be megabytes, more than the pipe's buffer.
        # Kept, so that a cancel is written only after the job (never into it).
        self._sending = asyncio.get_running_loop().run_in_executor(self._executor, self.conn.send, message)
        await asyncio.shield(self._sending)

    def stop(self, kill: bool) -> None:
        """Blocking: ask the child to exit (or kill it), and reap it."""
        if not kill:
            with contextlib.suppress(OSError):
                self.conn.send(None)
            self.process.join(_EXIT_TIMEOUT_S)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(_EXIT_TIMEOUT_S)
        self.conn.close()


class ReaderPool:
    """Up to ``workers`` reader processes over the inspection store at ``location``."""

    def __init__(
        self, location: str | os.PathLike[str], *, workers: int, niceness: int = 19,
        idle_s: Callable[[], float] | None = None, yield_s: float = 0.0,
    ) -> None:  # fmt: skip
        if workers < 1:
            raise ValueError(f"workers must be at least 1, got {workers}")
        self._location, self._niceness = str(location), niceness
        self._idle_s, self._yield_s = idle_s, yield_s
        self._slots = asyncio.Semaphore(workers)
        self._idle: list[_Child] = []
        self._children: set[_Child] = set()
        self._executor = ThreadPoolExecutor(max_workers=2 * workers + 1, thread_name_prefix="dgserve-readers")
        self._background: set[asyncio.Task[None]] = set()
        self._closed = False

    @property
    def pids(self) -> list[int]:
        """The reader processes' ids (tests check that none outlives the pool)."""
        return [c.process.pid for c in self._children if c.process.pid is not None]

    async def result(self, job: Job) -> bytes:
        """The whole body of ``job``: for answers that are sent only once complete."""
        return b"".join([chunk async for chunk in self.stream(job)])

    async def stream(self, job: Job) -> AsyncIterator[bytes]:
        """``job``'s body as the child makes it. Errors the child raises come back typed;
        closing the iterator early cancels the rest of the work."""
        await self._yield()  # before taking a process: a read cancelled while it waits holds none
        child = await self._acquire()
        finished = False
        try:
            await child.send(job)
            while True:
                message = await child.receive()
                if message[0] == "chunk":
                    yield message[1]
                    await self._yield()
                    child.conn.send(("credit",))  # a few bytes; at most WINDOW are ever unread
                    continue
                finished = True
                if message[0] == "error":
                    raise _rebuild(message)
                return
        except (EOFError, OSError) as exc:
            finished = True
            self._discard(child, kill=True)
            log.error("a reader process died during a read (exit code %s)", child.process.exitcode)
            raise errors.ReadWorkerError("the process reading the inspections died; try again") from exc
        finally:
            if child not in self._children:  # it died, or the pool closed
                self._slots.release()
            elif finished:
                self._release(child)
            else:  # the client went away, or the server is stopping
                self._spawn_background(self._abandon(child))

    async def _yield(self) -> None:
        """Wait until inference has been quiet for ``_QUIET_S``, for ``yield_s`` at most."""
        if self._idle_s is None or self._yield_s <= 0:
            return
        loop = asyncio.get_running_loop()
        until = loop.time() + self._yield_s
        while (idle := self._idle_s()) < _QUIET_S and (left := until - loop.time()) > 0:
            await asyncio.sleep(min(_QUIET_S - idle, left))

    async def close(self) -> None:
        """Stop every child (busy ones are killed) and wait for them to exit. Idempotent."""
        self._closed = True
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        children, idle = list(self._children), set(self._idle)
        self._children.clear()
        self._idle = []
        busy = {c for c in children if c not in idle}
        loop = asyncio.get_running_loop()
        await asyncio.gather(*(loop.run_in_executor(self._executor, c.stop, c in busy) for c in children))
        self._executor.shutdown(wait=False, cancel_futures=True)

    # --- children ---------------------------------------------------------------------

    async def _acquire(self) -> _Child:
        if self._closed:
            raise errors.ShuttingDownError("the server is stopping")
        try:
            await asyncio.wait_for(self._slots.acquire(), HEAVY_WAIT_S)
        except TimeoutError:
            raise errors.QueueFullError("every analysis slot is busy; try again shortly", retry_after_s=5.0) from None
        try:
            while self._idle:
                child = self._idle.pop()
                if child.process.is_alive():
                    return child
                self._discard(child, kill=True)
            return await self._spawn()
        except BaseException:
            self._slots.release()
            raise

    async def _spawn(self) -> _Child:
        context = multiprocessing.get_context("spawn")  # never fork a server with threads running
        parent, child_end = context.Pipe()
        process = context.Process(target=_child_main, args=(child_end, self._location, self._niceness),
                                  name="dgserve-reader", daemon=True)  # fmt: skip
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, process.start)
        child_end.close()
        child = _Child(process, parent, self._executor)
        self._children.add(child)
        try:
            async with asyncio.timeout(_START_TIMEOUT_S):
                first = await child.receive()
        except (TimeoutError, EOFError, OSError) as exc:
            self._discard(child, kill=True)
            raise errors.ReadWorkerError("a process to read the inspections could not start") from exc
        if first[0] == "error":
            self._discard(child, kill=False)
            raise _rebuild(first)
        log.info("reader process %s started (nice %d)", process.pid, self._niceness)
        return child

    def _release(self, child: _Child) -> None:
        if self._closed:
            self._discard(child, kill=False)
        else:
            self._idle.append(child)
        self._slots.release()

    def _discard(self, child: _Child, kill: bool) -> None:
        """Forget ``child`` and reap it in the background; its slot is the caller's to release."""
        if child not in self._children:
            return
        self._children.discard(child)
        with contextlib.suppress(RuntimeError):  # the executor is shut down: close() reaps
            self._executor.submit(child.stop, kill)

    async def _abandon(self, child: _Child) -> None:
        """Cancel ``child``'s read and take it back once it has stopped (or kill it)."""
        try:
            if child._sending is not None:
                await asyncio.wait_for(asyncio.shield(child._sending), _CANCEL_TIMEOUT_S)
            child.conn.send(("cancel",))
            async with asyncio.timeout(_CANCEL_TIMEOUT_S):
                while (await child.receive())[0] == "chunk":
                    pass
        except (TimeoutError, EOFError, OSError):
            log.warning("reader process %s did not stop its read; replacing it", child.process.pid)
            self._discard(child, kill=True)
            self._slots.release()
            return
        self._release(child)

    def _spawn_background(self, work: Any) -> None:
        task = asyncio.get_running_loop().create_task(work, name="dgserve-reader-cancel")
        self._background.add(task)
        task.add_done_callback(self._background.discard)


def _rebuild(message: tuple[str, str, dict[str, Any]]) -> errors.DGServeError:
    """The typed error a child sent, as ``dgserve.errors`` defines it."""
    _, name, attributes = message
    cls = getattr(errors, name, None)
    if not (isinstance(cls, type) and issubclass(cls, errors.DGServeError)):
        cls = errors.DGServeError
    error: errors.DGServeError = cls.__new__(cls)
    Exception.__init__(error, attributes.get("message", ""))
    vars(error).update(attributes)
    return error
