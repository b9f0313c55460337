"""The event loop's own cost per inference request, in process, by protocol and upload.

    .venv/bin/python benchmarks/loop_cost.py [--protocols v1,oip] [--uploads small,photo]
                                             [--requests 3000] [--clients 16] [--rounds 3] [--profile]

The real app (``create_app``, the bundled shapes-dgnet, batches of up to 32 within
5 ms) runs in this process on uvloop, with no sockets: ``--clients`` callers each send
one request at a time straight into the ASGI app, as uvicorn would after parsing it.
What is left is everything the app does on the loop for a request: routing, the API
key check (keys are off here), the body, the route's admission, the batcher, the record,
the response. HTTP parsing and the early admission gate (``api/admission.py``), which
run in the connection's protocol before the app, are not counted. The decode
pool and the model run in their own threads as in the server, so their work is not
counted: the figure is the loop thread's CPU time (``time.thread_time``) per request.

Requests: ``v1`` is ``POST /v1/models/shapes-dgnet/classify`` with one multipart
image; ``oip`` is ``POST /v2/models/shapes-dgnet/infer`` with the image as a ``BYTES``
input in binary tensor data, as tritonclient sends it. Uploads: ``small`` is a 64x64
JPEG, ``photo`` a 640x480 one. Each round runs every case once, the order reversed
every other round, after ``--warmup`` untimed requests per case.

``--profile`` runs one more pass of each case under cProfile (the loop thread only)
and prints its Python calls per request, in all and in FastAPI and Starlette: a
count that does not drift with the machine's speed, as the CPU times do.

Comparing two trees: run this once per tree with ``PYTHONPATH=<tree>/app``, alternating.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import cProfile
import json
import pstats
import statistics
import struct
import tempfile
import time
from collections.abc import Awaitable, Callable
from typing import Any

import uvloop

from dgserve.api.app import create_app
from dgserve.settings import Settings
from litserve_peer import jpeg
from loadgen import multipart_body

MODEL = "shapes-dgnet"
SIZES = {"small": (64, 64), "photo": (640, 480)}
ASGIApp = Callable[[dict[str, Any], Any, Any], Awaitable[None]]


def request(protocol: str, image: bytes) -> tuple[str, bytes, list[tuple[bytes, bytes]]]:
    """``(path, body, headers)`` of one request carrying ``image``."""
    if protocol == "v1":
        body, content_type = multipart_body([image])
        return f"/v1/models/{MODEL}/classify", body, [(b"content-type", content_type.encode())]
    blob = struct.pack("<I", len(image)) + image
    head = json.dumps({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                                   "parameters": {"binary_data_size": len(blob)}}]}).encode()  # fmt: skip
    headers = [(b"content-type", b"application/octet-stream"), (b"inference-header-content-length", b"%d" % len(head))]
    return f"/v2/models/{MODEL}/infer", head + blob, headers


async def call(app: ASGIApp, path: str, body: bytes, headers: list[tuple[bytes, bytes]]) -> int:
    """One request through the ASGI app; its status. The client stays until the answer is complete."""
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
             "headers": [(b"host", b"bench"), (b"content-length", b"%d" % len(body)), *headers],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80), "state": {}}  # fmt: skip
    sent, done, status = False, asyncio.Event(), []

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await done.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            status.append(message["status"])
        elif not message.get("more_body"):
            done.set()

    await app(scope, receive, send)
    return status[0]


async def load(app: ASGIApp, wire: list[tuple[str, bytes, list[tuple[bytes, bytes]]]], count: int, clients: int) -> float:
    """Send ``count`` requests over ``clients`` callers; the loop thread's CPU seconds per request."""

    async def caller(first: int) -> None:
        for i in range(first, count, clients):
            status = await call(app, *wire[i % len(wire)])
            if status != 200:
                raise RuntimeError(f"request {i} answered {status}")

    started = time.thread_time()
    await asyncio.gather(*(caller(c) for c in range(clients)))
    return (time.thread_time() - started) / count


def calls_per_request(profile: cProfile.Profile, count: int) -> tuple[float, float]:
    """Python calls per request: in all, and in FastAPI and Starlette."""
    totals: collections.Counter[str] = collections.Counter()
    for (filename, _, _), (_, calls, _, _, _) in pstats.Stats(profile).stats.items():  # type: ignore[attr-defined]
        framework = "/fastapi/" in filename or "/starlette/" in filename
        totals["framework" if framework else "other"] += calls
    return sum(totals.values()) / count, totals["framework"] / count


async def run(args: argparse.Namespace) -> None:
    cases = [(p, u) for p in args.protocols.split(",") for u in args.uploads.split(",")]
    with tempfile.TemporaryDirectory() as data_dir:
        settings = Settings(models=[MODEL], data_dir=data_dir, grpc_port=None, max_batch_size=32, max_delay_ms=5,
                            max_queue_size=max(256, 4 * args.clients), access_log=False, log_level="warning")  # fmt: skip
        app = create_app(settings)
        wires = {(p, u): [request(p, jpeg(*SIZES[u], seed)) for seed in range(8)] for p, u in cases}
        async with app.router.lifespan_context(app):
            await app.state.dgserve.service.loaded()
            for case in cases:
                await load(app, wires[case], args.warmup, args.clients)
            costs: dict[tuple[str, str], list[float]] = {case: [] for case in cases}
            for round_ in range(1, args.rounds + 1):
                order = cases if round_ % 2 else cases[::-1]
                for case in order:
                    costs[case].append(await load(app, wires[case], args.requests, args.clients))
                print(f"round {round_}: " + ", ".join(f"{p} {u} {costs[(p, u)][-1] * 1e6:.0f} us" for p, u in order),
                      flush=True)  # fmt: skip
            for (protocol, upload), values in costs.items():
                ms = sorted(v * 1000 for v in values)
                print(f"{protocol} {upload}: loop CPU per request {ms[0]:.3f} / {statistics.median(ms):.3f} / "
                      f"{ms[-1]:.3f} ms (min / median / max over {len(ms)} rounds)")  # fmt: skip
            if args.profile:
                for case in cases:
                    profile = cProfile.Profile()
                    profile.enable()
                    await load(app, wires[case], args.requests, args.clients)
                    profile.disable()
                    total, framework = calls_per_request(profile, args.requests)
                    print(f"{case[0]} {case[1]}: {total:.0f} Python calls per request, "
                          f"{framework:.0f} of them in FastAPI and Starlette (cProfile, loop thread)")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--protocols", default="v1,oip", help="comma-separated: v1, oip")
    parser.add_argument("--uploads", default="small,photo", help="comma-separated: small (64x64), photo (640x480)")
    parser.add_argument("--requests", type=int, default=3000, help="timed requests per case and round")
    parser.add_argument("--warmup", type=int, default=400, help="untimed requests per case first")
    parser.add_argument("--clients", type=int, default=16, help="concurrent callers")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--profile", action="store_true", help="also count Python calls per request")
    args = parser.parse_args()
    uvloop.run(run(args))


if __name__ == "__main__":
    main()
