"""Figures of the models shipped in model_store/, measured on a fresh held-out draw.

    .venv/bin/python benchmarks/bundled_models.py [--seed 20251] [--images 600]

Prints, per model: its task's held-out figure (top-1 for classifiers, COCOeval mAP@0.5
for detectors, ...), the closed-edge fraction and the number of distinct active-edge
patterns (DG-Net), and the size on disk. It uses each task's own evaluation, on the
generated data the task trains on; tests/test_bundled_models.py checks the same
targets with independent code.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from dgserve.model_store import ModelStore
from dgserve.tasks import get_task
from dgserve.training.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", type=Path, default=ROOT / "model_store")
    parser.add_argument("--seed", type=int, default=20251)
    parser.add_argument("--images", type=int, default=600, help="held-out images (or scenes) per model")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    store = ModelStore(args.store)
    total = 0
    for name in store.names():
        loaded = store.load(name)
        manifest = loaded.manifest
        size = sum(p.stat().st_size for p in loaded.path.iterdir())
        total += size
        started = time.perf_counter()
        task = get_task(manifest.task)
        # A fresh draw: the seed differs from every training and held-out seed the cards name.
        config = TrainConfig(name=name, train_size=0, val_size=args.images, data_seed=args.seed + 1, val_seed=args.seed)
        data = task.datasets(config, manifest.preprocessing)
        batches = torch.utils.data.DataLoader(data.val, batch_size=25, collate_fn=task.collate)
        result = task.evaluate(loaded.model, batches, task.head_size(manifest.labels), progress=False)
        figure = f"{task.headline(result)} on {result['images']} images"
        if "connectivity" in result:
            conn = result["connectivity"]
            figure += f", closed edges {conn['closed_edge_fraction']:.1%}, {conn['distinct_patterns']} patterns"
            if "class_adjacency_max_difference" in conn:
                figure += f", class spread {conn['class_adjacency_max_difference']:.4f}"
        print(f"{name} v{manifest.version} ({manifest.architecture}): {figure}, {size / 2**20:.2f} MiB, "
              f"{time.perf_counter() - started:.1f}s")  # fmt: skip
    print(f"store total: {total / 2**20:.2f} MiB")


if __name__ == "__main__":
    main()
