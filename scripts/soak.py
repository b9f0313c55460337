"""Soak: a real server under mixed load for a while; does it leak, fail or lose requests?

    scripts/soak.sh [--duration 600] [--clients 8] [--warmup S] [--overload-clients 200]
                    [--overload-every 60] [--server-env DGSERVE_KEY=VALUE ...]

Starts ``dgserve serve`` on the bundled store (shapes-dgnet and shapes-detector) with
a fresh data directory and ``DGSERVE_MAX_QUEUE_SIZE=32``, and runs, for ``--duration``
seconds:

* classify at a steady ``--clients`` keep-alive connections (``benchmarks/loadgen.py``);
* beside it, one client in a loop: a classify and a detect through httpx, a GET of each
  returned id (which must be there), a listing (NDJSON, 500 records), the connectivity
  summary, and every third round the Parquet export;
* every ``--overload-every`` seconds, a burst of ``--overload-clients`` more classify
  connections, 20 requests each, far past what the queue holds: most are refused with
  503, and so, meanwhile, are some of the steady clients' requests.

The RSS of the server's whole process tree (server processes, model and reader
processes) is sampled every 2 s. At the end it prints requests done, answers by status,
each answer that was neither a 2xx nor a 503 (which request, its status, the start of its
body), classify p50/p99, throughput per minute, and the tree's RSS at the start, after
the warm-up (``--warmup``, default a quarter of the run, at most 60 s), at the end and
at most, with the growth after the warm-up. It exits 1 if RSS grew more than 5 % after the warm-up, if any answer
was neither a 2xx nor a 503, or if any request was lost (reset, timed out, or an
answered id not found).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from loadgen import build_post, run_load  # noqa: E402
from serve_throughput import HOST, free_port, jpeg, percentile, tree_pids, wait_ready  # noqa: E402

MODELS = "shapes-dgnet,shapes-detector"
RSS_GROWTH_MAX = 0.05


def rss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


class Tally:
    """Counts shared by the load threads."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.statuses: Counter[int] = Counter()
        self.lost: list[str] = []
        self.unexpected: list[str] = []  # each answer neither 2xx nor 503: who got it, and what it said
        self.done_at: list[float] = []  # completion times of 2xx answers
        self.latencies: list[float] = []
        self.bursts = 0

    def answer(self, status: int, at: float, where: str = "", body: str = "") -> None:
        with self.lock:
            self.statuses[status] += 1
            if 200 <= status < 300:
                self.done_at.append(at)
            elif status != 503:
                self.unexpected.append(f"{where}: {status} {body[:200]}")


def classify_load(port: int, clients: int, stop_at: float, tally: Tally) -> None:
    wire = [build_post(HOST, port, "/v1/models/shapes-dgnet/classify", jpeg(64, i % 32), "image/jpeg")
            for i in range(clients * 25)]  # fmt: skip
    while time.monotonic() < stop_at:
        result = asyncio.run(run_load(HOST, port, wire, clients, timeout_s=60))
        now = time.monotonic()
        with tally.lock:
            tally.latencies += result.latencies_s
            tally.statuses[200] += result.requests
            tally.done_at += [now] * result.requests
            for error in result.errors:
                if error.startswith("HTTP "):
                    tally.statuses[int(error[5:])] += 1
                    if error != "HTTP 503":
                        tally.unexpected.append(f"classify: {error}")
                else:
                    tally.lost.append(f"classify: {error}")


def overload_bursts(port: int, clients: int, every: float, stop_at: float, tally: Tally) -> None:
    """Every ``every`` s, ``clients`` more connections post 20 classifies each: mostly refused."""
    wire = [build_post(HOST, port, "/v1/models/shapes-dgnet/classify", jpeg(64, i % 32), "image/jpeg")
            for i in range(clients * 20)]  # fmt: skip
    next_at = time.monotonic() + every / 2
    while time.monotonic() + 1 < stop_at:
        time.sleep(max(0.0, min(next_at, stop_at) - time.monotonic()))
        if time.monotonic() + 1 >= stop_at:
            return
        next_at += every
        result = asyncio.run(run_load(HOST, port, wire, clients, timeout_s=60))
        now = time.monotonic()
        with tally.lock:
            tally.statuses[200] += result.requests
            tally.done_at += [now] * result.requests
            tally.bursts += 1
            for error in result.errors:
                if error.startswith("HTTP "):
                    tally.statuses[int(error[5:])] += 1
                    if error != "HTTP 503":
                        tally.unexpected.append(f"overload: {error}")
                else:
                    tally.lost.append(f"overload: {error}")


