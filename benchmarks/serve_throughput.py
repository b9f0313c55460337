"""Serving overhead in one run: raw batched model throughput vs the HTTP server's.

(a) raw: ``model(batch)`` in this process under ``torch.inference_mode`` at batch size
    B, in a thread of its own, on tensors already preprocessed (decoding,
    preprocessing, connectivity collection and JSON are all excluded -- the strictest
    baseline);
(b) server: a real ``dgserve serve`` (uvicorn) started by this script on 127.0.0.1,
    the same model and max_batch_size=B, under N concurrent keep-alive connections
    each posting one request at a time (the server decodes, preprocesses, batches,
    records connectivity, stores the inspection record and answers JSON).

This machine may be shared, and its speed drifts over minutes. So the two are measured
in alternating rounds -- raw, then server, R times, each over the same number of
images -- and each round's ratio compares measurements taken side by side; the
summary is the median round. Each round also says where a shortfall comes from: the
server's own compute time per image (from its metrics) against raw's, the CPU cores
the server's process tree used, and the load generator's CPU (it shares the cores).

Usage::

    python benchmarks/serve_throughput.py --create dgnet_resnet50 --image-size 224 \\
        --batch-size 8 --clients 32 --requests 256

``--create ARCH`` saves a temporary store entry with random weights (throughput does
not depend on the weights); otherwise ``--store``/``--model`` name an existing one.
``--images-per-request K`` posts multipart requests of K images each.
``--protocols v1,v2`` also drives the Open Inference Protocol (``POST /v2/models/{name}/infer``,
the encoded images as one binary ``BYTES [K]`` input, every output asked for as binary data,
as tritonclient sends them) and reports each protocol's rate beside raw in the same round.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import math
import os
import resource
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import torch
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from dgserve.allocator import keep_large_blocks
from dgserve.models.registry import create_model
from dgserve.imaging import IMAGENET_MEAN as MEAN
from dgserve.imaging import IMAGENET_STD as STD
from dgserve.imaging import preprocess
from dgserve.serving.decode import decode_image
from dgserve.serving.worker import autocast_dtype, set_memory_format
from dgserve.settings import default_model_store
from dgserve.model_store import LoadedModel, ModelStore

sys.path.insert(0, str(Path(__file__).resolve().parent))
from loadgen import Request, build_post, multipart_body, run_load  # noqa: E402

HOST = "127.0.0.1"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--store", type=Path, default=None, help="model store (default: the bundled one; ignored with --create)")
    p.add_argument("--model", default="bench", help="model name in the store")
    p.add_argument("--create", default=None, metavar="ARCH", help="save ARCH with random weights as --model first")
    p.add_argument("--clients", type=int, default=32, help="concurrent HTTP connections")
    p.add_argument("--requests", type=int, default=256, help="measured requests per round")
    p.add_argument("--images-per-request", type=int, default=1, help="K > 1 posts multipart requests of K images")
    p.add_argument("--batch-size", type=int, default=8, help="B: raw batch size and the server's max_batch_size")
    p.add_argument("--image-size", type=int, default=224, help="model input size (square)")
    p.add_argument("--rounds", type=int, default=3, help="alternating raw/server rounds")
    p.add_argument("--raw-warmup", type=int, default=3, help="untimed raw batches first (allocator, oneDNN caches)")
    p.add_argument("--max-delay-ms", type=float, default=5.0, help="server max_delay_ms")
    p.add_argument("--no-connectivity", action="store_true", help="ask the server for ?connectivity=false")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="device for raw and for the server (default: cuda when there is one)")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32",
                   help="forward precision (torch.autocast) of raw and of the server (DGSERVE_PRECISION)")
    p.add_argument("--protocols", default="v1", help="comma-separated: v1 (POST /v1/.../classify), v2 (OIP infer)")
    p.add_argument("--json", type=Path, default=None, help="also write the figures here as JSON")
    p.add_argument("--malloc", choices=["kept", "default"], default="kept",
                   help="glibc malloc policy of raw and server alike: kept (the server's default, dgserve.allocator) "
                        "or glibc's own (DGSERVE_MALLOC_KEEP_LARGE_BLOCKS=false)")
    p.add_argument("--memory-format", choices=["channels_last", "contiguous"], default="channels_last",
                   help="convolution layout of raw and server alike (DGSERVE_MEMORY_FORMAT; the server's default first)")
    return p.parse_args()


def prepare_store(args: argparse.Namespace, tmp: Path) -> Path:
    if not args.create:
        return args.store or default_model_store()
    # Always a temporary store: a benchmark never writes into a real one.
    root = tmp / "model_store"
    labels = [f"class_{i}" for i in range(1000)]
    ModelStore(root).save(
        create_model(args.create, num_classes=len(labels)), name=args.model, architecture=args.create,
        arch_kwargs={"num_classes": len(labels)}, labels=labels,
        preprocessing={"input_size": [args.image_size, args.image_size], "mean": MEAN, "std": STD},
        description="random weights, for benchmarking",
    )
    print(f"created {args.create} as {args.model!r} (random weights) in a temporary store")
    return root


def test_images(size: int) -> list[bytes]:
    return [jpeg(size, seed) for seed in range(8)]


def jpeg(size: int, seed: int) -> bytes:
    gen = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (size, size, 3), generator=gen, dtype=torch.uint8).numpy()
    buf = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buf, "JPEG", quality=90)
    return buf.getvalue()


# --- (a) raw ---------------------------------------------------------------------------


class RawModel:
    """The model in this process, timed on the very images the clients send."""

    def __init__(self, root: Path, args: argparse.Namespace) -> None:
        torch.set_num_threads(os.cpu_count() or 1)  # what the server's single CPU worker gets
        if args.malloc == "kept":
            keep_large_blocks()  # as the server's process does
        self.device = torch.device(args.device)
        self.loaded: LoadedModel = ModelStore(root).load(args.model, device=self.device)
        set_memory_format(self.loaded.model, args.memory_format)  # as the server's worker does
        if self.loaded.manifest.task != "classification":
            raise SystemExit(f"{args.model!r} is a {self.loaded.manifest.task} model; this benchmark drives /classify")
        pre = self.loaded.manifest.preprocessing
        # With DG-Net the input decides which blocks run, so random tensors would time another path.
        images = [decode_image(data, max_pixels=10**9) for data in test_images(args.image_size)]
        # Already on the device: raw excludes the host-to-device copy the server makes.
        self.batch = torch.stack(
            [preprocess(images[i % len(images)], pre) for i in range(args.batch_size)]
        ).to(self.device)
        # The server's worker runs the model in a thread of its own; so does this.
        self._executor = ThreadPoolExecutor(max_workers=1)
        self._autocast = autocast_dtype(args.precision, self.device)  # what the server's worker applies
        self._executor.submit(self._run, args.raw_warmup).result()

    def _run(self, batches: int) -> float:
        precision = (torch.autocast(self.device.type, dtype=self._autocast) if self._autocast is not None
                     else contextlib.nullcontext())
        with torch.inference_mode(), precision:
            started = time.perf_counter()
            for _ in range(batches):
                self.loaded.model(self.batch)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            return time.perf_counter() - started

    def images_per_s(self, batches: int) -> float:
        return batches * self.batch.shape[0] / self._executor.submit(self._run, batches).result()


# --- (b) server ------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def start_server(root: Path, data_dir: Path, port: int, args: argparse.Namespace) -> subprocess.Popen[bytes]:
    batching = {"max_batch_size": args.batch_size, "max_delay_ms": args.max_delay_ms,
                "max_queue_size": max(256, 4 * args.clients * args.images_per_request)}
    env = {**os.environ, "DGSERVE_MODELS": args.model, "DGSERVE_DEVICES": args.device,
           "DGSERVE_BATCHING": json.dumps({args.model: batching}), "DGSERVE_ACCESS_LOG": "false",
           "DGSERVE_LOG_LEVEL": "warning", "DGSERVE_GRPC_PORT": "off", "DGSERVE_PRECISION": args.precision,
           "DGSERVE_MALLOC_KEEP_LARGE_BLOCKS": str(args.malloc == "kept").lower(),
           "DGSERVE_MEMORY_FORMAT": args.memory_format}
    command = [sys.executable, "-c", "from dgserve.cli import main; main()", "serve", "--host", HOST,
               "--port", str(port), "--store", str(root), "--data-dir", str(data_dir)]
    return subprocess.Popen(command, env=env)


def wait_ready(base: str, server: subprocess.Popen[bytes], timeout: float = 600) -> None:
    """Until ``/readyz`` is 200 and every server process serves every model and listens.

    With several server processes (``DGSERVE_SERVER_PROCESSES``, 2 by default on 2 cores)
    the first answers ``/readyz`` once it serves, while the others may still be loading:
    a process whose app has not started is left out of the merged ``/metrics``, so it
    waits until ``dgserve_server_processes`` counts every process the supervisor started,
    and until each has opened its listener (the kernel spreads connections only over
    the listeners it has when they are made).
    """
    port = int(base.rsplit(":", 1)[1])
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"server exited with {server.returncode}")
        try:
            if httpx.get(f"{base}/readyz").status_code == 200:
                metrics, expected = httpx.get(f"{base}/metrics").text, len(server_children(server.pid)) or 1
                if all_serving(metrics) and merged_processes(metrics) == expected and listeners(port) >= expected:
                    return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise TimeoutError("server did not become ready")


def server_children(pid: int) -> list[int]:
    """The server processes a supervisor (``dgserve serve``'s ``pid``) spawned, none for a
    single server; their own reader and model processes are theirs, and multiprocessing's
    resource tracker is not one."""
    try:
        children = [int(c) for t in Path(f"/proc/{pid}/task").iterdir() for c in (t / "children").read_text().split()]
    except OSError:
        return []
    return sorted(c for c in children if _is_spawned_child(c))


def _is_spawned_child(pid: int) -> bool:
    try:
        return b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def merged_processes(metrics: str) -> int:
    """``dgserve_server_processes`` of a scrape (a single server exposes none: 1)."""
    lines = [line for line in metrics.splitlines() if line.startswith("dgserve_server_processes ")]
    return int(float(lines[0].split()[1])) if lines else 1


def listeners(port: int) -> int:
    """TCP sockets in LISTEN on ``port``, from the kernel's tables."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as lines:
            next(lines)  # the header
            count += sum(f[3] == "0A" and int(f[1].rsplit(":", 1)[1], 16) == port for f in map(str.split, lines))
    return count


def all_serving(metrics: str) -> bool:
    """Whether every ``dgserve_model_ready`` sample of a scrape is 1."""
    ready = [line.rsplit(" ", 1)[1] for line in metrics.splitlines() if line.startswith("dgserve_model_ready{")]
    return bool(ready) and all(float(value) == 1 for value in ready)


def build_requests(port: int, args: argparse.Namespace, protocol: str = "v1") -> list[Request]:
    images = test_images(args.image_size)
    k = args.images_per_request
    if protocol == "v2":
        return [oip_request(port, args, [images[(i * k + j) % len(images)] for j in range(k)])
                for i in range(args.requests)]  # fmt: skip
    path = f"/v1/models/{args.model}/classify" + ("?connectivity=false" if args.no_connectivity else "")
    out = []
    for i in range(args.requests):
        if k == 1:
            out.append(build_post(HOST, port, path, images[i % len(images)], "image/jpeg"))
        else:
            body, content_type = multipart_body([images[(i * k + j) % len(images)] for j in range(k)])
            out.append(build_post(HOST, port, path, body, content_type, images=k))
    return out


def oip_request(port: int, args: argparse.Namespace, images: list[bytes]) -> Request:
    """An OIP infer request as tritonclient.http sends it: JSON, then the BYTES tensor in binary."""
    raw = b"".join(struct.pack("<I", len(data)) + data for data in images)
    doc: dict[str, object] = {
        "inputs": [{"name": "image", "datatype": "BYTES", "shape": [len(images)],
                    "parameters": {"binary_data_size": len(raw)}}],
        "parameters": {"binary_data_output": True},
    }  # fmt: skip
    if args.no_connectivity:  # the same answer ?connectivity=false gives on /v1
        doc["outputs"] = [{"name": n, "parameters": {"binary_data": True}}
                          for n in ("scores", "class_indices", "labels", "inspection_id")]  # fmt: skip
    head = json.dumps(doc).encode()
    return build_post(HOST, port, f"/v2/models/{args.model}/infer", head + raw, "application/octet-stream",
                      images=len(images), headers={"Inference-Header-Content-Length": str(len(head))})


@dataclass
class ServerSide:
    """Counters scraped from the server's /metrics and /proc, for deltas over a round."""

    compute_s: float
    batches: float
    batched_images: float
    cpu_s: float | None

    @classmethod
    def read(cls, base: str, pid: int) -> ServerSide:
        text = httpx.get(f"{base}/metrics").text
        values: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name in ("dgserve_compute_seconds_sum", "dgserve_batch_size_count", "dgserve_batch_size_sum"):
                    values[sample.name] = values.get(sample.name, 0.0) + sample.value
        return cls(values.get("dgserve_compute_seconds_sum", 0.0), values.get("dgserve_batch_size_count", 0.0),
                   values.get("dgserve_batch_size_sum", 0.0), process_cpu_s(pid))

    def __sub__(self, other: ServerSide) -> ServerSide:
        cpu = None if self.cpu_s is None or other.cpu_s is None else self.cpu_s - other.cpu_s
        return ServerSide(self.compute_s - other.compute_s, self.batches - other.batches,
                          self.batched_images - other.batched_images, cpu)


def tree_pids(pid: int) -> list[int]:
    """``pid`` and every live descendant (Linux ``/proc``)."""
    pids, todo = [], [pid]
    while todo:
        current = todo.pop()
        try:
            children = [int(c) for t in Path(f"/proc/{current}/task").iterdir()
                        for c in (t / "children").read_text().split()]  # fmt: skip
        except OSError:
            continue
        pids.append(current)
        todo.extend(children)
    return pids


def process_cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of ``pid``'s live process tree (server, model and reader
    processes, or a supervisor's server processes), from /proc; None where there is none."""
    total, found = 0, False
    for p in tree_pids(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total, found = total + int(fields[11]) + int(fields[12]), True  # utime, stime: fields 14, 15
    return total / os.sysconf("SC_CLK_TCK") if found else None


def self_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def percentile(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


# --- the run ---------------------------------------------------------------------------


def one_round(raw_model: RawModel, base: str, port: int, server: subprocess.Popen[bytes],
              requests: dict[str, list[Request]], args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """Raw, then each protocol in turn, over the same number of images."""
    images = sum(r.images for r in next(iter(requests.values())))
    raw = raw_model.images_per_s(max(1, math.ceil(images / args.batch_size)))
    out = {}
    for protocol, batch in requests.items():
        before, cpu_before = ServerSide.read(base, server.pid), self_cpu_s()
        load = asyncio.run(run_load(HOST, port, batch, args.clients))
        loadgen_cpu = self_cpu_s() - cpu_before
        side = ServerSide.read(base, server.pid) - before
        if load.errors:
            raise RuntimeError(f"{protocol}: {len(load.errors)} requests failed, e.g. {load.errors[0]}")
        rate = load.images / load.seconds
        out[protocol] = {
            "raw_images_per_s": raw,
            "server_images_per_s": rate,
            "ratio": rate / raw,
            "p50_ms": percentile(load.latencies_s, 50) * 1e3,
            "p99_ms": percentile(load.latencies_s, 99) * 1e3,
            "mean_batch": side.batched_images / max(1.0, side.batches),
            "raw_ms_per_image": 1e3 / raw,
            "server_compute_ms_per_image": 1e3 * side.compute_s / max(1.0, side.batched_images),
            "server_cores": (side.cpu_s / load.seconds) if side.cpu_s is not None else float("nan"),
            "loadgen_cores": loadgen_cpu / load.seconds,
        }
    return out


def main() -> None:
    args = parse_args()
    with tempfile.TemporaryDirectory(prefix="dgserve-bench-") as tmp_name:
        tmp = Path(tmp_name)
        root = prepare_store(args, tmp)
        print(f"model {args.model!r}, B={args.batch_size}, {args.image_size}px, {args.clients} connections, "
              f"{args.requests} requests x {args.images_per_request} image(s) per round, {args.rounds} rounds, "
              f"{os.cpu_count()} CPU cores, device {args.device}, precision {args.precision}, malloc {args.malloc}, "
              f"memory format {args.memory_format}"
              + (f" ({torch.cuda.get_device_name(args.device)})" if args.device.startswith("cuda") else ""))
        raw_model = RawModel(root, args)
        port = free_port()
        server = start_server(root, tmp / "data", port, args)
        rounds = []
        try:
            base = f"http://{HOST}:{port}"
            wait_ready(base, server)
            protocols = [p.strip() for p in args.protocols.split(",") if p.strip()]
            requests = {p: build_requests(port, args, p) for p in protocols}
            for batch in requests.values():  # warm-up, not measured
                asyncio.run(run_load(HOST, port, batch[: args.clients], args.clients))
            for i in range(args.rounds):
                per_protocol = one_round(raw_model, base, port, server, requests, args)
                rounds.append(per_protocol)
                for protocol, r in per_protocol.items():
                    print(f"round {i + 1} {protocol}: raw {r['raw_images_per_s']:.2f} img/s | server "
                          f"{r['server_images_per_s']:.2f} img/s, p50 {r['p50_ms']:.0f} ms, p99 {r['p99_ms']:.0f} ms, "
                          f"mean batch {r['mean_batch']:.2f} | server/raw {r['ratio']:.3f}")
                    print(f"         compute per image: in the server {r['server_compute_ms_per_image']:.2f} ms, "
                          f"raw {r['raw_ms_per_image']:.2f} ms | server process {r['server_cores']:.2f} cores, "
                          f"load generator {r['loadgen_cores']:.2f} cores", flush=True)
        finally:
            server.terminate()
            try:
                server.wait(timeout=60)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
    summary = {}
    for protocol in rounds[0]:
        ratios = sorted(r[protocol]["ratio"] for r in rounds)
        summary[protocol] = statistics.median(ratios)
        print(f"{protocol}: server/raw = {summary[protocol]:.3f} (median of {len(ratios)} rounds; "
              f"min {ratios[0]:.3f}, max {ratios[-1]:.3f})")
    if "v1" in rounds[0] and "v2" in rounds[0]:
        # Taken side by side within each round, so the machine's drift cancels out.
        same_round = sorted(r["v2"]["server_images_per_s"] / r["v1"]["server_images_per_s"] for r in rounds)
        print(f"v2/v1 = {statistics.median(same_round):.3f} (median of {len(same_round)} rounds; "
              f"min {same_round[0]:.3f}, max {same_round[-1]:.3f})")
    if args.json is not None:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                         "rounds": rounds, "median_ratio": summary}, indent=2))


if __name__ == "__main__":
    main()
