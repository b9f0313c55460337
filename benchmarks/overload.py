"""Goodput under overload (issue 13, finding 1), as same-run ratios.

    .venv/bin/python benchmarks/overload.py [--rounds 3] [--seconds 15] [--clients 8] [--factor 25]
                                            [--queue 8] [--server-env KEY=VALUE ...]

One real server with the bundled shapes-dgnet and ``DGSERVE_MAX_QUEUE_SIZE=--queue``.
Each round runs, in turn:

* **peak**: ``hey -c CLIENTS`` posting a 64x64 PNG for ``--seconds``: what the server
  can serve;
* **overload**: ``hey -c CLIENTS*FACTOR`` posting the same, while a prober GETs
  ``/healthz`` every 50 ms on a connection of its own.

From hey's per-request CSV it reports the overload's goodput (200s per second) as a
ratio to the peak of the same round, the p99 of its 503s, and the prober's /healthz
p99, then min / median / max over rounds. The targets: goodput >= 0.8 of peak, 503
p99 <= 50 ms, /healthz p99 <= 50 ms. hey (Debian's ``hey``) runs on the same cores
as the server, as a client on this machine would.

It also reports where the cores went during the overload: hey's CPU per request and
the server's (its whole process tree) per request, and the cores both used together.
A refused client retries at once, so the 503s' latency is the number of clients
divided by the refusals per second; those figures say what a given rate costs.
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from PIL import Image

from serve_throughput import HOST, free_port, percentile, process_cpu_s, wait_ready

TARGETS = {"goodput": 0.8, "p99_503_ms": 50.0, "healthz_p99_ms": 50.0}


def start(data_dir: Path, port: int, queue: int, extra: dict[str, str]) -> subprocess.Popen[bytes]:
    env = {**os.environ, "DGSERVE_MODELS": "shapes-dgnet", "DGSERVE_ACCESS_LOG": "false",
           "DGSERVE_LOG_LEVEL": "warning", "DGSERVE_GRPC_PORT": "off",
           "DGSERVE_MAX_QUEUE_SIZE": str(queue), **extra}  # fmt: skip
    command = [sys.executable, "-c", "from dgserve.cli import main; main()", "serve", "--host", HOST,
               "--port", str(port), "--data-dir", str(data_dir)]  # fmt: skip
    return subprocess.Popen(command, env=env)


def children_cpu_s() -> float:
    """CPU seconds of this process's children that have been waited for (each hey run)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def hey(url: str, body: Path, clients: int, seconds: float) -> list[tuple[float, int]]:
    """(response time s, status) per request; a request that got no answer has status 0."""
    out = subprocess.run(
        ["hey", "-c", str(clients), "-z", f"{seconds}s", "-m", "POST", "-T", "image/png", "-D", str(body),
         "-o", "csv", url],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    rows = []
    for row in csv.DictReader(io.StringIO(out.stdout)):
        rows.append((float(row["response-time"]), int(row["status-code"] or 0)))
    return rows


def probe(port: int, stop: threading.Event, latencies: list[float]) -> None:
    """GET /healthz every 50 ms on one kept-alive connection, as bytes on a socket: httpx
    costs milliseconds of CPU per request, which on these shared cores would be measured
    as the server's latency (the reason ``loadgen.py`` exists)."""
    request = f"GET /healthz HTTP/1.1\r\nHost: {HOST}:{port}\r\n\r\n".encode()
    with socket.create_connection((HOST, port), timeout=10) as sock:
        while not stop.is_set():
            started = time.perf_counter()
            sock.sendall(request)
            status = read_response(sock)
            latencies.append(time.perf_counter() - started)
            if status != 200:
                raise RuntimeError(f"/healthz answered {status}")
            stop.wait(0.05)


def read_response(sock: socket.socket) -> int:
    """One response's status, its body read by ``Content-Length``."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    length = next(int(line.split(b":", 1)[1]) for line in lines if line.lower().startswith(b"content-length:"))
    while len(body) < length:
        body += sock.recv(65536)
    return int(lines[0].split(b" ")[1])


def summary(name: str, values: list[float], unit: str = "") -> str:
    return f"{name}: {min(values):.3f} / {statistics.median(values):.3f} / {max(values):.3f}{unit} (min / median / max)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--clients", type=int, default=8, help="clients at peak")
    parser.add_argument("--factor", type=int, default=25, help="overload = clients x factor")
    parser.add_argument("--queue", type=int, default=8, help="DGSERVE_MAX_QUEUE_SIZE")
    parser.add_argument("--server-env", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    if shutil.which("hey") is None:
        sys.exit("hey is not installed (apt-get install hey)")
    extra = dict(item.split("=", 1) for item in args.server_env)

    body = Path(tempfile.mkdtemp()) / "image.png"
    Image.new("RGB", (64, 64), (200, 40, 40)).save(body)
    port = free_port()
    base = f"http://{HOST}:{port}"
    url = f"{base}/v1/models/shapes-dgnet/classify?connectivity=false"
    with tempfile.TemporaryDirectory() as data_dir:
        server = start(Path(data_dir), port, args.queue, extra)
        try:
            wait_ready(base, server)
            hey(url, body, args.clients, 3)  # warm-up
            goodputs, p99s, healthz = [], [], []
            print(f"shapes-dgnet, queue {args.queue}, peak at {args.clients} clients, overload at "
                  f"{args.clients * args.factor}, {args.seconds:.0f} s each, server env {extra or 'default'}")
            for round_ in range(1, args.rounds + 1):
                peak = hey(url, body, args.clients, args.seconds)
                peak_rate = sum(s == 200 for _, s in peak) / args.seconds
                stop, latencies = threading.Event(), []
                prober = threading.Thread(target=probe, args=(port, stop, latencies))
                prober.start()
                hey_cpu, server_cpu, started = children_cpu_s(), process_cpu_s(server.pid), time.perf_counter()
                try:
                    over = hey(url, body, args.clients * args.factor, args.seconds)
                finally:
                    stop.set()
                    prober.join()
                wall = time.perf_counter() - started
                hey_cpu = children_cpu_s() - hey_cpu
                after = process_cpu_s(server.pid)
                server_cpu = None if after is None or server_cpu is None else after - server_cpu
                ok = sum(s == 200 for _, s in over) / args.seconds
                rejected = sorted(t for t, s in over if s == 503)
                other = {s: sum(x == s for _, x in over) for s in {s for _, s in over} - {200, 503}}
                p99_503 = percentile(rejected, 99) * 1000 if rejected else float("nan")
                health = percentile(sorted(latencies), 99) * 1000
                goodputs.append(ok / peak_rate)
                p99s.append(p99_503)
                healthz.append(health)
                print(f"round {round_}: peak {peak_rate:.1f}/s | overload {ok:.1f}/s ok, "
                      f"{len(rejected) / args.seconds:.0f}/s 503 (p99 {p99_503:.1f} ms), other {other or 'none'} | "
                      f"goodput {ok / peak_rate:.3f} of peak | /healthz p99 {health:.1f} ms ({len(latencies)} probes)")
                if server_cpu is not None and over:
                    print(f"  CPU during the overload: hey {1e6 * hey_cpu / len(over):.0f} us per request, server "
                          f"{1e6 * server_cpu / len(over):.0f} us per request; together "
                          f"{(hey_cpu + server_cpu) / wall:.2f} of {os.cpu_count()} cores")
            print(summary("goodput / peak", goodputs), f"[target >= {TARGETS['goodput']}]")
            print(summary("503 p99", p99s, " ms"), f"[target <= {TARGETS['p99_503_ms']:.0f} ms]")
            print(summary("/healthz p99", healthz, " ms"), f"[target <= {TARGETS['healthz_p99_ms']:.0f} ms]")
        finally:
            server.terminate()
            server.wait(60)


if __name__ == "__main__":
    main()
