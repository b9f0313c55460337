"""Figures of the models shipped in model_store/, measured on a fresh held-out draw.

    .venv/bin/python benchmarks/bundled_models.py [--seed 20251] [--images 600] [--scenes 150]

Prints, per model: held-out top-1 (classifiers) or COCOeval mAP@0.5 (detector), the
closed-edge fraction and the number of distinct active-edge patterns (DG-Net), and
the size on disk. It uses dgserve.training's evaluation code; tests/test_bundled_models.py
checks the same targets with independent code.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from dgserve.data.datasets import ShapesClassification, ShapesDetection
from dgserve.serving.images import preprocess_classification
from dgserve.store import ModelStore
from dgserve.training.data import collate_detection
from dgserve.training.evaluate import evaluate_classification, evaluate_detection

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", type=Path, default=ROOT / "model_store")
    parser.add_argument("--seed", type=int, default=20251)
    parser.add_argument("--images", type=int, default=600)
    parser.add_argument("--scenes", type=int, default=150)
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
        if manifest.task == "classification":
            data = ShapesClassification(args.images, args.seed, manifest.preprocessing.input_size[0],
                                        transform=lambda img: preprocess_classification(img, manifest.preprocessing))  # fmt: skip
            batches = torch.utils.data.DataLoader(data, batch_size=50)
            result = evaluate_classification(loaded.model, batches, len(manifest.labels), progress=False)
            figure = f"top-1 {result['top1']:.4f} on {result['images']} images"
        else:
            data = ShapesDetection(args.scenes, args.seed, manifest.preprocessing.input_size[0])
            batches = torch.utils.data.DataLoader(data, batch_size=10, collate_fn=collate_detection)
            result = evaluate_detection(loaded.model, batches, len(manifest.labels) + 1, progress=False)
            figure = f"mAP@0.5 {result['mAP50']:.4f} (mAP {result['mAP']:.4f}) on {result['images']} scenes"
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
