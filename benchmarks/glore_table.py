"""Params and FLOPs of the GloRe ResNets next to GloRe Table 2; prints a markdown table.

    .venv/bin/python benchmarks/glore_table.py

Models are built on the meta device: parameter counts and FLOPs depend only on shapes,
so nothing is allocated or computed and the script runs in seconds. FLOPs are those
``torch.utils.flop_counter.FlopCounterMode`` counts for one 224x224 image. It counts a
multiply-add as 2 FLOPs (and skips BatchNorm, ReLU, additions and pooling); the paper
counts multiply-adds, so the table gives the counter's figure and half of it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from torchvision.models.resnet import Bottleneck, ResNet

from dgserve.models.glore import resnet as glore


@dataclass(frozen=True)
class Row:
    network: str
    variant: str
    build: Callable[[], nn.Module]
    paper_gflops: float | None
    paper_params_m: float | None


ROWS: list[Row] = [
    Row("ResNet-50", "baseline (torchvision)", lambda: ResNet(Bottleneck, [3, 4, 6, 3]), 4.0, 25.6),
    Row("ResNet-50", "+3 at Res4 (`glore_resnet50`)", glore.glore_resnet50, 5.2, 30.5),
    Row("ResNet-50", "+2 Res3 +3 Res4 (`glore_resnet50_2_3`)", glore.glore_resnet50_2_3, 6.0, 31.4),
    Row("ResNet-200", "baseline (torchvision layout)", lambda: ResNet(Bottleneck, [3, 24, 36, 3]), 15.0, 64.6),
    Row("ResNet-200", "+3 at Res4 (`glore_resnet200`)", glore.glore_resnet200, 16.2, 69.7),
    Row("ResNet-200", "+2 Res3 +3 Res4 (`glore_resnet200_2_3`)", glore.glore_resnet200_2_3, 16.9, 70.6),
    Row(
        "ResNeXt-101 (32x4d)",
        "baseline (torchvision layout)",
        lambda: ResNet(Bottleneck, [3, 4, 23, 3], groups=32, width_per_group=4),
        8.0,
        44.3,
    ),
    Row("ResNeXt-101 (32x4d)", "+2 Res3 +3 Res4 (`glore_resnext101_32x4d`)", glore.glore_resnext101_32x4d, 9.9, 50.3),
    Row("ResNet-101", "baseline (torchvision) — not in Table 2", lambda: ResNet(Bottleneck, [3, 4, 23, 3]), None, None),
    Row("ResNet-101", "+2 Res3 +3 Res4 (`glore_resnet101`) — not in Table 2", glore.glore_resnet101, None, None),
]  # fmt: skip


def measure(build: Callable[[], nn.Module]) -> tuple[int, int]:
    """(parameters, FlopCounterMode FLOPs at 1x3x224x224)."""
    with torch.device("meta"):
        model = build().eval()
        image = torch.empty(1, 3, 224, 224)
    params = sum(p.numel() for p in model.parameters())
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(image)
    return params, counter.get_total_flops()


def _paper(value: float | None, unit: str = "") -> str:
    return "—" if value is None else f"{value:.1f}{unit}"


def main() -> None:
    print(
        "| Network | Variant | Paper GFLOPs (mult-adds) | Measured G mult-adds "
        "(FlopCounter / 2) | FlopCounter GFLOPs | Paper params (M) | Measured params (M) |"
    )
    print("|---|---|---:|---:|---:|---:|---:|")
    for row in ROWS:
        params, flops = measure(row.build)
        print(
            f"| {row.network} | {row.variant} | {_paper(row.paper_gflops)} | "
            f"{flops / 2e9:.2f} | {flops / 1e9:.2f} | {_paper(row.paper_params_m)} | "
            f"{params / 1e6:.2f} |"
        )


if __name__ == "__main__":
    main()
