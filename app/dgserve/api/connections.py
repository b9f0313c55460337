"""Connection-level guards around uvicorn's HTTP/1.1 protocol: read timeouts, a connection
cap, and a lingering close, none of which uvicorn has.

Each guard answers a way a client can hold the server without sending a request:

* **Header timeout** (``DGSERVE_HEADER_TIMEOUT_S``). A request's headers must arrive
  within this many seconds of its first byte, or of the connection's opening, or of the
  previous response on a kept-alive connection. Else ``408`` and close. uvicorn only
  has a keep-alive timeout, which any byte resets, so a client that sends one header
  byte a second (slow loris) held a connection forever; nginx's
  ``client_header_timeout`` and Apache's ``mod_reqtimeout`` close it.
* **Body timeout with a rate floor** (``DGSERVE_BODY_TIMEOUT_S``,
  ``DGSERVE_BODY_MIN_RATE``), as ``mod_reqtimeout``'s ``body=20,MinRate=500``: the body
  has ``body_timeout_s`` from the end of its headers, and every byte received extends
  that by ``1 / body_min_rate`` s, so a body sent at the floor or faster never times
  out (its size is capped by ``DGSERVE_MAX_BODY_BYTES``), while one trickled in does.
  The clock stops while the server itself has paused reading (the app has not caught
  up). On expiry before the app answered: ``408`` and close; the app's read ends as a
  client disconnect.
* **Connection cap** (``DGSERVE_MAX_CONNECTIONS``). A connection over the cap gets
  ``503`` with ``Retry-After`` at once and is closed, before anything is parsed.
  uvicorn's ``limit_concurrency`` is no help here: it counts only when headers are
  complete, which a slow loris never reaches.
* **Lingering close.** When the server closes a connection (``Connection: close``, or
  an error) while the client is still sending the request body, e.g. a 413 answered
  from ``Content-Length`` alone, closing at once makes the kernel send a reset, and a
  client that writes its whole body before reading (Python's urllib, most simple
  clients) sees ``ECONNRESET`` instead of the 413. So, as nginx's ``lingering_close``
  does, the answer is sent, the sending side is shut down, and what the client still
  sends is read and thrown away until it closes, for at most ``LINGER_S`` in all,
  ``LINGER_IDLE_S`` without data, and ``LINGER_MAX_BYTES``. The same caps bound a
  kept-alive connection that goes on sending a body nobody reads after its answer.

The guards are a subclass of uvicorn's httptools protocol (the one ``uvicorn[standard]``
picks): it keeps uvicorn's parsing and ASGI cycle, and adds one timer per connection.
It also writes the answers the admission gate gives at the headers (``api/admission.py``),
at most one refusal per connection per ``REFUSAL_INTERVAL_S``.
"""

from __future__ import annotations

import asyncio
import http
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from dgserve.api.admission import EarlyAnswer
from dgserve.api.early_cycles import Answered, Held
from dgserve.api.errors import error_body
from dgserve.randomness import request_id as new_request_id

__all__ = ["LINGER_IDLE_S", "LINGER_MAX_BYTES", "LINGER_S", "ConnectionLimits", "protocol_class"]

log = logging.getLogger(__name__)

# nginx's lingering_time and lingering_timeout; the byte cap bounds what one client can
# make the server read for nothing (a 64 MiB upload refused with 413 still reads back).
LINGER_S = 30.0
LINGER_IDLE_S = 5.0
LINGER_MAX_BYTES = 256 * 2**20
# A refused connection's request is a few hundred bytes: wait that long for it at most.
_REFUSED_LINGER_S = 1.0
# A connection gets at most one 503 for a full queue (the admission gate's refusals,
# api/admission.py) in this many seconds: a refusal due sooner is held until then. A
# refusal's latency is this plus the loop's lateness at its p99 under 25x overload with 2
# server processes, 10-17 ms depending on the hour. 40 ms put the 503s' p99 at 48.5-51.2
# ms, 35 ms at 44-47 ms in a fast hour and 48-52 ms in a slow one, 30 ms at 43-47 ms in
# the slow one, with goodput as high each time (docs/performance.md, "Two server
# processes by default"). Shorter refuses more often, which costs goodput in the end.
REFUSAL_INTERVAL_S = 0.03


_Phase = Literal["headers", "body", "idle", "draining", "lingering"]


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    header_timeout_s: float
    body_timeout_s: float
    body_min_rate: float  # bytes per second that earn a second more
    max_connections: int | None


# ``(method, url, headers, app, scope state) -> ASGI app``: the app to run the request with
# (``api/admission.py``).
Gate = Callable[[bytes, bytes, Sequence[tuple[bytes, bytes]], Any, dict[str, Any]], Any]


def protocol_class(limits: ConnectionLimits, gate: Gate | None = None) -> type[HttpToolsProtocol]:
    """uvicorn's ``http=``: the guarded protocol with these limits, and the admission gate."""
    return type("DGServeHttpProtocol", (GuardedHttpProtocol,), {"limits": limits, "gate": gate})


