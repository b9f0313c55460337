"""Routers and thresholds: how a DG-Net node decides, per image, which output edges open.

A router is global average pooling, one fully connected layer and a sigmoid (paper,
eq. 4). Each node also owns a learnable threshold τ; an edge whose weight α falls
below its node's τ is closed, i.e. exactly 0 (eq. 5).

Training τ: the hard step ``α ≥ τ`` has no useful gradient, so we use a
straight-through estimator. The forward pass always uses the hard gate, so training
and inference close exactly the same edges; the backward pass uses the gradient of a
sigmoid surrogate ``σ((α − τ) / T)``, which reaches both the router (through α) and
τ. A sparsity penalty on the gated weights (``training.regularizers.edge_l1``) pushes τ up and α down;
the task loss pushes back where an edge matters.

Static routing (the α rows of the paper's Table 6, its ablation baseline): a
``StaticRouter`` holds one learnable logit per edge instead of GAP → FC, so every
image gets the same α. Thresholds, the STE and closed edges work unchanged.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
from torch import Tensor, nn

# Width of the surrogate's soft step. Small enough that it only acts near the
# threshold, large enough that edges a little above or below τ still feel a gradient.
DEFAULT_TEMPERATURE = 0.1

# Router logit used to pin an edge fully open or shut (chain wiring). sigmoid(±30)
# rounds to exactly 1.0 / ~1e-13 in float32, so a pinned chain reproduces the static
# network bit for bit.
PINNED_LOGIT = 30.0

RoutingKind = Literal["dynamic", "static"]
ROUTING_KINDS: tuple[str, ...] = get_args(RoutingKind)


class Router(nn.Module):
    """GAP → FC → sigmoid: one weight in [0, 1) per output edge of a node, per image."""

    def __init__(self, in_channels: int, num_edges: int) -> None:
        super().__init__()
        self.fc = nn.Linear(in_channels, num_edges)

    def forward(self, x: Tensor) -> Tensor:
        pooled = x.mean(dim=tuple(range(2, x.dim())))
        return torch.sigmoid(self.fc(pooled))

    @property
    def num_edges(self) -> int:
        return self.fc.out_features

    @torch.no_grad()
    def pin(self, open_edges: Tensor) -> None:
        """Make the router ignore its input and open exactly ``open_edges`` (bool, one per edge)."""
        self.fc.weight.zero_()
        self.fc.bias.copy_(torch.where(open_edges, PINNED_LOGIT, -PINNED_LOGIT))


class StaticRouter(nn.Module):
    """sigmoid(one learnable logit per edge): the same α for every image, whatever its features.

    The sigmoid keeps α in the dynamic router's range, so τ (initialised for that range)
    and the dead-end guard mean the same thing under both. Logits start at 0 (α = 0.5,
    every edge open at the default τ), as a fresh dynamic router's outputs start near 0.5.
    """

    def __init__(self, num_edges: int) -> None:
        super().__init__()
        self.logit = nn.Parameter(torch.zeros(num_edges))

    def forward(self, x: Tensor) -> Tensor:
        return torch.sigmoid(self.logit).expand(x.shape[0], -1)

    @property
    def num_edges(self) -> int:
        return int(self.logit.shape[0])

    @torch.no_grad()
    def pin(self, open_edges: Tensor) -> None:
        self.logit.copy_(torch.where(open_edges, PINNED_LOGIT, -PINNED_LOGIT))


def make_router(routing: str, in_channels: int, num_edges: int) -> Router | StaticRouter:
    if routing == "dynamic":
        return Router(in_channels, num_edges)
    if routing == "static":
        return StaticRouter(num_edges)
    raise ValueError(f"routing must be one of {', '.join(ROUTING_KINDS)}, got {routing!r}")


def threshold_edges(alpha: Tensor, tau: Tensor, temperature: float = DEFAULT_TEMPERATURE) -> Tensor:
    """Close edges with ``alpha < tau`` (exactly zero) with a straight-through gradient."""
    if not torch.is_grad_enabled() or not (alpha.requires_grad or tau.requires_grad):
        # The same values as alpha * hard (α ≥ 0), in two ops instead of three.
        return alpha.masked_fill(alpha < tau, 0.0)
    hard = (alpha >= tau).to(alpha.dtype)
    soft = torch.sigmoid((alpha - tau) / temperature)
    # hard + (soft - soft.detach()) is exactly `hard` in the forward pass (the bracket
    # is exactly 0.0), so closed edges stay exactly 0 while training.
    return alpha * (hard + (soft - soft.detach()))
