"""Connection guards against a real ``dgserve serve`` (``api/connections.py``).

* an oversized upload gets its 413 with every common client, not a reset, because the
  server reads and throws away the rest of the body (lingering close);
* slow-loris clients, trickling headers or a body, are answered 408 and closed within
  the read timeouts, and a normal request is served while 500 of them are open;
* slow uploads give back the queue places they took at their headers;
* one connection over ``DGSERVE_MAX_CONNECTIONS`` gets 503 and is closed.

Latency under the slow clients is printed, never asserted: this box's cores are shared.
``benchmarks/slow_clients.py`` measures it (its slow clients are the ones used here).
"""

from __future__ import annotations

import io
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, str(Path(__file__).parent))
from server_process import ServerProcess  # noqa: E402
from slow_clients import Loris, watch  # noqa: E402  (benchmarks/, on the path server_process sets)

from dgserve.data.scenes import render_classification
from dgserve.serving.reservation import UPLOAD_HOLD_S

TIMEOUT_S = 2.0
SLACK_S = 3.0  # for a loaded 2-core machine: the timer fires late, the test thread reads late
LORIS = 500
BIG = 64 * 2**20
CLASSIFY = "/v1/models/shapes-dgnet/classify"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    env = {"DGSERVE_HEADER_TIMEOUT_S": str(TIMEOUT_S), "DGSERVE_BODY_TIMEOUT_S": str(TIMEOUT_S),
           "DGSERVE_MAX_CONNECTIONS": str(LORIS + 100)}  # fmt: skip
    with ServerProcess(tmp_path_factory.mktemp("conn"), env) as proc:
        yield proc


@pytest.fixture(scope="module")
def png() -> bytes:
    buf = io.BytesIO()
    render_classification(7, 3, 64)[0].save(buf, "PNG")
    return buf.getvalue()


def _urllib_status(url: str, body: bytes, content_type: str) -> int:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code


@pytest.mark.parametrize(("path", "content_type"), [(CLASSIFY, "image/png"), ("/v2/models/shapes-dgnet/infer", "application/json")])
def test_every_client_sees_413_for_a_64_mib_body(server: ServerProcess, path: str, content_type: str) -> None:
    url, body = server.base + path, b"\0" * BIG
    # urllib sends "Connection: close" and writes the whole body before reading: a
    # server that closed at once after answering reset it (ECONNRESET).
    assert _urllib_status(url, body, content_type) == 413
    assert httpx.post(url, content=body, headers={"Content-Type": content_type}, timeout=120).status_code == 413
    assert requests.post(url, data=body, headers={"Content-Type": content_type}, timeout=120).status_code == 413
    # A chunked upload declares no length, so it is refused only once the limit is passed.
    chunks = (body[i : i + 2**20] for i in range(0, BIG, 2**20))
    assert requests.post(url, data=chunks, headers={"Content-Type": content_type}, timeout=120).status_code == 413
    assert httpx.get(server.base + "/healthz", timeout=10).status_code == 200


def _timed_classify(http: httpx.Client, png: bytes) -> tuple[httpx.Response, float]:
    started = time.perf_counter()
    response = http.post(CLASSIFY, content=png, headers={"Content-Type": "image/png"})
    return response, (time.perf_counter() - started) * 1000


