"""A lean HTTP/1.1 load generator: N keep-alive connections posting prebuilt requests.

The server benchmark runs its load generator on the same cores as the server, so the
generator's own CPU is taken from the server being measured. httpx costs about 3 ms of
CPU per request here -- as much as the server spends on a small model -- so, as wrk or
oha would, this sends bytes prepared once and reads only the status line, the
headers and ``Content-Length`` bytes of body per response. It speaks exactly the
subset the benchmark needs (no chunked bodies, no redirects) and says so when a
response falls outside it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

__all__ = ["LoadResult", "Request", "build_post", "multipart_body", "run_load"]


@dataclass(frozen=True, slots=True)
class Request:
    """A complete HTTP/1.1 request, bytes on the wire, and how many images it carries."""

    wire: bytes
    images: int


@dataclass(slots=True)
class LoadResult:
    seconds: float = 0.0
    requests: int = 0
    images: int = 0
    latencies_s: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def build_post(
    host: str, port: int, path: str, body: bytes, content_type: str, images: int = 1, headers: dict[str, str] | None = None
) -> Request:
    extra = "".join(f"{name}: {value}\r\n" for name, value in (headers or {}).items())
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: {content_type}\r\n{extra}"
        f"Content-Length: {len(body)}\r\nConnection: keep-alive\r\n\r\n"
    )
    return Request(head.encode("ascii") + body, images)


def multipart_body(files: Sequence[bytes], mime: str = "image/jpeg") -> tuple[bytes, str]:
    """A multipart/form-data body with one ``images`` part per file, and its content type."""
    boundary = "dgserve-bench-7d1f0c"
    out = bytearray()
    for i, data in enumerate(files):
        out += (
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"images\"; filename=\"{i}.jpg\"\r\n"
            f"Content-Type: {mime}\r\n\r\n"
        ).encode("ascii")
        out += data + b"\r\n"
    out += f"--{boundary}--\r\n".encode("ascii")
    return bytes(out), f"multipart/form-data; boundary={boundary}"


async def _exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, wire: bytes) -> tuple[int, bool]:
    """Send one request, read its response; ``(status, the server closes the connection)``."""
    writer.write(wire)
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ", 2)[1])
    length = None
    closes = False
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"transfer-encoding":
            raise RuntimeError("chunked responses are outside this generator's subset")
        elif name == b"connection":
            closes = value.strip().lower() == b"close"
    if length is None:
        raise RuntimeError("response without Content-Length")
    await reader.readexactly(length)
    return status, closes


Connection = tuple[asyncio.StreamReader, asyncio.StreamWriter]


async def _close(connection: Connection | None) -> None:
    if connection is not None:
        connection[1].close()
        with contextlib.suppress(OSError):
            await connection[1].wait_closed()


async def run_load(
    host: str, port: int, requests: Sequence[Request], clients: int, timeout_s: float = 600.0
) -> LoadResult:
    """Send every request once over ``clients`` connections; each waits for its answer.

    A failed exchange (refused, reset, closed early, or over ``timeout_s``) is counted
    in ``errors`` and its connection replaced; so is a connection the server closes.
    Latencies are those of answered requests, whatever their status.
    """
    result = LoadResult()
    work: Iterator[Request] = iter(requests)

    async def client() -> None:
        connection: Connection | None = None
        try:
            for request in work:
                started = time.perf_counter()
                try:
                    if connection is None:
                        connection = await asyncio.wait_for(asyncio.open_connection(host, port), timeout_s)
                    status, closes = await asyncio.wait_for(_exchange(*connection, request.wire), timeout_s)
                except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError) as exc:
                    result.errors.append(f"{type(exc).__name__}: {exc}")
                    await _close(connection)
                    connection = None
                    continue
                result.latencies_s.append(time.perf_counter() - started)
                if closes:
                    await _close(connection)
                    connection = None
                if status != 200:
                    result.errors.append(f"HTTP {status}")
                    continue
                result.requests += 1
                result.images += request.images
        finally:
            await _close(connection)

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    result.seconds = time.perf_counter() - started
    return result
