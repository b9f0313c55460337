"""Bytes an inspection record costs on disk, with shared graphs kept once.

Runs ARCH (random weights) on a batch, stores each image's record N times over in a
fresh SQLite inspection store, and prints the record's JSON size, the stored bytes per
record, and the shared graphs' bytes (stored once). Usage::

    python benchmarks/inspection_storage.py --arch glore_resnet50 --image-size 224 --records 100
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sqlite3
import tempfile
import time
import zlib
from contextlib import closing
from pathlib import Path

import torch

from dgserve.inspection import InspectionRecord, SQLiteInspectionStore
from dgserve.models.connectivity import collect_connectivity
from dgserve.models.registry import create_model


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="glore_resnet50")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch", type=int, default=2, help="images per forward")
    p.add_argument("--records", type=int, default=100, help="records stored")
    return p.parse_args()


async def store_all(path: Path, records: list[InspectionRecord]) -> float:
    async with SQLiteInspectionStore(path) as store:
        started = time.perf_counter()
        for record in records:
            await store.put(record)
        await store.flush()
        took = time.perf_counter() - started
        for record in records[:3]:
            if (await store.get(record.id)).connectivity != record.connectivity:
                raise SystemExit(f"record {record.id} did not read back as stored")
    return took


def main() -> None:
    args = parse_args()
    torch.manual_seed(0)
    model = create_model(args.arch, num_classes=1000).eval()
    with torch.inference_mode():
        model(torch.randn(args.batch, 3, args.image_size, args.image_size))
    connectivity = [r.to_dict() for r in collect_connectivity(model, args.batch)]
    records = [
        InspectionRecord.new(model=args.arch, version=1, task="classification", prediction={},
                             connectivity=connectivity[i % len(connectivity)])
        for i in range(args.records)
    ]
    text = json.dumps(connectivity[0], separators=(",", ":"))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "inspections.db"
        took = asyncio.run(store_all(path, records))
        with closing(sqlite3.connect(path)) as conn:
            blobs = [len(b) for (b,) in conn.execute("SELECT connectivity FROM inspections")]
            graphs = [len(b) for (b,) in conn.execute("SELECT body FROM graphs")]
    print(f"{args.arch}, {args.image_size}px: one record's connectivity is {len(text):,} bytes of JSON "
          f"({len(zlib.compress(text.encode(), 1)):,} compressed whole)")
    print(f"stored: {sum(blobs) / len(blobs):,.0f} bytes per record, plus {len(graphs)} shared graph(s) "
          f"of {sum(graphs):,} bytes kept once; {args.records} puts + flush took {took:.2f} s")


if __name__ == "__main__":
    main()
