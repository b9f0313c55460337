"""At most one refusal per connection per ``REFUSAL_INTERVAL_S`` (``api/connections.py``).

The protocol is driven in-process, bytes in and bytes out, over a transport that records
what is written: the admission gate here refuses every POST to ``/full`` and lets every
other request through to an app that answers 200.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import pytest
import uvicorn
from uvicorn.server import ServerState

from dgserve.api import connections
from dgserve.api.admission import EarlyAnswer
from dgserve.api.connections import ConnectionLimits, protocol_class

pytestmark = pytest.mark.asyncio

LIMITS = ConnectionLimits(header_timeout_s=30.0, body_timeout_s=30.0, body_min_rate=1.0, max_connections=None)
BODY = b"x" * 100


def _post(path: str) -> bytes:
    return f"POST {path} HTTP/1.1\r\nHost: t\r\nContent-Length: {len(BODY)}\r\n\r\n".encode() + BODY


class _Gate:
    """As ``Admission.app_for``: a refusal for a full queue, or the app."""

    def __call__(self, method: bytes, url: bytes, headers: Any, app: Any, state: dict[str, Any]) -> Any:
        if method == b"POST" and url == b"/full":
            body = b'{"error":{"code":"overloaded"}}'
            head = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
            return EarlyAnswer(503, head, body, lambda seconds: None, paced=True)
        return app


async def _app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    while (await receive()).get("more_body"):
        pass
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})


class _Transport(asyncio.Transport):
    """Records each write with the time it was made."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[tuple[float, bytes]] = []
        self.closed = False
        self.eof = False
        self.reading = True

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.writes.append((time.monotonic(), bytes(data)))

    def statuses(self) -> list[int]:
        out = b"".join(data for _, data in self.writes)
        return [int(chunk.split(b" ", 2)[0]) for chunk in out.split(b"HTTP/1.1 ")[1:]]

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.eof = True

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def is_reading(self) -> bool:
        return self.reading

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"sockname": ("127.0.0.1", 8000), "peername": ("127.0.0.1", 50000)}.get(name, default)


@pytest.fixture
def interval(monkeypatch: pytest.MonkeyPatch) -> Iterator[float]:
    """A longer interval than the server's, so that the checks hold on a loaded machine."""
    monkeypatch.setattr(connections, "REFUSAL_INTERVAL_S", 0.5)
    yield 0.5


def _connect(limits: ConnectionLimits = LIMITS) -> tuple[Any, _Transport]:
    config = uvicorn.Config(app=_app, http=protocol_class(limits, _Gate()), lifespan="off", log_level="warning")
    config.load()
    protocol = config.http_protocol_class(config=config, server_state=ServerState(), app_state={},
                                          _loop=asyncio.get_running_loop())  # fmt: skip
    transport = _Transport()
    protocol.connection_made(transport)
    return protocol, transport


async def _until(condition: Any, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.005)


async def test_a_connection_gets_one_refusal_per_interval(interval: float) -> None:
    protocol, transport = _connect()
    protocol.data_received(_post("/full"))
    assert transport.statuses() == [503]  # the first at once
    first = transport.writes[-1][0]
    protocol.data_received(_post("/full"))  # retried at once: held (timed below, not sampled
    # halfway: a loop stalled past the interval would run the held write before a sampling task)
    await _until(lambda: len(transport.statuses()) == 2)
    second = transport.writes[-1][0]
    assert second - first >= interval - 0.002
    protocol.data_received(_post("/full"))
    await _until(lambda: len(transport.statuses()) == 3)
    assert transport.writes[-1][0] - second >= interval - 0.002
    assert transport.reading and not transport.closed


async def test_a_request_after_a_refusal_is_read_and_served_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Unlike a pause in reading, the interval holds back refusals only: a request that the
    gate lets through is served without waiting for it."""
    monkeypatch.setattr(connections, "REFUSAL_INTERVAL_S", 60.0)
    protocol, transport = _connect()
    protocol.data_received(_post("/full"))
    protocol.data_received(_post("/room"))
    await _until(lambda: len(transport.statuses()) == 2)
    assert transport.statuses() == [503, 200]


async def test_a_request_pipelined_behind_a_held_refusal_is_answered_after_it(interval: float) -> None:
    protocol, transport = _connect()
    protocol.data_received(_post("/full"))
    first = transport.writes[-1][0]
    protocol.data_received(_post("/full") + _post("/room"))  # a held refusal, and one behind it
    await _until(lambda: len(transport.statuses()) == 3)
    assert transport.statuses() == [503, 503, 200]  # the app's answer waited its turn...
    assert transport.writes[-1][0] - first >= interval - 0.002  # ... behind the held refusal


async def test_a_held_refusal_on_a_connection_that_went_is_not_written(interval: float) -> None:
    protocol, transport = _connect()
    protocol.data_received(_post("/full"))
    protocol.data_received(_post("/full"))
    protocol.connection_lost(None)
    await asyncio.sleep(interval * 1.5)
    assert transport.statuses() == [503]


async def test_a_held_refusal_at_shutdown_goes_out_and_closes_the_connection(interval: float) -> None:
    protocol, transport = _connect()
    protocol.data_received(_post("/full"))
    protocol.data_received(_post("/full"))
    protocol.shutdown()  # uvicorn's graceful shutdown: the request in flight is answered first
    assert not transport.closed
    await _until(lambda: len(transport.statuses()) == 2)
    last = transport.writes[-1][1]
    assert b"connection: close" in last.lower()
    assert transport.closed  # its body was all read: nothing to linger for


async def test_a_pipelined_upload_started_after_a_held_refusal_keeps_its_own_timers(interval: float) -> None:
    """The next request's phase is its own once it starts: a shutdown then waits for its
    upload and answer rather than cutting it off as a body left over from the refusal."""
    protocol, transport = _connect()
    protocol.data_received(_post("/full"))
    room = _post("/room")
    protocol.data_received(_post("/full") + room[:-10])  # held; /room behind it, 10 bytes short
    await _until(lambda: len(transport.statuses()) == 2)
    protocol.shutdown()
    assert not transport.closed
    protocol.data_received(room[-10:])
    await _until(lambda: len(transport.statuses()) == 3)
    assert transport.statuses() == [503, 503, 200]


async def test_a_held_refusal_that_cannot_be_written_closes_the_connection(
    interval: float, caplog: pytest.LogCaptureFixture
) -> None:
    protocol, transport = _connect()
    protocol.data_received(_post("/full"))
    protocol.data_received(_post("/full"))
    transport.write = _refuse_to_write  # type: ignore[method-assign]
    await _until(lambda: transport.closed)
    assert "held refusal could not be written" in caplog.text


def _refuse_to_write(data: bytes) -> None:
    raise RuntimeError("write failed")


async def test_a_held_refusal_whose_body_stops_coming_gets_the_408_instead(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(connections, "REFUSAL_INTERVAL_S", 60.0)
    limits = ConnectionLimits(header_timeout_s=30.0, body_timeout_s=0.2, body_min_rate=1e9, max_connections=None)
    protocol, transport = _connect(limits)
    protocol.data_received(_post("/full"))
    protocol.data_received(_post("/full")[:-10])  # held, and 10 bytes of its body never come
    await _until(lambda: transport.closed)
    assert transport.statuses() == [503, 408]
