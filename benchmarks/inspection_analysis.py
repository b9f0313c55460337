"""Connectivity summaries and Parquet exports over a million stored inspection records.

Runs the bundled shapes-dgnet on ``--images`` generated images (each of the eight
classes, varied scenes), makes ``--records`` records from their real connectivity and
predictions, spread evenly over ``--days`` days with tags ``truth`` (the image's true
class), ``split`` (train/val) and ``camera`` (0-3), and writes them straight into a fresh
store through the backend's ``write_batch`` (so rollups are kept as the server keeps
them; no HTTP). Then it times, over ``--rounds`` rounds each, with min/median/max:

* summaries: the whole window; a filtered one (``split:val``, one label, a window of
  two days that starts and ends mid-hour); grouped by ``tag:truth`` and by label;
* exports: all records as Parquet (records/s, and memory: RSS before, the peak while
  exporting, and pyarrow's peak allocation), and the filtered selection;
* the same whole export as a client gets it: ``GET /v1/inspections/export?format=parquet``
  from a real ``dgserve serve`` on the filled store (its reader process, the pipe, HTTP),
  ``--http-rounds`` times, with the server's peak RSS. ``--http-rounds 0`` skips it.

Usage (a benchmark: run it niced; the fill takes minutes)::

    nice python benchmarks/inspection_analysis.py                    # SQLite, 1,000,000 records
    nice python benchmarks/inspection_analysis.py --url postgresql://user@host/db --records 100000
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pyarrow as pa
import torch

from dgserve.analysis import export
from dgserve.data.scenes import render_classification
from dgserve.imaging import preprocess
from dgserve.inspection import InspectionRecord, InspectionStore, open_inspection_store
from dgserve.inspection.backend import Filters, StoredRecord
from dgserve.inspection.codec import encode
from dgserve.inspection.record import to_us
from dgserve.inspection.shared import GraphTextCache
from dgserve.model_store import ModelStore
from dgserve.models.connectivity import collect_connectivity
from serve_throughput import HOST, free_port, tree_pids, wait_ready  # this folder: run as a script

ROOT = Path(__file__).resolve().parents[1]
MODEL = "shapes-dgnet"
T0 = datetime(2026, 1, 5, tzinfo=UTC)
SEED = 4242  # not a training or validation seed of the bundled models


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--records", type=int, default=1_000_000)
    p.add_argument("--images", type=int, default=4096, help="distinct images run through the model")
    p.add_argument("--days", type=float, default=7.0, help="the records' time span")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds per summary")
    p.add_argument("--export-rounds", type=int, default=2)
    p.add_argument("--url", default=None, help="an inspection store URL (default: a fresh SQLite file)")
    p.add_argument("--batch", type=int, default=2000, help="records per write transaction")
    p.add_argument("--http-rounds", type=int, default=2, help="whole exports through a real server (0: none)")
    return p.parse_args()


def templates(images: int) -> list[tuple[InspectionRecord, str]]:
    """Real records of ``images`` generated images: (record without tags, true class)."""
    torch.set_num_threads(1)
    loaded = ModelStore(ROOT / "model_store").load(MODEL)
    labels = loaded.manifest.labels
    out: list[tuple[InspectionRecord, str]] = []
    for start in range(0, images, 256):
        rendered = [render_classification(SEED, i, 64) for i in range(start, min(start + 256, images))]
        x = torch.stack([preprocess(img, loaded.manifest.preprocessing) for img, _ in rendered])
        with torch.no_grad():
            probs = loaded.model(x).softmax(1)
        top = probs.topk(5, dim=1)
        for i, record in enumerate(collect_connectivity(loaded.model, len(rendered))):
            predictions = [{"label": labels[c], "index": c, "score": s}
                           for s, c in zip(top.values[i].tolist(), top.indices[i].tolist(), strict=True)]  # fmt: skip
            rec = InspectionRecord.new(model=MODEL, version=1, task="classification", created_at=T0,
                                       prediction={"image": {"part": None, "width": 64, "height": 64},
                                                   "predictions": predictions, "replica": "bench"},
                                       connectivity=record.to_dict())  # fmt: skip
            out.append((rec, labels[rendered[i][1]]))
    return out


def rows(args: argparse.Namespace, bases: list[tuple[InspectionRecord, str]]) -> Any:
    """Batches of stored rows: each template's encoding reused, with its own id, time and tags."""
    cache = GraphTextCache(2**20)
    encoded = []
    for record, truth in bases:
        row, _ = encode(record, cache)
        encoded.append((row, truth))
    span_us = int(args.days * 86_400e6)
    t0 = to_us(T0, "T0")
    batch: list[StoredRecord] = []
    for n in range(args.records):
        row, truth = encoded[(n * 7919) % len(encoded)]  # a stride: neighbours in time differ
        tags = json.dumps({"camera": str(n % 4), "split": "val" if n % 5 == 0 else "train", "truth": truth},
                          separators=(",", ":"))  # fmt: skip
        # Ids in time order like the server's, made cheaply: minting a million random ids
        # would time the benchmark, not the store.
        batch.append(StoredRecord(f"B{n:025d}", MODEL, 1, "classification", t0 + n * span_us // args.records,
                                  row.prediction, row.connectivity, tags, row.label, row.score, row.layout,
                                  row.features))  # fmt: skip
        if len(batch) == args.batch:
            yield batch
            batch = []
    if batch:
        yield batch


