"""The admission gate: a request a full queue would refuse is answered 503 before the app,
with the app's own body, headers and metrics; anything in doubt is left to the app; and
in a real server the connection stays usable after the early answer."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from dgserve.api.admission import HELD, Admission
from dgserve.api.auth import ApiKeys
from .conftest import Gate, Running, served, state_of
from .server_process import ServerProcess

pytestmark = pytest.mark.timeout(300)


async def app_itself(scope: Any, receive: Any, send: Any) -> None:
    raise AssertionError("not to be called")


def refusal(admission: Admission, method: bytes, url: bytes, headers: list[tuple[bytes, bytes]]) -> Any:
    """The refusing app the gate chose, or None when it let the app decide (and took no place)."""
    scope_state: dict[str, Any] = {}
    app = admission.app_for(method, url, headers, app_itself, scope_state)
    if app is app_itself:
        return None
    assert HELD not in scope_state, "a place was taken for a request the test expected refused"
    return app


async def call(app: Any) -> tuple[int, dict[str, str], bytes]:
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app({"type": "http"}, None, send)
    start, body = sent
    headers = {k.decode(): v.decode() for k, v in start["headers"]}
    return start["status"], headers, body["body"]


@pytest.mark.asyncio
async def test_refuses_what_a_full_queue_refuses_and_nothing_else(
    run_app: Running, make_settings: Any, gate: Gate, image: Any
) -> None:
    settings = make_settings(max_queue_size=1, max_batch_size=1)
    async with run_app(settings) as (app, client):
        state = state_of(app)
        admission = Admission(state.service, state.api_keys, state.drain, state.metrics)
        url = b"/v1/models/clf/classify?connectivity=false"
        scope_state: dict[str, Any] = {}
        held = admission.app_for(b"POST", url, [], app_itself, scope_state)  # room: the place is taken now
        assert held is not app_itself and scope_state[HELD].batcher is served(app).batcher and served(app).batcher.full
        with pytest.raises(AssertionError, match="not to be called"):
            await held({}, None, None)
        assert not served(app).batcher.full  # the request ended without submitting: its place is back
        gate.install(served(app))
        body = image()

        def post() -> asyncio.Future[httpx.Response]:
            return asyncio.ensure_future(client.post("/v1/models/clf/classify", content=body,
                                                     headers={"content-type": "image/jpeg"}))  # fmt: skip

        posts = [post()]
        while not gate.batches:  # the first computes (blocked)...
            await asyncio.sleep(0.01)
        posts.append(post())
        while served(app).batcher.queue_depth < 1:  # type: ignore[union-attr]  # ...the second waits in the queue
            await asyncio.sleep(0.01)

        refuse = refusal(admission, b"POST", url, [(b"x-request-id", b"req-7")])
        assert refuse is not None
        status, headers, raw = await call(refuse)
        assert status == 503 and int(headers["retry-after"]) >= 1 and headers["x-request-id"] == "req-7"
        error = json.loads(raw)["error"]
        assert error["code"] == "overloaded" and error["request_id"] == "req-7" and "queue full" in error["message"]
        # The same request through the app gets the same answer.
        through_app = await client.post("/v1/models/clf/classify", content=body, headers={"content-type": "image/jpeg"})
        assert through_app.status_code == 503 and through_app.json()["error"]["code"] == "overloaded"

        for versioned in (b"/v1/models/clf/classify?version=1", b"/v2/models/clf/infer", b"/v2/models/clf/versions/1/infer",
                          b"/v2/models/clf/infer?version=1", b"/v2/models/clf/versions/1/infer?version=9"):  # fmt: skip
            assert refusal(admission, b"POST", versioned, []) is not None, versioned
        _, _, oip_body = await call(refusal(admission, b"POST", b"/v2/models/clf/infer", []))
        assert set(json.loads(oip_body)) == {"error"}  # the protocol's error shape
        # Left to the app, which answers them as it always does:
        for method, other in [
            (b"GET", url),  # not an inference call
            (b"POST", b"/v1/models/clf/detect"),  # another task's endpoint: the app's 422
            (b"POST", b"/v1/models/nosuch/classify"),  # the app's 404
            (b"POST", b"/v1/models/clf/classify?version=9"),  # the app's 404
            (b"POST", b"/v2/models/clf/versions/9/infer"),
            (b"POST", b"/v2/models/clf/infer?version=9"),  # the app's 404, not the default version's queue
        ]:
            assert refusal(admission, method, other, []) is None, other
        with_keys = Admission(state.service, ApiKeys(((b"\0" * 32, frozenset({"infer"})),)), state.drain,
                              state.metrics)  # fmt: skip
        assert refusal(with_keys, b"POST", url, []) is None  # the app's 401
        state.drain.draining = True
        try:
            assert refusal(admission, b"POST", url, []) is None  # the drain's 503 shutting_down
        finally:
            state.drain.draining = False

        gate.open()
        await asyncio.gather(*posts)
        assert not served(app).batcher.full


@pytest.mark.asyncio
async def test_liveness_is_answered_at_the_headers_as_the_app_answers_it(run_app: Running, make_settings: Any) -> None:
    async with run_app(make_settings()) as (app, client):
        state = state_of(app)
        admission = Admission(state.service, state.api_keys, state.drain, state.metrics)
        state.drain.draining = True  # liveness holds while draining, as the app's does
        early = refusal(admission, b"GET", b"/healthz", [(b"x-request-id", b"probe-1")])
        assert early is not None and not early.paced
        status, headers, body = await call(early)
        state.drain.draining = False
        through_app = await client.get("/healthz", headers={"x-request-id": "probe-1"})
        assert (status, json.loads(body)) == (through_app.status_code, through_app.json()) == (200, {"status": "ok"})
        assert headers["x-request-id"] == "probe-1" and headers["content-type"] == "application/json"
        assert refusal(admission, b"GET", b"/healthz?verbose=1", []) is not None
        for method, other in [(b"POST", b"/healthz"), (b"GET", b"/healthz/"), (b"GET", b"/healthzz"), (b"GET", b"/readyz")]:
            assert refusal(admission, method, other, []) is None, (method, other)
        metrics = (await client.get("/metrics")).text
        counted = [line for line in metrics.splitlines()
                   if line.startswith("dgserve_requests_total{") and 'endpoint="/healthz"' in line]  # fmt: skip
        assert counted and float(counted[0].rsplit(" ", 1)[1]) == 2  # the early answer and the app's


def _post(path: str, body: bytes) -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: {len(body)}\r\n\r\n"
            .encode() + body)  # fmt: skip


def _refused_under_load(port: int, path: str, body: bytes, attempt: Callable[[], int], tries: int) -> int:
    """Run ``attempt`` (it returns its request's status) while 12 other posts of ``body`` fill
    the queue, until it has been refused 3 times or ``tries`` run out: how often it was."""
    refused = 0
    for _ in range(tries):
        # 12, not 4: the kernel spreads connections over the server processes, and on a fast
        # host 4 posts, 2 or so per process, were computed before the attempt arrived (1
        # refusal in 200 tries in one run).
        background = [socket.create_connection(("127.0.0.1", port)) for _ in range(12)]
        for other in background:
            other.sendall(_post(path, body))
        status = attempt()
        for other in background:
            _read_response(other)
            other.close()
        if status == 503:
            refused += 1
            if refused == 3:
                break
    return refused


def _read_response(sock: socket.socket) -> tuple[int, bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, rest = data.partition(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length"))
    while len(rest) < length:
        rest += sock.recv(65536)
    return int(head.split(b" ")[1]), rest[:length]


def test_in_a_real_server_refusals_are_early_counted_and_keep_the_connection(tmp_path: Path, image: Any) -> None:
    server = ServerProcess(tmp_path, {"DGSERVE_MAX_QUEUE_SIZE": "1", "DGSERVE_MAX_BATCH_SIZE": "1"}).start()
    try:
        body = image("PNG", (64, 64))
        path = "/v1/models/shapes-dgnet/classify?connectivity=false"

        async def flood() -> list[int]:
            async with httpx.AsyncClient(base_url=server.base, timeout=60) as client:
                answers = await asyncio.gather(*(client.post(path, content=body, headers={"content-type": "image/png"})
                                                 for _ in range(96)))  # fmt: skip
            for answer in answers:
                if answer.status_code == 503:
                    assert answer.json()["error"]["code"] == "overloaded" and "retry-after" in answer.headers
            return [a.status_code for a in answers]

        statuses = asyncio.run(flood())
        assert set(statuses) <= {200, 503} and statuses.count(503) > 0 and statuses.count(200) > 0

        # An early 503 on a kept-alive connection (its body unread by the app) leaves the
        # connection ready for the next request.
        with socket.create_connection(("127.0.0.1", server.port), timeout=60) as sock:

            def attempt() -> int:
                sock.sendall(_post(path, body))
                status, _ = _read_response(sock)
                sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                assert _read_response(sock)[0] == 200
                return status

            refused = _refused_under_load(server.port, path, body, attempt, tries=200)
        assert refused == 3

        metrics = httpx.get(f"{server.base}/metrics").text
        counted = sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                      if line.startswith("dgserve_request_duration_seconds_count{")
                      and 'endpoint="/v1/models/{name}/classify"' in line and 'model="shapes-dgnet"' in line)  # fmt: skip
        assert counted >= len(statuses) + refused
    finally:
        server.stop()


def test_a_refusal_that_closes_reads_the_body_away_first(tmp_path: Path, image: Any) -> None:
    """Refused at its headers with ``Connection: close``: the 503 goes out, then the body the
    app never read is read away before the close (a lingering close), so a client that
    writes its whole body before reading, as urllib does, sees the 503 and not a reset."""
    server = ServerProcess(tmp_path, {"DGSERVE_MAX_QUEUE_SIZE": "1", "DGSERVE_MAX_BATCH_SIZE": "1"}).start()
    try:
        small = image("PNG", (64, 64))
        path = "/v1/models/shapes-dgnet/classify?connectivity=false"
        big = small + b"\0" * (8 * 2**20)  # more than the sockets buffer: still being sent when the 503 goes out
        wire = (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nConnection: close\r\n"
                f"Content-Length: {len(big)}\r\n\r\n").encode() + big  # fmt: skip
        def attempt() -> int:
            with socket.create_connection(("127.0.0.1", server.port), timeout=60) as sock:
                sock.sendall(wire)  # a reset here (the server closing early) fails the test
                return _read_response(sock)[0]

        assert _refused_under_load(server.port, path, small, attempt, tries=100) == 3
    finally:
        server.stop()