class _Transport:
    """The connection's transport, whose ``close`` asks the protocol first (to linger)."""

    def __init__(self, transport: asyncio.Transport, protocol: GuardedHttpProtocol) -> None:
        self.real = transport
        self._protocol = protocol
        self._closing = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)

    def close(self) -> None:
        if not self._closing:
            self._closing = True
            self._protocol.close_requested()

    def is_closing(self) -> bool:
        return self._closing or self.real.is_closing()


class GuardedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the guards of this module; see its docstring."""

    limits: ConnectionLimits
    gate: Gate | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._phase: _Phase = "headers"
        self._deadline = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._linger_end = 0.0
        self._linger_bytes = 0
        self._message_done = True
        self._lost = False
        self._refused_at = -REFUSAL_INTERVAL_S  # when this connection's last refusal went out
        self._guarded = _Transport(transport, self)
        super().connection_made(self._guarded)  # type: ignore[arg-type]
        cap = self.limits.max_connections
        if cap is not None and len(self.connections) > cap:
            self._answer(503, "overloaded", f"the server holds its maximum of {cap} connections", {"Retry-After": "1"})
            self._linger(_REFUSED_LINGER_S)
            return
        self._arm(self.limits.header_timeout_s)

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        self._cancel_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._phase == "lingering":  # the answer is out: read and throw away
            self._count_drained(len(data))
            self._deadline = min(self._linger_end, self.loop.time() + LINGER_IDLE_S)
            return
        super().data_received(data)

    def shutdown(self) -> None:
        if self.cycle is None and self._phase == "headers" and not self._lost:
            # Accepted, its first request not parsed yet (taken from the backlog as the
            # drain closed the listener, api/drain.py): answer it rather than reset it.
            # uvicorn waits for it; the header timeout, or uvicorn's own, bounds that.
            return
        super().shutdown()
        if self._phase in ("lingering", "draining"):
            self._close_now()  # server shutdown does not wait for a client's leftover body

    # --- parser callbacks: which phase the request is in -------------------------------

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._message_done = False
        self._phase = "headers"
        self._arm(self.limits.header_timeout_s)

    def on_headers_complete(self) -> None:
        if self.gate is None or not (self.cycle is None or self.cycle.response_complete):
            # No gate for a pipelined request (one behind another still being answered):
            # uvicorn may never run its app if the connection goes, and a place held for
            # it would never come back. The app's own admission checks it in its turn.
            super().on_headers_complete()
        else:
            # uvicorn runs this request's cycle with the app the gate chose (a refusal, or
            # the app holding a queue place): the same keep-alive, pipelining and
            # unread-body handling as any request.
            app = self.app
            chosen = self.gate(self.parser.get_method(), self.url, self.headers, app, self.scope["state"])
            if isinstance(chosen, EarlyAnswer):
                # Nothing ahead of it on this connection: answer now, or hold a refusal back.
                if self._answer_now(chosen):
                    return
            else:
                self.app = chosen
                try:
                    super().on_headers_complete()
                finally:
                    self.app = app
        if not self._message_done:
            self._phase = "body"
            self._arm(self.limits.body_timeout_s)

    def on_body(self, body: bytes) -> None:
        super().on_body(body)
        if self._phase == "body":
            self._deadline += len(body) / self.limits.body_min_rate
        elif self._phase == "draining":
            self._count_drained(len(body))

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._message_done = True
        if self._phase == "body":
            self._phase = "idle"
            self._cancel_timer()
        elif self._phase == "draining":
            # The answer went out before this body was read: the response is complete, so
            # nothing else re-arms a timer, and uvicorn's keep-alive timer was cancelled by
            # the body's bytes. Wait for the next request's headers as on an idle connection,
            # or a client could send the body and then hold the connection open for ever.
            self._phase = "headers"
            self._arm(self.limits.header_timeout_s)

    def on_response_complete(self) -> None:
        next_started = bool(self.pipeline)  # uvicorn starts the next pipelined request's cycle
        super().on_response_complete()
        if self._guarded.is_closing() or next_started:
            return  # the phase and timer are that request's, set as it was parsed
        if not self._message_done:
            # Answered before the body was read (413, 401, 503...): uvicorn reads the rest
            # and throws it away so the connection can be used again; bounded like a linger.
            self._phase = "draining"
            self._linger_end = self.loop.time() + LINGER_S
            self._deadline = min(self._deadline, self._linger_end)
            self._schedule()
        elif not self.pipeline:
            # Idle: uvicorn's keep-alive timeout closes it; this one catches a client that
            # keeps it alive by trickling bytes that never make a request.
            self._phase = "headers"
            self._arm(self.limits.header_timeout_s)

    # --- answering at the headers --------------------------------------------------------

    def _answer_now(self, answer: EarlyAnswer) -> bool:
        """Write the gate's answer with no ASGI cycle: now (True), or a refusal when it is due (False).

        A client that retries a refusal at once would otherwise send its requests back
        into the event loop as fast as the loop refuses them, and under overload that loop
        is what the accepted requests need. So a connection gets at most one refusal per
        ``REFUSAL_INTERVAL_S``; one due sooner is held until then. The request is still
        read and checked at once: one that finds room in the queue is served without
        waiting, and a refusal's latency is the interval, not a wait for the loop.
        """
        keep_alive = self.parser.get_http_version() == "1.1" and self.parser.should_keep_alive()
        due = self._refused_at + REFUSAL_INTERVAL_S if answer.paced else 0.0
        if due > self.loop.time():
            held = Held(keep_alive)
            self.cycle = held  # type: ignore[assignment]
            self.loop.call_at(due, self._write_held, answer, held)
            return False
        self.cycle = Answered()  # type: ignore[assignment]  # uvicorn's on_body and on_message_complete skip it
        self._write(answer, keep_alive)
        return True

    def _write_held(self, answer: EarlyAnswer, held: Held) -> None:
        if self._lost or self._guarded.is_closing():
            return
        held.response_complete = True
        try:
            self._write(answer, held.keep_alive)  # uvicorn's shutdown clears keep_alive meanwhile
        except Exception:  # raised in a timer, it would leave the client waiting
            log.exception("a held refusal could not be written")
            self._close_now()

    def _write(self, answer: EarlyAnswer, keep_alive: bool) -> None:
        self._guarded.real.write(answer.response(keep_alive))
        answer.observe(time.perf_counter() - answer.started)
        if answer.paced:
            self._refused_at = self.loop.time()
        if not keep_alive:
            # A body not read yet (the parser reaches it after the headers' callback) is read
            # away first: closing at once would reset a client still sending it.
            if self._message_done:
                self._close_now()
            else:
                self._linger(LINGER_S)
            return
        # As after any answer: uvicorn's keep-alive timer and pipelined requests, and this
        # class's draining of a body nobody read.
        self.on_response_complete()

    # --- closing ------------------------------------------------------------------------

    def close_requested(self) -> None:
        """uvicorn closes the connection: at once, unless the client is still sending a body."""
        if self._lost or self._phase == "lingering":
            self._close_now()
        elif not self._message_done and self._phase in ("body", "draining"):
            self._linger(LINGER_S)
        else:
            self._close_now()

    def _linger(self, seconds: float) -> None:
        real = self._guarded.real
        self._phase = "lingering"
        self._guarded._closing = True
        if real.can_write_eof():
            real.write_eof()  # the answer goes out, then FIN: the client sees it and stops
        real.resume_reading()
        self.flow.read_paused = False
        now = self.loop.time()
        self._linger_end = now + seconds
        self._arm(min(seconds, LINGER_IDLE_S))

    def _count_drained(self, nbytes: int) -> None:
        self._linger_bytes += nbytes
        if self._linger_bytes > LINGER_MAX_BYTES:
            self._close_now()

    def _close_now(self) -> None:
        self._cancel_timer()
        self._guarded._closing = True
        self._guarded.real.close()

    # --- the one timer ------------------------------------------------------------------

    def _arm(self, seconds: float) -> None:
        self._deadline = self.loop.time() + seconds
        self._schedule()

    def _schedule(self) -> None:
        # A timer due no later than the deadline stays: when it fires, ``_check`` moves it
        # on to the deadline then current. Deadlines mostly move later (every request re-arms
        # the header timeout), and replacing the timer each time cost a cancel and a new
        # timer on every request, refusals under overload included.
        timer = self._timer
        if timer is not None:
            if timer.when() <= self._deadline:
                return
            timer.cancel()
        self._timer = self.loop.call_at(self._deadline, self._check)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _check(self) -> None:
        # The timer fires at or before the deadline (bytes arriving extend it, a new phase
        # resets it), so one timer re-armed at the current deadline is enough.
        self._timer = None
        if self._lost or self._phase == "idle":
            return
        now = self.loop.time()
        if self._phase == "body" and self.flow.read_paused:
            self._deadline = max(self._deadline, now + self.limits.body_timeout_s)  # our wait, not the client's
        if now < self._deadline:
            self._schedule()
            return
        if self._phase == "headers":
            self._answer(408, "request_timeout", f"the request headers took over {self.limits.header_timeout_s:g} s")
        elif self._phase == "body":
            self._time_out_body()
        self._close_now()

    def _time_out_body(self) -> None:
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            # The app is reading this body: its next read sees a disconnect, and whatever
            # it sends from now on is dropped; the 408 below is the answer.
            state = self.scope.get("state", {})
            state["error_code"] = "request_timeout"
            answered = cycle.response_started
            cycle.disconnected = True
            cycle.message_event.set()
            if answered:
                return
        message = f"the request body came slower than {self.limits.body_min_rate:g} bytes/s"
        self._answer(408, "request_timeout", message)

    def _answer(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        """Write a complete error response straight to the socket (no app involved)."""
        request_id = str(self.scope.get("state", {}).get("request_id", "")) if self.scope else ""
        body = error_body(code, message, request_id or new_request_id())
        lines = [f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}", "content-type: application/json",
                 f"content-length: {len(body)}", "connection: close",
                 *(f"{name}: {value}" for name, value in (headers or {}).items())]  # fmt: skip
        self._guarded.real.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
