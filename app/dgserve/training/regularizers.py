"""Training-only penalties on DG-Net routing.

``edge_l1`` makes routing sparse. ``DeadEndGuard`` keeps sparse routing from trapping
images in dead ends.

The trap, which we measured on the bundled DG-Net: a block that runs but whose output
edges are all closed sends nothing on. If it is the last open path of its stage, that
image's whole stage output is zero, and nothing can reopen the path. The edges' STE
gradient is proportional to α, which has collapsed towards 0. A block that did not run
gets no gradient at all through its input edges. In one run without the guard, 10 % of
held-out images had a zero layer2 output, and 35 % of those were classified correctly.

The guard asks every block that runs to keep its strongest output edge at least
``margin`` above its threshold: ``mean relu(τ_k + margin − max_j α_kj)``. The gradient
reaches α directly, not through α·gate, so it can reopen a path. If every executed
block has an open output edge, then starting from block 1 (which always runs) some
path reaches the output node. Edges still close and blocks are still skipped. Only
dead ends are discouraged.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from dgserve.models.dgnet.stage import DGStage

__all__ = ["DeadEndGuard", "edge_l1"]


def edge_l1(model: nn.Module) -> Tensor:
    """Mean gated edge weight over every DG-Net stage of the last training forward.

    Added to the loss (times a coefficient) it encourages sparse connectivity, so that
    thresholds actually close edges (as TopoNet and DG-Net do).
    """
    terms = [g.mean() for m in model.modules() if isinstance(m, DGStage) for g in m.gated_edge_weights()]
    if not terms:
        return torch.zeros(())
    return torch.stack(terms).mean()


class DeadEndGuard:
    """Records each router's output during a training forward; ``penalty()`` then reads them."""

    def __init__(self, model: nn.Module, margin: float = 0.05) -> None:
        self.margin = margin
        self._terms: list[Tensor] = []
        self._handles: list[RemovableHandle] = []
        for module in model.modules():
            if isinstance(module, DGStage):
                for k, router in enumerate(module.routers):
                    self._handles.append(router.register_forward_hook(self._hook(module, k)))

    def _hook(self, stage: DGStage, k: int) -> Any:
        def record(_: nn.Module, __: Any, alpha: Tensor) -> None:
            if torch.is_grad_enabled():
                # alpha: [images this block ran on, output edges].
                self._terms.append(torch.relu(stage.tau[k] + self.margin - alpha.max(dim=1).values).mean())

        return record

    def penalty(self) -> Tensor:
        """Mean over the routers of the last forward; clears the record."""
        terms, self._terms = self._terms, []
        return torch.stack(terms).mean() if terms else torch.zeros(())

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