def reads_loop(base: str, stop_at: float, tally: Tally) -> None:
    image = jpeg(64, 7)
    rounds = 0
    with httpx.Client(base_url=base, timeout=120) as client:
        while time.monotonic() < stop_at:
            rounds += 1
            calls = [("POST", "/v1/models/shapes-dgnet/classify"), ("POST", "/v1/models/shapes-detector/detect"),
                     ("GET", "/v1/inspections?limit=500&format=ndjson"),
                     ("GET", "/v1/models/shapes-dgnet/connectivity?group_by=label")]  # fmt: skip
            if rounds % 3 == 0:
                calls.append(("GET", "/v1/inspections/export?format=parquet"))
            for method, path in calls:
                try:
                    if method == "POST":
                        response = client.post(path, content=image, headers={"content-type": "image/jpeg"})
                    else:
                        with client.stream("GET", path) as response:
                            if response.status_code == 200:
                                for _ in response.iter_bytes():
                                    pass
                            else:
                                response.read()  # an error's JSON, for the report
                except httpx.HTTPError as exc:
                    tally.lost.append(f"{method} {path}: {type(exc).__name__}: {exc}")
                    continue
                body = "" if response.status_code == 200 else response.text
                tally.answer(response.status_code, time.monotonic(), f"{method} {path}", body)
                if method == "POST" and response.status_code == 200:
                    for result in response.json()["results"]:
                        got = client.get(f"/v1/inspections/{result['id']}")
                        tally.answer(got.status_code, time.monotonic(), f"GET /v1/inspections/{result['id']}", got.text)
                        if got.status_code != 200:
                            tally.lost.append(f"answered id {result['id']}: GET gave {got.status_code}")
            time.sleep(1.0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=600.0, help="seconds of load (default 600)")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--warmup", type=float, default=None, help="seconds before the RSS baseline")
    parser.add_argument("--overload-clients", type=int, default=200, help="connections of each overload burst")
    parser.add_argument("--overload-every", type=float, default=60.0, help="seconds between overload bursts")
    parser.add_argument("--server-env", action="append", default=[], metavar="DGSERVE_KEY=VALUE",
                        help="a server setting, repeatable (e.g. DGSERVE_SERVER_PROCESSES=1)")
    args = parser.parse_args()
    warmup = args.warmup if args.warmup is not None else min(60.0, args.duration / 4)
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        base = f"http://{HOST}:{port}"
        env = {**os.environ, "DGSERVE_MODELS": MODELS, "DGSERVE_ACCESS_LOG": "false", "DGSERVE_LOG_LEVEL": "warning",
               "DGSERVE_GRPC_PORT": "off", "DGSERVE_MAX_QUEUE_SIZE": "32"}  # fmt: skip
        for item in args.server_env:
            key, sep, value = item.partition("=")
            if not sep or not key.startswith("DGSERVE_"):
                parser.error(f"--server-env {item!r}: expected DGSERVE_KEY=VALUE")
            env[key] = value
        print("server settings: " + " ".join(f"{k}={v}" for k, v in sorted(env.items()) if k.startswith("DGSERVE_")))
        server = subprocess.Popen([sys.executable, "-c", "from dgserve.cli import main; main()", "serve",
                                   "--host", HOST, "--port", str(port), "--data-dir", tmp], env=env)  # fmt: skip
        try:
            wait_ready(base, server)
            return soak(server, base, port, args, warmup)
        finally:
            server.terminate()
            server.wait(timeout=120)


def soak(server: subprocess.Popen[bytes], base: str, port: int, args: argparse.Namespace, warmup: float) -> int:
    tally = Tally()
    started = time.monotonic()
    stop_at = started + args.duration
    threads = [threading.Thread(target=classify_load, args=(port, args.clients, stop_at, tally)),
               threading.Thread(target=reads_loop, args=(base, stop_at, tally)),
               threading.Thread(target=overload_bursts,
                                args=(port, args.overload_clients, args.overload_every, stop_at, tally))]  # fmt: skip
    for thread in threads:
        thread.start()
    samples: list[tuple[float, int, int]] = []  # (seconds since start, the tree's RSS in kB, its processes)
    while any(t.is_alive() for t in threads):
        pids = tree_pids(server.pid)  # server processes, model and reader processes
        samples.append((time.monotonic() - started, sum(map(rss_kb, pids)), len(pids)))
        time.sleep(2.0)
    for thread in threads:
        thread.join()
    seconds = time.monotonic() - started

    after = [s for s in samples if s[0] >= warmup] or samples[-1:]
    start_kb, end_kb, max_kb = after[0][1], after[-1][1], max(s[1] for s in after)
    growth = (end_kb - start_kb) / start_kb if start_kb else 0.0
    done = sum(n for status, n in tally.statuses.items() if 200 <= status < 300)
    print(f"duration {seconds:.0f} s, load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"requests answered 2xx: {done}; by status: {dict(sorted(tally.statuses.items()))}")
    if tally.latencies:
        print(f"classify latency p50 {statistics.median(tally.latencies) * 1000:.0f} ms, "
              f"p99 {percentile(tally.latencies, 99) * 1000:.0f} ms over {len(tally.latencies)}")  # fmt: skip
    per_minute = Counter(int((t - started) // 60) for t in tally.done_at)
    print("2xx per minute: " + ", ".join(f"min {m + 1}: {per_minute[m]}" for m in sorted(per_minute)))
    print(f"overload bursts of {args.overload_clients} connections: {tally.bursts}")
    print(f"RSS of the server's {samples[0][2]} processes at start {samples[0][1] / 1024:.1f} MiB")
    print(f"RSS of the server's {after[-1][2]} processes after warm-up ({warmup:.0f} s) {start_kb / 1024:.1f} MiB, "
          f"end {end_kb / 1024:.1f} MiB, max {max_kb / 1024:.1f} MiB, growth {growth * 100:+.1f} %")  # fmt: skip
    errors = {status: n for status, n in tally.statuses.items() if not (200 <= status < 300 or status == 503)}
    for line in tally.unexpected[:50]:
        print(f"unexpected answer: {line}")
    if len(tally.unexpected) > 50:
        print(f"... and {len(tally.unexpected) - 50} more")
    failed = []
    if growth > RSS_GROWTH_MAX:
        failed.append(f"RSS grew {growth * 100:.1f} % (> {RSS_GROWTH_MAX * 100:.0f} %)")
    if errors:
        failed.append(f"answers neither 2xx nor 503: {errors}")
    if tally.lost:
        failed.append(f"{len(tally.lost)} lost requests, e.g. {tally.lost[:3]}")
    print("FAIL: " + "; ".join(failed) if failed else "PASS")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
