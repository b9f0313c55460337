"""Print DG-Net's parameters and FLOPs beside the paper's Table 1, as a markdown table.

    .venv/bin/python benchmarks/dgnet_table.py

FLOPs are multiply-adds at 224×224, batch 1: torch.utils.flop_counter's conv and
matmul count halved, plus the element-wise work a DG-Net adds (router pooling and
the weighted input sums) counted analytically with every edge open, the most a
DG-Net can cost (see dgserve.models.complexity).
"""

from __future__ import annotations

import torch

from dgserve.models.complexity import measure
from dgserve.models.dgnet.backbones import build_plain
from dgserve.models.registry import create_model

# (params M, MFLOPs) from Table 1: baseline, DG-Net.
PAPER = {
    "dgnet_mobilenet_v2": ((3.51, 299), (3.58, 312)),
    "dgnet_resnet18": ((11.69, 1813), (11.71, 1826)),
    "dgnet_resnet50": ((25.55, 4087), (25.62, 4125)),
    "dgnet_resnet101": ((44.54, 7799), (44.90, 7837)),
    "dgnet_resnext50_32x4d": ((25.02, 4228), (25.09, 4305)),
    "dgnet_regnet_x_600mf": ((6.19, 599), (6.22, 600)),
    "dgnet_regnet_x_1_6gf": ((9.19, 1602), (9.22, 1604)),
}


def main() -> None:
    torch.manual_seed(0)
    print("| Backbone | paper base params / MFLOPs | paper DG-Net params / MFLOPs | ours base params / MFLOPs "
          "| ours DG-Net params / MFLOPs | Δ params vs paper DG-Net | overhead params / FLOPs |")
    print("|---|---|---|---|---|---|---|")
    for arch, ((pb, fb), (pd, fd)) in PAPER.items():
        base = measure(build_plain(arch))
        dg = measure(create_model(arch))
        print(
            f"| {arch} | {pb:.2f} / {fb} | {pd:.2f} / {fd} | {base.params_m:.3f} / {base.mflops:.0f} "
            f"| {dg.params_m:.3f} / {dg.mflops:.0f} | {dg.params_m - pd:+.3f} "
            f"| {100 * (dg.params_m / base.params_m - 1):.2f}% / {100 * (dg.mflops / base.mflops - 1):.2f}% |"
        )


if __name__ == "__main__":
    main()
