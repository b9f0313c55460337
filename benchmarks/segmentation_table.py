"""Params and FLOPs of the FCN segmenters at 512x1024, beside the GloRe paper's settings; prints a markdown table.

    .venv/bin/python benchmarks/segmentation_table.py

One 512x1024 image (a Cityscapes-shaped crop: the paper evaluates on 2048x1024
Cityscapes). FLOPs are multiply-adds (``dgserve.models.complexity.measure``, which
adds a DG-Net's routing and aggregation work for the dense case). The GloRe and plain
FCNs are measured on the meta device (shapes only, seconds); the DG-Net FCN decides
per image which blocks run, so it is run for real on the CPU (about a minute).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from dgserve.models.complexity import Complexity, count_params, measure
from dgserve.models.registry import create_model

SIZE = (512, 1024)
NUM_CLASSES = 19  # Cityscapes' evaluated classes


@dataclass(frozen=True)
class Row:
    arch: str
    kwargs: dict[str, object]
    setting: str
    paper: str


ROWS = [
    Row("fcn_glore_resnet50", {"num_units": 0}, "FCN, ResNet-50, OS 8, multi-grid (1, 2, 4)", "75.79 → 76.45 (multi-grid) mIoU"),
    Row("fcn_glore_resnet50", {}, "+1 GloRe unit before the classifier", "78.25 mIoU (+2.46)"),
    Row("fcn_glore_resnet50", {"num_units": 2}, "+2 GloRe units", "77.84 mIoU (+2.05)"),
    Row("fcn_glore_resnet101", {}, "FCN, ResNet-101, OS 8, multi-grid, +1 GloRe unit", "Table 4 (test set): 80.9 mIoU"),
    Row("fcn_dgnet_resnet50", {}, "FCN on DG-Net ResNet-50, OS 8, multi-grid (all edges open)", "not in the papers"),
    Row("fcn_glore_resnet_slim", {"num_classes": 9}, "bundled `shapes-segmenter`'s architecture (w=8), at 96x96", "—"),
]


def on_meta(model_fn: nn.Module, size: tuple[int, int]) -> Complexity:
    with FlopCounterMode(display=False) as counter:
        model_fn(torch.empty(1, 3, *size, device="meta"))
    return Complexity(count_params(model_fn) / 1e6, counter.get_total_flops() / 2 / 1e6)


def complexity(row: Row) -> tuple[Complexity, tuple[int, int]]:
    kwargs = {"num_classes": NUM_CLASSES, **row.kwargs}
    size = (96, 96) if row.arch.endswith("_slim") else SIZE
    if row.arch.startswith("fcn_dgnet"):
        torch.manual_seed(0)
        return measure(create_model(row.arch, **kwargs), size), size
    with torch.device("meta"):
        model = create_model(row.arch, **kwargs).eval()
    return on_meta(model, size), size


def main() -> None:
    torch.set_num_threads(max(1, torch.get_num_threads()))
    print("| Architecture | Setting | Input | Params (M) | GFLOPs (multiply-adds) | Paper (Cityscapes val) |")
    print("|---|---|---|---|---|---|")
    for row in ROWS:
        measured, (h, w) = complexity(row)
        print(f"| `{row.arch}` | {row.setting} | {h}x{w} | {measured.params_m:.1f} | {measured.mflops / 1e3:.4g} | "
              f"{row.paper} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