def rss_mb(pid: int | str = "self") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def figures(times: list[float]) -> str:
    return f"min {min(times):.3f} s  median {statistics.median(times):.3f} s  max {max(times):.3f} s"


async def timed(rounds: int, call: Callable[[], Awaitable[Any]]) -> tuple[list[float], Any]:
    times, result = [], None
    for _ in range(rounds):
        started = time.perf_counter()
        result = await call()
        times.append(time.perf_counter() - started)
    return times, result


def export_all(store: InspectionStore, filters: Filters) -> tuple[int, int, float, float]:
    """(records, bytes, peak RSS in MB while exporting, pyarrow's peak MB) of one export."""
    plan = export.plan(store.backend.layouts(filters))
    pool = pa.default_memory_pool()
    peak_rss, count, size = rss_mb(), 0, 0
    pages = store.analysis_pages(filters, page_size=4096, include_connectivity=plan.needs_connectivity)

    def counted() -> Any:
        nonlocal count, peak_rss
        for page in pages:
            count += len(page)
            peak_rss = max(peak_rss, rss_mb())
            yield page

    for chunk in export.parquet_chunks(plan, counted()):
        size += len(chunk)
    return count, size, peak_rss, pool.max_memory() / 2**20


def tree_rss_mb(pid: int) -> float:
    """RSS of a process and its children (the server and its reader processes)."""
    total = 0.0
    for p in tree_pids(pid):
        with contextlib.suppress(OSError):  # gone meanwhile
            total += rss_mb(p)
    return total


def http_exports(url: str, records: int, rounds: int, workdir: Path) -> None:
    """Time the whole export through ``dgserve serve`` on the filled store, as a client reads it."""
    import pyarrow.parquet as pq

    port = free_port()
    # The records are dated from T0, long past the default retention: keep them all.
    env = {**os.environ, "DGSERVE_MODELS": MODEL, "DGSERVE_INSPECTION_URL": url, "DGSERVE_ACCESS_LOG": "false",
           "DGSERVE_LOG_LEVEL": "warning", "DGSERVE_GRPC_PORT": "off",
           "DGSERVE_INSPECTION_MAX_AGE_S": str(20 * 365 * 86400),
           "DGSERVE_INSPECTION_MAX_RECORDS": str(max(records, 1_000_000))}  # fmt: skip
    command = [sys.executable, "-c", "from dgserve.cli import main; main()", "serve", "--host", HOST,
               "--port", str(port), "--store", str(ROOT / "model_store"), "--data-dir", str(workdir)]  # fmt: skip
    server = subprocess.Popen(command, env=env, start_new_session=True)
    out = workdir / "export.parquet"
    try:
        base = f"http://{HOST}:{port}"
        wait_ready(base, server, timeout=300)
        with httpx.Client(base_url=base, timeout=600) as client:
            rates = []
            for _ in range(rounds):
                before, peak, next_sample = tree_rss_mb(server.pid), 0.0, 0.0
                began = time.perf_counter()
                params = {"format": "parquet", "model": MODEL}
                with client.stream("GET", "/v1/inspections/export", params=params) as r, out.open("wb") as f:
                    if r.status_code != 200:
                        raise RuntimeError(f"export: {r.status_code} {r.read()[:200]!r}")
                    for chunk in r.iter_raw():
                        f.write(chunk)
                        if time.perf_counter() >= next_sample:  # sampled: /proc reads are not free
                            peak, next_sample = max(peak, tree_rss_mb(server.pid)), time.perf_counter() + 0.2
                seconds = time.perf_counter() - began
                count = pq.ParquetFile(out).metadata.num_rows
                if count != records:
                    raise RuntimeError(f"the export over HTTP has {count:,} records, not {records:,}")
                rates.append(count / seconds)
                print(f"export over HTTP: {count:,} records, {out.stat().st_size / 2**20:.1f} MiB Parquet in "
                      f"{seconds:.2f} s ({count / seconds:,.0f} records/s); server and readers RSS {before:.0f} MB "
                      f"before, {peak:.0f} MB peak", flush=True)  # fmt: skip
            print(f"export over HTTP records/s: min {min(rates):,.0f}  median {statistics.median(rates):,.0f}  "
                  f"max {max(rates):,.0f}")  # fmt: skip
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)


