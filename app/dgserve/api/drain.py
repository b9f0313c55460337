"""The SIGTERM drain: answer every request the server accepted, then exit.

uvicorn's own SIGTERM handling closes the listener at once, which resets the
connections still in the kernel's accept backlog and refuses new ones with no HTTP
answer, and, after its graceful-shutdown timeout, cancels whatever still runs, which it
answers with a plain-text 500. So ``DrainingServer`` takes the first SIGTERM (what
Kubernetes and ``docker stop`` send) and, counting from the signal:

1. **At once**, ``/readyz`` and every new request but ``/healthz`` and ``/metrics`` get
   ``503 shutting_down`` with ``Retry-After`` (``DrainGuard``): a load balancer takes
   the replica out, and a client retries elsewhere. Every answer from now on, to
   requests in flight too, carries ``Connection: close``, so no client is left holding
   a kept-alive connection that the shutdown will close under its next request.
2. **After** ``DGSERVE_SHUTDOWN_GRACE_S`` (balancers that have not noticed yet still
   get an HTTP answer), the listener stops answering handshakes and closes. Connections
   the kernel had already completed are taken in from its backlog and answered, not
   reset: their clients think they are connected (``api/listening.py``).
3. Requests in flight and queued run until ``DGSERVE_DRAIN_TIMEOUT_S`` after the
   signal. Then ``ServingService.stop_work`` fails what is still queued or computing
   with ``ShuttingDownError``, which the one error handler answers as JSON 503.
4. uvicorn's shutdown follows, its timeout now only a backstop (whatever it cancels,
   ``RequestContextMiddleware`` answers as JSON 503), and then the lifespan closes the
   service, which flushes the inspection store: every answered request's record is
   committed before the process exits.
5. A shutdown still running ``_STUCK_DUMP_S`` past all that is stuck: each task's chain
   of awaits is logged, and a second later every thread's stack goes to stderr, so the
   logs say on what, before it is killed.

A second SIGTERM, or SIGINT (Ctrl+C at a terminal), skips the rest: uvicorn's own
shutdown, at once, with the backstop as its timeout.
"""

from __future__ import annotations

import asyncio
import faulthandler
import gc
import inspect
import logging
import signal
import socket
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from functools import partial
from types import FrameType
from typing import Any

import uvicorn
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from dgserve.api.errors import typed_error_response
from dgserve.api.listening import close_listener
from dgserve.errors import ShuttingDownError

__all__ = ["ANSWER_S", "BACKSTOP_S", "TAIL_S", "DrainGuard", "DrainState", "DrainingServer"]

log = logging.getLogger(__name__)

# After the deadline's ShuttingDownError, how long requests get to send their 503s
# (or a 200 that only waited on its record's commit) before uvicorn's shutdown starts.
ANSWER_S = 2.0
# uvicorn's graceful-shutdown timeout, which now starts after the drain: only for what
# neither finished nor heard ShuttingDownError (a long NDJSON export, a body still arriving).
BACKSTOP_S = 3.0
# The most the HTTP shutdown takes past DGSERVE_DRAIN_TIMEOUT_S (Kubernetes' grace period
# must cover it: tests/deploy/test_kubernetes.py).
TAIL_S = ANSWER_S + BACKSTOP_S
# Past the drain and TAIL_S, what the lifespan's close may still take: the gRPC service's
# 5 s grace and the store's flush retries (about 15 s against a database that is down).
# A shutdown still running then is stuck: it logs where, once (module docstring, step 5).
_STUCK_DUMP_S = 25.0
# Liveness must not fail while the replica drains, and Prometheus scrapes to the end.
_STILL_OPEN = frozenset({"/healthz", "/metrics"})
_POLL_S = 0.05


@dataclass(eq=False)
class DrainState:
    """Whether the server drains: set once, from the signal handler, read on every request."""

    draining: bool = False


class DrainGuard:
    """Refuses new requests while draining (503 ``shutting_down``), and ends kept-alive
    connections with ``Connection: close`` on every answer sent meanwhile (plain ASGI)."""

    def __init__(self, app: ASGIApp, drain: DrainState) -> None:
        self.app = app
        self.drain = drain

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.drain.draining and scope["path"] not in _STILL_OPEN:
            exc = ShuttingDownError("the server is shutting down; retry, another replica will answer")
            await typed_error_response(scope, exc)(scope, receive, self._closing(send))
            return
        await self.app(scope, receive, self._closing(send))

    def _closing(self, send: Send) -> Send:
        # Checked when the answer starts, not when the request did: a request in flight
        # at the signal ends its connection too.
        async def send_closing(message: Message) -> None:
            if message["type"] == "http.response.start" and self.drain.draining:
                message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
            await send(message)

        return send_closing


def _log_task_stacks() -> None:
    """Log where each of the loop's tasks waits: the shutdown has run past its limits."""
    stacks = "".join(f"{task!r}\n{_await_stack(task.get_coro())}" for task in asyncio.all_tasks())
    log.error("shutdown stuck; the event loop's tasks, each from its outermost call to what it awaits:\n%s", stacks)


