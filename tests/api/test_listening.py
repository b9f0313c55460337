"""Closing a listener resets no connection the kernel completed (``api/listening.py``)."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections import Counter
from pathlib import Path

import pytest

from dgserve.api.listening import close_listener, refuse_handshakes


def _listener() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    return sock


def test_a_listener_refusing_handshakes_still_hands_over_the_completed_ones() -> None:
    with _listener() as listener:
        address = listener.getsockname()
        before = socket.create_connection(address, timeout=1)  # completed: in the accept queue
        assert refuse_handshakes(listener)
        with pytest.raises(TimeoutError):  # its SYN is dropped, so connect() never returns
            socket.create_connection(address, timeout=0.3)
        connection, peer = listener.accept()
        assert peer == before.getsockname()
        connection.sendall(b"ok")
        assert before.recv(2) == b"ok"
        for sock in (connection, before):
            sock.close()


def _serve(connection: socket.socket) -> None:
    connection.setblocking(True)
    with connection:
        try:
            connection.recv(1)
            connection.sendall(b"ok")
        except OSError:
            pass


def _client(address: tuple[str, int], outcomes: Counter[str], lock: threading.Lock) -> None:
    """Connects, asks and reads the answer, over and over, until the port refuses it."""
    while True:
        with socket.socket() as sock:
            sock.settimeout(5)
            try:
                sock.connect(address)
            except ConnectionRefusedError:
                kind = "refused"
            else:
                try:
                    sock.sendall(b"?")
                    kind = "answered" if sock.recv(2) == b"ok" else "lost"
                except OSError:  # a reset: the kernel completed the connection, nobody took it
                    kind = "lost"
        with lock:
            outcomes[kind] += 1
        if kind != "answered":
            return


def test_clients_reconnecting_as_the_listener_closes_are_answered_or_refused() -> None:
    """Each answer ends its connection, as under the drain, so handshakes race the close:
    every client ends with a refusal, none with a reset, and none hangs.

    Without the filter this loses a connection only now and then (a ``/tmp`` version lost
    21 in one run of 100 closes, and none in 120 later ones, as the machine's load
    changed), so the test above is the one that pins the mechanism; this one checks the
    whole close around it."""
    closes = 3
    outcomes: Counter[str] = Counter()
    lock = threading.Lock()

    async def one_close() -> None:
        loop = asyncio.get_running_loop()
        listener = _listener()
        listener.setblocking(False)
        address = listener.getsockname()
        clients = [threading.Thread(target=_client, args=(address, outcomes, lock)) for _ in range(16)]
        for thread in clients:
            thread.start()
        serving: list[asyncio.Future[None]] = []
        until = loop.time() + 0.2
        while loop.time() < until:  # serve for a while, as the grace does
            try:
                connection, _ = listener.accept()
            except BlockingIOError:
                await asyncio.sleep(0.001)
                continue
            serving.append(loop.run_in_executor(None, _serve, connection))
        # Answered at once, inside the sweep: its client reconnects while the sweep runs.
        await close_listener(listener, _serve)
        await asyncio.gather(*serving)
        for thread in clients:
            await asyncio.to_thread(thread.join)
        assert listener.fileno() == -1

    for _ in range(closes):
        asyncio.run(one_close())
    assert outcomes["lost"] == 0, outcomes
    assert outcomes["refused"] == 16 * closes and outcomes["answered"] > 0, outcomes


def test_a_unix_listener_is_closed_without_a_filter(tmp_path: Path) -> None:
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(tmp_path / "sock"))
    listener.listen()
    assert not refuse_handshakes(listener)
    taken: list[socket.socket] = []
    client = socket.socket(socket.AF_UNIX)
    client.connect(str(tmp_path / "sock"))
    assert asyncio.run(close_listener(listener, taken.append)) == 1
    assert listener.fileno() == -1
    for sock in (*taken, client):
        sock.close()