async def main() -> None:
    args = parse_args()
    tmp = tempfile.TemporaryDirectory(prefix="dgserve-analysis-")
    url = args.url or str(Path(tmp.name) / "inspections.db")
    started = time.perf_counter()
    bases = templates(args.images)
    print(f"{len(bases)} images through {MODEL} in {time.perf_counter() - started:.1f} s")
    store = open_inspection_store(url)
    await store.start()
    try:
        started = time.perf_counter()
        for batch in rows(args, bases):
            await asyncio.to_thread(store.backend.write_batch, batch, {})
        took = time.perf_counter() - started
        print(f"stored {args.records:,} records in {took:.1f} s ({args.records / took:,.0f} records/s, rollups included)")

        since = T0 + timedelta(days=2, minutes=17, seconds=3)
        label = bases[0][0].prediction["predictions"][0]["label"]
        filtered = Filters(model=MODEL, tags=(("split", "val"),), label=label, since_us=to_us(since, "since"),
                           until_us=to_us(since + timedelta(days=2, minutes=31), "until"))  # fmt: skip
        cases: list[tuple[str, Filters, str | None]] = [
            ("whole window", Filters(model=MODEL), None),
            (f"filtered (split:val, label {label}, 2 days mid-hour)", filtered, None),
            ("whole window, group_by=tag:truth", Filters(model=MODEL), "tag:truth"),
            ("whole window, group_by=label", Filters(model=MODEL), "label"),
        ]
        for name, filters, group_by in cases:
            times, summary = await timed(args.rounds, lambda f=filters, g=group_by: store.summary(f, group_by=g))
            print(f"summary {name}: {summary['count']:,} records, {len(summary['groups'])} groups; {figures(times)}")

        for name, filters in (("all records", Filters(model=MODEL)), ("filtered", filtered)):
            rounds = args.export_rounds if name == "all records" else args.rounds
            rates = []
            for _ in range(rounds):
                before = rss_mb()
                began = time.perf_counter()
                count, size, peak, arrow_peak = await asyncio.to_thread(export_all, store, filters)
                seconds = time.perf_counter() - began
                rates.append(count / seconds)
                print(f"export {name}: {count:,} records, {size / 2**20:.1f} MiB Parquet in {seconds:.2f} s "
                      f"({count / seconds:,.0f} records/s); RSS {before:.0f} MB before, {peak:.0f} MB peak, "
                      f"{rss_mb():.0f} MB after; pyarrow peak {arrow_peak:.0f} MB")  # fmt: skip
            print(f"export {name} records/s: min {min(rates):,.0f}  median {statistics.median(rates):,.0f}  "
                  f"max {max(rates):,.0f}")  # fmt: skip
    finally:
        await store.close()
    try:
        if args.http_rounds > 0:
            http_exports(url, args.records, args.http_rounds, Path(tmp.name))
    finally:
        tmp.cleanup()


if __name__ == "__main__":
    asyncio.run(main())
