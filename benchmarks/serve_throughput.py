"""Serving overhead in one run: raw batched model throughput vs the HTTP server's.

(a) raw: ``model(batch)`` in this process under ``torch.inference_mode`` at batch size
    B, on tensors already preprocessed (decoding, preprocessing, connectivity
    collection and JSON are all excluded -- the strictest baseline);
(b) server: a real ``dgserve serve`` (uvicorn) started by this script on 127.0.0.1 with
    a free port, the same model and max_batch_size=B, under N concurrent httpx
    clients each posting one JPEG at a time (the server decodes, preprocesses,
    batches, records connectivity, stores the inspection record and answers JSON).

Prints both rates, p50/p99 latency, the mean batch size the server formed, and
server/raw. Usage::

    python benchmarks/serve_throughput.py --create dgnet_resnet50 --image-size 224 \\
        --batch-size 8 --clients 32 --requests 256

``--create ARCH`` saves a temporary store entry with random weights (throughput does
not depend on the weights); otherwise ``--store``/``--model`` name an existing one.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import torch
from PIL import Image

from dgserve.models.registry import create_model
from dgserve.store import ModelStore
from dgserve.serving.images import decode_image, preprocess_classification
from dgserve.settings import default_model_store
from dgserve.store.manifest import Preprocessing

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--store", type=Path, default=None, help="model store (default: the bundled one; ignored with --create)")
    p.add_argument("--model", default="bench", help="model name in the store")
    p.add_argument("--create", default=None, metavar="ARCH", help="save ARCH with random weights as --model first")
    p.add_argument("--clients", type=int, default=32, help="concurrent HTTP clients")
    p.add_argument("--requests", type=int, default=256, help="measured requests (one image each)")
    p.add_argument("--batch-size", type=int, default=8, help="B: raw batch size and the server's max_batch_size")
    p.add_argument("--image-size", type=int, default=224, help="model input size (square)")
    p.add_argument("--raw-batches", type=int, default=6, help="timed raw batches")
    p.add_argument("--raw-warmup", type=int, default=3, help="untimed raw batches first (allocator, oneDNN caches)")
    p.add_argument("--max-delay-ms", type=float, default=5.0, help="server max_delay_ms")
    p.add_argument("--show-batches", action="store_true", help="print the server's batch-size histogram")
    p.add_argument("--no-connectivity", action="store_true", help="ask the server for ?connectivity=false")
    return p.parse_args()


def prepare_store(args: argparse.Namespace, tmp: Path) -> Path:
    if not args.create:
        return args.store or default_model_store()
    # Always a temporary store: a benchmark never writes into a real one.
    root = tmp / "model_store"
    store = ModelStore(root)
    labels = [f"class_{i}" for i in range(1000)]
    size = [args.image_size, args.image_size]
    store.save(
        create_model(args.create, num_classes=len(labels)), name=args.model, architecture=args.create,
        arch_kwargs={"num_classes": len(labels)}, labels=labels,
        preprocessing={"input_size": size, "mean": MEAN, "std": STD},
        description="random weights, for benchmarking",
    )
    print(f"created {args.create} as {args.model!r} (random weights) in a temporary store")
    return root


def measure_raw(root: Path, args: argparse.Namespace) -> float:
    torch.set_num_threads(os.cpu_count() or 1)  # what the server's single CPU worker gets
    loaded = ModelStore(root).load(args.model)
    if loaded.manifest.task != "classification":
        raise SystemExit(f"{args.model!r} is a {loaded.manifest.task} model; this benchmark drives /classify")
    pre: Preprocessing = loaded.manifest.preprocessing
    # The very images the clients send, preprocessed outside the timing: with DG-Net
    # the input decides which blocks run, so random tensors would time another path.
    images = [decode_image(data, max_pixels=10**9) for data in test_images(args)]
    batch = torch.stack([preprocess_classification(images[i % len(images)], pre) for i in range(args.batch_size)])

    def timed() -> float:
        with torch.inference_mode():
            for _ in range(args.raw_warmup):
                loaded.model(batch)
            started = time.perf_counter()
            for _ in range(args.raw_batches):
                loaded.model(batch)
            return time.perf_counter() - started

    # In a thread of its own, as the server's worker runs it.
    with ThreadPoolExecutor(max_workers=1) as executor:
        took = executor.submit(timed).result()
    return args.batch_size * args.raw_batches / took


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(root: Path, data_dir: Path, port: int, args: argparse.Namespace) -> subprocess.Popen[bytes]:
    batching = {"max_batch_size": args.batch_size, "max_delay_ms": args.max_delay_ms,
                "max_queue_size": max(256, 4 * args.clients)}
    env = {**os.environ, "DGSERVE_MODELS": args.model, "DGSERVE_BATCHING": json.dumps({args.model: batching}),
           "DGSERVE_ACCESS_LOG": "false", "DGSERVE_LOG_LEVEL": "warning"}
    command = [sys.executable, "-c", "from dgserve.cli import main; main()", "serve", "--host", "127.0.0.1",
               "--port", str(port), "--store", str(root), "--data-dir", str(data_dir)]
    return subprocess.Popen(command, env=env)


async def wait_ready(base: str, server: subprocess.Popen[bytes], timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(base_url=base) as client:
        while time.monotonic() < deadline:
            if server.poll() is not None:
                raise RuntimeError(f"server exited with {server.returncode}")
            try:
                if (await client.get("/readyz")).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.2)
    raise TimeoutError("server did not become ready")


def test_images(args: argparse.Namespace) -> list[bytes]:
    return [jpeg(args.image_size, seed) for seed in range(8)]


def jpeg(size: int, seed: int) -> bytes:
    gen = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (size, size, 3), generator=gen, dtype=torch.uint8).numpy()
    buf = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buf, "JPEG", quality=90)
    return buf.getvalue()


async def load_test(base: str, args: argparse.Namespace) -> tuple[float, list[float], float]:
    images = test_images(args)
    url = f"/v1/models/{args.model}/classify" + ("?connectivity=false" if args.no_connectivity else "")
    limits = httpx.Limits(max_connections=args.clients, max_keepalive_connections=args.clients)
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=600) as client:

        async def post(i: int) -> float:
            started = time.perf_counter()
            response = await client.post(url, content=images[i % len(images)], headers={"content-type": "image/jpeg"})
            response.raise_for_status()
            return time.perf_counter() - started

        await asyncio.gather(*(post(i) for i in range(args.clients)))  # warm-up, not measured
        counter = iter(range(args.requests))
        latencies: list[float] = []

        async def client_loop() -> None:
            for i in counter:
                latencies.append(await post(i))

        started = time.perf_counter()
        await asyncio.gather(*(client_loop() for _ in range(args.clients)))
        took = time.perf_counter() - started
        metrics = (await client.get("/metrics")).text
    if args.show_batches:
        print("\n".join(line for line in metrics.splitlines() if line.startswith("dgserve_batch_size_bucket")))
    total = {"sum": 0.0, "count": 0.0}
    for line in metrics.splitlines():
        for key in total:
            if line.startswith(f"dgserve_batch_size_{key}{{"):
                total[key] += float(line.rsplit(" ", 1)[1])
    return args.requests / took, latencies, total["sum"] / max(1.0, total["count"])


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def main() -> None:
    args = parse_args()
    with tempfile.TemporaryDirectory(prefix="dgserve-bench-") as tmp_name:
        tmp = Path(tmp_name)
        root = prepare_store(args, tmp)
        print(f"model {args.model!r}, B={args.batch_size}, {args.image_size}px, {os.cpu_count()} CPU cores, "
              f"device {'cuda' if torch.cuda.is_available() else 'cpu'}")
        # Raw is measured before and after the server run; on a shared machine the
        # spread between the two says how far to trust the ratio.
        raw_before = measure_raw(root, args)
        print(f"(a) raw model(batch) throughput:   {raw_before:8.2f} images/s  (preprocessing excluded)")
        port = free_port()
        server = start_server(root, tmp / "data", port, args)
        try:
            base = f"http://127.0.0.1:{port}"
            asyncio.run(wait_ready(base, server))
            rate, latencies, mean_batch = asyncio.run(load_test(base, args))
        finally:
            server.terminate()
            server.wait(timeout=60)
        raw_after = measure_raw(root, args)
    raw = (raw_before + raw_after) / 2
    print(f"    raw again after the server run: {raw_after:8.2f} images/s  (mean {raw:.2f})")
    print(f"(b) server throughput, {args.clients} clients: {rate:8.2f} images/s  "
          f"(decode + preprocess + connectivity + JSON included)")
    print(f"    latency p50 {percentile(latencies, 50) * 1000:.0f} ms, p99 {percentile(latencies, 99) * 1000:.0f} ms, "
          f"mean batch {mean_batch:.2f}")
    print(f"server/raw = {rate / raw:.3f}")


if __name__ == "__main__":
    main()