def test_slow_loris_connections_are_closed_and_others_served(server: ServerProcess, png: bytes) -> None:
    with httpx.Client(base_url=server.base, timeout=30) as http:
        baseline_ms = min(_timed_classify(http, png)[1] for _ in range(5))
    head = b"POST " + CLASSIFY.encode() + b" HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
    body_head = head + b"Content-Length: 100000\r\n\r\n"
    slow_headers = [Loris.open(server.port, head, b"X") for _ in range(LORIS // 2)]
    slow_bodies = [Loris.open(server.port, body_head, b"\0", "body") for _ in range(LORIS // 2)]
    clients = slow_headers + slow_bodies
    # Watched from now on, beside the classify below, so that each close is seen when it
    # happens, however long a loaded machine takes over the classify.
    watcher = threading.Thread(target=watch, args=(clients, time.monotonic() + TIMEOUT_S + SLACK_S + 5))
    watcher.start()

    with httpx.Client(base_url=server.base, timeout=30) as http:
        http.get("/healthz")  # behind every loris in the accept queue: they are all open now
        served, took_ms = _timed_classify(http, png)
        health = http.get("/healthz")
    open_meanwhile = sum(c.closed_at is None for c in clients)
    print(f"classify: {baseline_ms:.0f} ms alone, {took_ms:.0f} ms with {open_meanwhile} slow-loris connections open")
    assert served.status_code == 200 and served.json()["results"][0]["predictions"]
    assert health.status_code == 200
    watcher.join()

    lifetimes = sorted(c.closed_at - c.opened for c in clients if c.closed_at is not None)
    print(f"slow-loris lifetimes: min {lifetimes[0]:.2f} s, max {lifetimes[-1]:.2f} s, closed {len(lifetimes)}/{LORIS}")
    assert len(lifetimes) == LORIS, "every slow connection is closed"
    assert lifetimes[0] >= TIMEOUT_S * 0.9, "none is closed before its timeout"
    assert lifetimes[-1] <= TIMEOUT_S + SLACK_S, "each is closed within its timeout (and slack)"
    answered = sum(c.received.startswith(b"HTTP/1.1 408 ") for c in clients)
    print(f"answered 408 before closing: {answered}/{LORIS}")
    assert answered >= LORIS * 0.9  # a reset can beat the answer to a client that keeps writing
    assert httpx.get(server.base + "/healthz", timeout=10).status_code == 200


def test_slow_uploads_give_their_queue_places_back(tmp_path: Path, png: bytes) -> None:
    """A place taken at an upload's headers is held for UPLOAD_HOLD_S of its body only: 16 uploads
    that send their headers and then nothing fill a queue of 8 at first (8 of them are refused),
    and then no longer keep a normal classify out, though all 16 are still open. One that then
    sends its body takes a place again and is served."""
    env = {"DGSERVE_MAX_QUEUE_SIZE": "8", "DGSERVE_BODY_TIMEOUT_S": "60"}
    with ServerProcess(tmp_path, env) as proc:
        head = (b"POST " + CLASSIFY.encode() + b" HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                b"Content-Length: %d\r\n\r\n" % len(png))  # fmt: skip
        slow = [Loris.open(proc.port, head, b"", "body") for _ in range(16)]
        try:
            deadline = time.monotonic() + 30
            while _rejected(proc) < 8:  # the queue was full: every place is held by a slow upload
                assert time.monotonic() < deadline, f"{_rejected(proc):g} refusals"
                time.sleep(0.1)
            # Held for the body's timeout (60 s), as before, the places would refuse this for a minute.
            deadline = time.monotonic() + UPLOAD_HOLD_S + 10
            while (answer := httpx.post(proc.base + CLASSIFY, content=png, headers={"Content-Type": "image/png"},
                                        timeout=30)).status_code == 503:  # fmt: skip
                assert time.monotonic() < deadline, "slow uploads still hold the queue"
                time.sleep(0.2)
            assert answer.status_code == 200, answer.text
            for client in slow:
                client.readable()
            assert sum(c.closed_at is None for c in slow) == 16, "every slow upload is still open"
            # An admitted one (no answer yet) sends its body at last: its place again, then its answer.
            late = next(c for c in slow if not c.received)
            late.sock.setblocking(True)
            late.sock.settimeout(30)
            late.sock.sendall(png)
            assert late.sock.recv(65536).startswith(b"HTTP/1.1 200 ")
        finally:
            for client in slow:
                client.sock.close()


def _rejected(proc: ServerProcess) -> float:
    text = httpx.get(proc.base + "/metrics", timeout=10).text
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == "dgserve_rejections_total" and s.labels.get("reason") == "queue_full")  # fmt: skip


def test_a_body_sent_at_the_rate_floor_is_not_timed_out(server: ServerProcess, png: bytes) -> None:
    # 3 chunks 0.9 s apart take longer than the 2 s body timeout, but each 64 KiB chunk
    # earns a second more (DGSERVE_BODY_MIN_RATE's default), so the upload completes.
    filler = png + b"\0" * (3 * 65536 - len(png))

    def slow_body() -> Iterator[bytes]:
        for i in range(3):
            yield filler[i * 65536 : (i + 1) * 65536]
            time.sleep(0.9)

    response = requests.post(server.base + CLASSIFY, data=slow_body(), headers={"Content-Type": "image/png"}, timeout=60)
    assert response.status_code == 200, response.text


def test_a_connection_over_the_cap_gets_503(tmp_path: Path) -> None:
    with ServerProcess(tmp_path, {"DGSERVE_MAX_CONNECTIONS": "3"}) as proc:
        held = [socket.create_connection(("127.0.0.1", proc.port)) for _ in range(3)]
        try:
            time.sleep(0.3)  # the server has accepted them
            refused = httpx.get(proc.base + "/healthz", timeout=10)
            assert refused.status_code == 503
            assert refused.json()["error"]["code"] == "overloaded" and refused.headers["retry-after"] == "1"
        finally:
            for sock in held:
                sock.close()
        # Each close is counted once the server reads its EOF: by then a new connection is served.
        deadline = time.monotonic() + 10
        while (status := httpx.get(proc.base + "/healthz", timeout=10).status_code) != 200:
            assert time.monotonic() < deadline, f"still {status} 10 s after the held connections closed"
            time.sleep(0.1)


def test_a_body_sent_after_an_early_answer_does_not_hold_the_connection(server: ServerProcess) -> None:
    """Answered before its body was read (404 here), then sent the body, then silent: the
    connection still gets the header timeout of an idle one instead of staying open."""
    sock = socket.create_connection(("127.0.0.1", server.port))
    try:
        sock.settimeout(30)
        sock.sendall(b"POST /v1/models/no-such-model/classify HTTP/1.1\r\nHost: x\r\n"
                     b"Content-Type: image/png\r\nContent-Length: 1\r\n\r\n")  # fmt: skip
        answer = sock.recv(65536)
        assert answer.startswith(b"HTTP/1.1 404")
        sock.sendall(b"\0")  # the body, after the answer; then nothing more
        opened = time.monotonic()
        while sock.recv(65536):  # a 408, then the close
            pass
        assert time.monotonic() - opened < TIMEOUT_S + SLACK_S
    finally:
        sock.close()


def test_a_kept_alive_connection_times_out_from_its_last_answer(server: ServerProcess) -> None:
    """The connection's timer, armed when it opened, is not moved on each request: when it
    fires early it moves itself on. So a connection answered 1.2 s after it opened is
    still given the whole header timeout from that answer, not closed at its first timer.
    ``/healthz`` is answered as its headers arrive, the path of a refusal, where no body
    phase ends and cancels the timer in between."""
    sock = socket.create_connection(("127.0.0.1", server.port))
    try:
        sock.settimeout(30)
        time.sleep(TIMEOUT_S * 0.6)
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = sock.recv(65536)
        answered = time.monotonic()
        assert answer.startswith(b"HTTP/1.1 200")
        rest = b""
        while chunk := sock.recv(65536):  # then nothing from us: a 408, then the close
            rest += chunk
        idle = time.monotonic() - answered
        assert b"HTTP/1.1 408 " in rest
        # Closed at its first timer, it would idle 0.8 s; reading the answer late only shortens this.
        assert TIMEOUT_S * 0.7 <= idle <= TIMEOUT_S + SLACK_S
    finally:
        sock.close()
