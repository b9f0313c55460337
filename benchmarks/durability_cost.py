"""What answering only once the records are committed costs (issue 13, finding 3), as same-run ratios.

    .venv/bin/python benchmarks/durability_cost.py [--clients 32] [--requests 3000] [--rounds 5]
                                                   [--processes auto] [--batch-size 32]

Two real servers with the bundled shapes-dgnet run side by side, each on its own port
and data directory: one with ``DGSERVE_INSPECTION_DURABILITY=sync`` (the default: an
answer carries its inspection id only once the record is committed) and one with
``async`` (the record written behind the answer, the opt-out). Each round sends the
same classify load (``--clients`` keep-alive connections, one 64x64 JPEG per request)
to one, then the other, the order swapped every round, and prints each one's img/s and
p99. Only one server is loaded at a time; the idle one costs nothing noticeable.

The summary is sync's throughput as a ratio to async's in the same round, and the same
for p99, min / median / max over rounds. The target: sync loses at most 5 % (a ratio
of at least 0.95). ``--processes`` sets ``DGSERVE_SERVER_PROCESSES`` for both (default: the
server's own default, ``auto``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from read_contention import classify  # (requests/s, p99 s); one image per request, so images/s
from serve_throughput import HOST, free_port, wait_ready

MODES = ("sync", "async")
TARGET = 0.95


def start(data_dir: Path, port: int, mode: str, args: argparse.Namespace) -> subprocess.Popen[bytes]:
    batching = {"max_batch_size": args.batch_size, "max_delay_ms": 5.0, "max_queue_size": 256}
    env = {**os.environ, "DGSERVE_MODELS": "shapes-dgnet", "DGSERVE_ACCESS_LOG": "false",
           "DGSERVE_LOG_LEVEL": "warning", "DGSERVE_GRPC_PORT": "off",
           "DGSERVE_BATCHING": json.dumps({"shapes-dgnet": batching}),
           "DGSERVE_INSPECTION_DURABILITY": mode, "DGSERVE_SERVER_PROCESSES": str(args.processes)}  # fmt: skip
    command = [sys.executable, "-c", "from dgserve.cli import main; main()", "serve", "--host", HOST,
               "--port", str(port), "--data-dir", str(data_dir)]  # fmt: skip
    return subprocess.Popen(command, env=env)


def summary(label: str, values: list[float]) -> str:
    return f"{label}: {min(values):.3f} / {statistics.median(values):.3f} / {max(values):.3f} (min / median / max)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--warmup", type=int, default=600, help="untimed requests per server first")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--processes", default="auto", help="DGSERVE_SERVER_PROCESSES for both servers")
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    print(f"shapes-dgnet, {args.clients} clients, {args.requests} requests per run, DGSERVE_SERVER_PROCESSES="
          f"{args.processes}, batch {args.batch_size} / 5 ms; load average {os.getloadavg()[0]:.2f}", flush=True)  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        ports = {mode: free_port() for mode in MODES}
        servers: dict[str, subprocess.Popen[bytes]] = {}
        try:
            for mode in MODES:
                (Path(tmp) / mode).mkdir()
                servers[mode] = start(Path(tmp) / mode, ports[mode], mode, args)
            for mode in MODES:
                wait_ready(f"http://{HOST}:{ports[mode]}", servers[mode])
                classify(ports[mode], args.warmup, args.clients)
            rates, tails = [], []
            for round_ in range(1, args.rounds + 1):
                order = MODES if round_ % 2 else MODES[::-1]
                got = {mode: classify(ports[mode], args.requests, args.clients) for mode in order}
                rates.append(got["sync"][0] / got["async"][0])
                tails.append(got["sync"][1] / got["async"][1])
                print(f"round {round_}: " + ", ".join(f"{m} {got[m][0]:.1f} img/s (p99 {got[m][1] * 1000:.0f} ms)"
                                                      for m in order)
                      + f" | sync/async {rates[-1]:.3f}", flush=True)  # fmt: skip
            print(summary("sync / async throughput", rates), f"[target >= {TARGET}]")
            print(summary("sync / async p99", tails))
        finally:
            for server in servers.values():
                server.terminate()
            for server in servers.values():
                server.wait(timeout=60)


if __name__ == "__main__":
    main()