def _await_stack(awaitable: object) -> str:
    """Each frame of a suspended coroutine's chain of awaits. ``Task.print_stack`` shows
    only the outermost (Python 3.11), which says nothing of what it waits on."""
    lines = []
    for _ in range(100):  # a chain of awaits ends; this bounds a cycle all the same
        frame = next((f for a in ("cr_frame", "gi_frame", "ag_frame") if (f := getattr(awaitable, a, None))), None)
        if frame is not None:
            lines.append(f'  File "{frame.f_code.co_filename}", line {frame.f_lineno}, in {frame.f_code.co_name}\n')
            inner = next((w for a in ("cr_await", "gi_yieldfrom", "ag_await") if (w := getattr(awaitable, a, None))), None)
        elif type(awaitable).__name__ in ("async_generator_asend", "async_generator_athrow"):
            # An async generator's step (an asynccontextmanager's __aexit__ awaits one)
            # holds the generator without naming it: only the GC's referents do.
            inner = next((r for r in gc.get_referents(awaitable) if inspect.isasyncgen(r)), None)
        else:
            inner = None
        if inner is None:
            lines.append(f"  awaiting {awaitable!r}\n")
            break
        awaitable = inner
    return "".join(lines)


class DrainingServer(uvicorn.Server):
    """uvicorn's server, whose first SIGTERM starts the drain (module docstring)."""

    def __init__(
        self,
        config: uvicorn.Config,
        drain: DrainState,
        stop_work: Callable[[], Awaitable[None]],
        grace_s: float,
        timeout_s: float,
    ) -> None:
        super().__init__(config)
        self.drain = drain
        self._stop_work = stop_work
        self._grace_s = grace_s
        self._timeout_s = timeout_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: set[asyncio.Task[Any]] = set()  # the drain and adopted connections, kept referenced
        self._stuck_dump: asyncio.TimerHandle | None = None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        self._loop = asyncio.get_running_loop()

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if sig != signal.SIGTERM or self._loop is None or self.drain.draining or self.should_exit:
            super().handle_exit(sig, frame)  # Ctrl+C, still starting, or a second signal: stop now
            return
        # Signal handlers run on the loop's own thread, between two bytecodes: setting the
        # flag here turns /readyz 503 before the loop even wakes up.
        self.drain.draining = True
        self._loop.call_soon_threadsafe(self._spawn, self._drain())
        # What a stuck shutdown waits on is then in the logs, before the supervisor or the
        # orchestrator kills the process: the stacks of the loop's tasks (a close awaiting
        # what never comes) and, should the loop itself be blocked, of every thread.
        stuck_s = self._timeout_s + TAIL_S + _STUCK_DUMP_S
        self._stuck_dump = self._loop.call_later(stuck_s, _log_task_stacks)
        faulthandler.dump_traceback_later(stuck_s + 1.0, exit=False)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        try:
            await super().shutdown(sockets)  # the lifespan's close too
        finally:
            faulthandler.cancel_dump_traceback_later()
            if self._stuck_dump is not None:
                self._stuck_dump.cancel()

    def _spawn(self, work: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._timeout_s
        log.info("draining: new requests get 503 shutting_down; the listener closes in %g s, "
                 "requests in flight have %g s", self._grace_s, self._timeout_s)  # fmt: skip
        await asyncio.sleep(self._grace_s)
        await self._close_listeners()
        log.info("draining: the listener is closed; %d requests in flight", len(self.server_state.tasks))
        if not await self._requests_done(deadline):
            log.warning("draining: %d requests still running at the drain timeout get 503 shutting_down",
                        len(self.server_state.tasks))  # fmt: skip
            await self._stop_work()
            await self._requests_done(loop.time() + ANSWER_S)
        self.should_exit = True  # uvicorn's shutdown, then the lifespan's: the records flush

    async def _requests_done(self, until: float) -> bool:
        """Wait until no request runs (uvicorn's request tasks), or ``until``; whether none runs."""
        loop = asyncio.get_running_loop()
        while self.server_state.tasks and loop.time() < until:
            await asyncio.sleep(_POLL_S)
        return not self.server_state.tasks

    async def _close_listeners(self) -> None:
        """Stop listening, but answer the connections the kernel completed (``api/listening.py``).

        A duplicate of each listening socket keeps it open, once uvicorn's own is closed,
        while its backlog is taken in here."""
        loop = asyncio.get_running_loop()
        config = self.config
        protocol = partial(config.http_protocol_class, config=config, server_state=self.server_state,
                           app_state=self.lifespan.state)  # fmt: skip

        def take(connection: socket.socket) -> None:
            self._spawn(loop.connect_accepted_socket(protocol, connection))

        listeners = []
        for server in self.servers:
            listeners += [sock.dup() for sock in server.sockets]
            server.close()
        await asyncio.gather(*(close_listener(listener, take) for listener in listeners))
