"""Does reading the inspections starve inference? Issue 13, finding 6, as same-run ratios.

    .venv/bin/python benchmarks/read_contention.py [--clients 8] [--requests 1500] [--rounds 5]
                                                   [--read-workers N]

One real server with the bundled shapes-dgnet. Each round runs the same classify load
(``--clients`` keep-alive connections, one 64x64 JPEG each) six times, in turn: alone,
while one client loops ``GET /v1/inspections?limit=1000`` as NDJSON, while one client
loops the Parquet export, while one loops the connectivity summary grouped by label, and
while one loops each of the two pictures (the summary's PNG, and one record's PNG:
matplotlib's drawing, the heaviest read per request). The reading client runs in a
process of its own, on the same cores, and is as lean as the load generator
(``reader``). ``--read-workers`` sets ``DGSERVE_READ_WORKERS`` (0: the reads run in the
server's threads, as before the reader processes). A run of 1,500 requests takes about
5 s here; even so, a summary's median moves by up to a tenth from one invocation to the
next. It prints each case's throughput and p99 as a ratio to the alone run of the same
round, then min / median / max over rounds. The target: a continuous read costs
inference at most 15 % of its throughput, and its p99 stays within 2x.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import statistics
import socket
import subprocess
import sys
import tempfile
import urllib.request
from collections.abc import Callable
from multiprocessing.sharedctypes import Synchronized
from multiprocessing.synchronize import Event
from pathlib import Path

from loadgen import run_load
from serve_throughput import HOST, build_post, free_port, jpeg, percentile, wait_ready

READS: dict[str, str] = {
    "listing": "/v1/inspections?limit=1000&format=ndjson",
    "export": "/v1/inspections/export?format=parquet",
    "summary": "/v1/models/shapes-dgnet/connectivity?group_by=label",
    "summary picture": "/v1/models/shapes-dgnet/connectivity.png?group_by=label",
    "record picture": "/v1/inspections/{id}/connectivity.png",  # a stored record's id, once there are some
}


def start(data_dir: Path, port: int, read_workers: int | None) -> subprocess.Popen[bytes]:
    env = {**os.environ, "DGSERVE_MODELS": "shapes-dgnet", "DGSERVE_ACCESS_LOG": "false",
           "DGSERVE_LOG_LEVEL": "warning", "DGSERVE_GRPC_PORT": "off"}  # fmt: skip
    if read_workers is not None:
        env["DGSERVE_READ_WORKERS"] = str(read_workers)
    command = [sys.executable, "-c", "from dgserve.cli import main; main()", "serve", "--host", HOST,
               "--port", str(port), "--data-dir", str(data_dir)]  # fmt: skip
    return subprocess.Popen(command, env=env)


def reader(port: int, path: str, started: Event, stop: Event, count: Synchronized[int]) -> None:
    """Loop one read until ``stop``, in a process of its own, reading each body to nowhere.

    A lean client, as ``loadgen`` is: a plain socket, one request per connection
    (``Connection: close``, so the body ends where the stream does), and the bytes read
    into one reused buffer. httpx in a thread of the load generator's process, as this
    benchmark first read, took that process's GIL from the load generator and spent
    milliseconds of CPU per read: the figures measured the client as well as the server.
    """
    request = f"GET {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\nConnection: close\r\n\r\n".encode()
    buffer = bytearray(256 * 1024)
    started.set()
    while not stop.is_set():
        with socket.create_connection((HOST, port), timeout=120) as sock:
            sock.sendall(request)
            first = sock.recv_into(buffer)
            status = bytes(buffer[:first]).split(b"\r\n", 1)[0]
            if status.split(b" ")[1:2] != [b"200"]:
                raise RuntimeError(f"GET {path}: {status.decode(errors='replace')}")
            while sock.recv_into(buffer):
                pass
        with count.get_lock():
            count.value += 1


def classify(port: int, requests: int, clients: int) -> tuple[float, float]:
    """(requests/s, p99 s) of ``requests`` classify calls over ``clients`` connections."""
    wire = [build_post(HOST, port, "/v1/models/shapes-dgnet/classify", jpeg(64, i % 32), "image/jpeg")
            for i in range(requests)]  # fmt: skip
    result = asyncio.run(run_load(HOST, port, wire, clients))
    if result.errors:
        raise RuntimeError(f"{len(result.errors)} errors, e.g. {result.errors[0]}")
    return result.requests / result.seconds, percentile(result.latencies_s, 99)


def with_reader(port: int, path: str, run: Callable[[], tuple[float, float]]) -> tuple[float, float, int]:
    context = multiprocessing.get_context("spawn")
    started, stop, count = context.Event(), context.Event(), context.Value("i", 0)
    process = context.Process(target=reader, args=(port, path, started, stop, count), daemon=True)
    process.start()
    try:
        if not started.wait(timeout=60):
            raise RuntimeError("the reader process did not start")
        result = run()
        if not process.is_alive():
            raise RuntimeError(f"the reader process failed (exit code {process.exitcode})")
        return (*result, count.value)
    finally:
        stop.set()
        process.join(timeout=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=1500)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--read-workers", type=int, default=None, help="DGSERVE_READ_WORKERS (default: the server's)")
    args = parser.parse_args()
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        base = f"http://{HOST}:{port}"
        server = start(Path(tmp), port, args.read_workers)
        try:
            wait_ready(base, server)
            classify(port, 2000, args.clients)  # warm-up, and 2000 records for the reads to read
            run = lambda: classify(port, args.requests, args.clients)  # noqa: E731
            with urllib.request.urlopen(f"{base}/v1/inspections?limit=1", timeout=60) as listing:
                stored = json.load(listing)["records"][0]["id"]
            ratios: dict[str, list[tuple[float, float]]] = {name: [] for name in READS}
            for round_ in range(1, args.rounds + 1):
                alone = run()
                print(f"round {round_}: alone {alone[0]:.1f} req/s, p99 {alone[1] * 1000:.0f} ms", flush=True)
                for name, path in READS.items():
                    rate, p99, reads = with_reader(port, path.replace("{id}", stored), run)
                    ratios[name].append((rate / alone[0], p99 / alone[1]))
                    print(f"  with the {name} looping ({reads} reads): {rate:.1f} req/s ({rate / alone[0]:.2f}x), "
                          f"p99 {p99 * 1000:.0f} ms ({p99 / alone[1]:.2f}x)", flush=True)  # fmt: skip
            for name, values in ratios.items():
                rates, tails = [r for r, _ in values], [t for _, t in values]
                print(f"{name}: throughput ratio min {min(rates):.2f} median {statistics.median(rates):.2f} "
                      f"max {max(rates):.2f}; p99 ratio min {min(tails):.2f} median {statistics.median(tails):.2f} "
                      f"max {max(tails):.2f}  (target: >= 0.85 and <= 2.0)")  # fmt: skip
            print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
        finally:
            server.terminate()
            server.wait(timeout=60)


if __name__ == "__main__":
    main()
