"""What one inspection write costs, by records per transaction (issue 13, finding 3).

    .venv/bin/python benchmarks/inspection_write.py [--model shapes-dgnet] [--sizes 1,8,40] [--writes 300]

Answers that wait for their commit make the writer write about one model batch at a
time (8 records at 32 clients on 2 processes); written behind, it writes 20-40 at a
time. This runs the store model on generated input, builds each image's record as
the server does, and times ``SQLiteBackend.write_batch`` alone, in this thread, for
each size: the median wall and CPU time of a write, and the CPU per record. What
the CPU per record of a small write has over a large one's is the part of a write
(the transaction, the rollups' read-modify-write) that smaller transactions pay again.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time
from pathlib import Path

import torch

from dgserve.inspection.backend import StoredRecord
from dgserve.inspection.codec import dumps, encode
from dgserve.inspection.record import InspectionRecord, new_inspection_id
from dgserve.inspection.shared import GraphTextCache
from dgserve.inspection.sqlite import SQLiteBackend
from dgserve.model_store.store import ModelStore
from dgserve.models.connectivity import collect_connectivity

STORE = Path(__file__).resolve().parent.parent / "model_store"
WARM_UP_WRITES = 20


def records(model_name: str, images: int) -> list[tuple[StoredRecord, dict[str, str]]]:
    """``images`` encoded records of ``model_name``'s forward over random input."""
    loaded = ModelStore(STORE).load(model_name)
    height, width = loaded.manifest.preprocessing.input_size
    torch.manual_seed(0)
    with torch.inference_mode():
        loaded.model(torch.randn(images, 3, height, width))
    cache = GraphTextCache(2**26)
    out = []
    for i, image in enumerate(collect_connectivity(loaded.model, images)):
        connectivity = image.to_dict()
        prediction = {"image": {"filename": f"{i}.jpg", "width": width, "height": height},
                      "predictions": [{"label": label, "score": 0.1} for label in (loaded.manifest.labels or [])[:5]],
                      "replica": "bench"}  # fmt: skip
        record = InspectionRecord.new(model=model_name, version=loaded.version, task=loaded.manifest.task,
                                      prediction=prediction, connectivity=connectivity,
                                      connectivity_json=dumps(connectivity))  # fmt: skip
        out.append(encode(record, cache))
    return out


def time_writes(path: Path, pool: list[tuple[StoredRecord, dict[str, str]]], size: int, writes: int) -> list[tuple[float, float]]:
    """(wall s, CPU s) of each timed write of ``size`` fresh records."""
    backend = SQLiteBackend(path)
    backend.open()
    try:
        timed = []
        for n in range(WARM_UP_WRITES + writes):
            batch = [pool[(n * size + i) % len(pool)] for i in range(size)]
            # Fresh ids, as the server's records have: a repeated id is a replace, a dearer write.
            rows = [dataclasses.replace(row, id=new_inspection_id()) for row, _ in batch]
            graphs = {d: t for _, g in batch for d, t in g.items()}
            wall, cpu = time.perf_counter(), time.thread_time()
            backend.write_batch(rows, graphs)
            if n >= WARM_UP_WRITES:
                timed.append((time.perf_counter() - wall, time.thread_time() - cpu))
        if (stored := backend.count([])) != (WARM_UP_WRITES + writes) * size:
            raise SystemExit(f"{stored} records stored of {(WARM_UP_WRITES + writes) * size} written")
        return timed
    finally:
        backend.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="shapes-dgnet")
    parser.add_argument("--sizes", default="1,8,40", help="records per write")
    parser.add_argument("--writes", type=int, default=300, help="timed writes per size")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    pool = records(args.model, 64)
    print(f"{args.model}: SQLiteBackend.write_batch, {args.writes} timed writes per size after {WARM_UP_WRITES}")
    with tempfile.TemporaryDirectory() as tmp:
        for size in sizes:
            timed = time_writes(Path(tmp) / f"{size}.db", pool, size, args.writes)
            wall = statistics.median(t[0] for t in timed) * 1e3
            cpu = statistics.median(t[1] for t in timed) * 1e3
            print(f"{size:4d} records per write: wall {wall:.3f} ms, CPU {cpu:.3f} ms median; "
                  f"CPU per record {cpu / size:.3f} ms")


if __name__ == "__main__":
    main()
