"""Parameter and FLOP counts, in the papers' units (millions; FLOPs = multiply-adds).

``torch.utils.flop_counter`` counts convolutions and matrix products (as 2 FLOPs per
multiply-add) but not element-wise work. A DG-Net's own overhead is mostly
element-wise: the global pooling in each router and the weighted sums that aggregate
a node's inputs. Those are added here analytically, for the dense case where every
edge is open (the most a DG-Net can cost); closed edges and skipped nodes only
lower it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from dgserve.models.dgnet.stage import DGStage


@dataclass(frozen=True)
class Complexity:
    params_m: float
    mflops: float  # multiply-adds, in millions


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def measure(model: nn.Module, size: int | tuple[int, int] = 224) -> Complexity:
    """Params and multiply-adds for one image of ``size`` (a side, or ``(height, width)``)."""
    height, width = (size, size) if isinstance(size, int) else size
    model = model.eval()
    stage_outputs: dict[DGStage, tuple[int, ...]] = {}

    def remember(module: nn.Module, _inp: object, out: torch.Tensor) -> None:
        stage_outputs[module] = tuple(out.shape)  # type: ignore[index]

    hooks = [m.register_forward_hook(remember) for m in model.modules() if isinstance(m, DGStage)]
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(torch.randn(1, 3, height, width))
    finally:
        for h in hooks:
            h.remove()
    macs = counter.get_total_flops() / 2
    for stage, shape in stage_outputs.items():
        per_map = 1
        for d in shape[1:]:
            per_map *= d
        # One multiply-add per element for every routed edge, one add per element for
        # every router's global pooling (static routing pools nothing).
        pooling = stage.num_blocks if stage.routing == "dynamic" else 0
        macs += (stage.possible_edges + pooling) * per_map
    return Complexity(count_params(model) / 1e6, macs / 1e6)
