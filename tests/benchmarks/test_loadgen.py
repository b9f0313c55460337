"""The benchmark's load generator: counts answers and failures, and never hangs."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from loadgen import build_post, multipart_body, run_load  # noqa: E402

pytestmark = pytest.mark.timeout(30)


async def serve(behaviour: str) -> asyncio.Server:
    """Answers each request by ``behaviour``: ok, close (Connection: close), 503, or drop."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length"))
                await reader.readexactly(length)
                if behaviour == "drop":
                    break
                status = b"503 Service Unavailable" if behaviour == "503" else b"200 OK"
                extra = b"Connection: close\r\n" if behaviour == "close" else b""
                writer.write(b"HTTP/1.1 " + status + b"\r\nContent-Length: 2\r\n" + extra + b"\r\n{}")
                await writer.drain()
                if behaviour == "close":
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    return await asyncio.start_server(handle, "127.0.0.1", 0)


@pytest.mark.parametrize(
    ("behaviour", "answered", "errors"), [("ok", 10, 0), ("close", 10, 0), ("503", 0, 10), ("drop", 0, 10)]
)
def test_every_request_is_answered_or_counted_as_failed(behaviour: str, answered: int, errors: int) -> None:
    async def scenario() -> None:
        server = await serve(behaviour)
        port = server.sockets[0].getsockname()[1]
        body, content_type = multipart_body([b"a", b"b"])
        requests = [build_post("127.0.0.1", port, "/x", body, content_type, images=2) for _ in range(10)]
        result = await run_load("127.0.0.1", port, requests, clients=3, timeout_s=5)
        server.close()
        assert (result.requests, len(result.errors), result.images) == (answered, errors, 2 * answered)

    asyncio.run(scenario())


def test_a_server_that_never_answers_times_out() -> None:
    async def scenario() -> None:
        async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                await asyncio.sleep(10)
            finally:
                writer.close()

        server = await asyncio.start_server(silent, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        result = await run_load("127.0.0.1", port, [build_post("127.0.0.1", port, "/x", b"i", "image/jpeg")], 1,
                                timeout_s=0.2)
        server.close()
        assert result.requests == 0 and result.errors and "TimeoutError" in result.errors[0]

    asyncio.run(scenario())
