"""How sparse and instance-aware routing is on held-out data, for every task's evaluation.

Each task's ``evaluate`` (top-1, COCOeval mAP, ...) runs under ``torch.no_grad()`` in
eval mode, i.e. exactly the inference path the server takes (closed edges pruned,
skipped blocks not run), and feeds every image's record to ``ConnectivityStats``, so
the edge figures are those a user of the served model gets.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from dgserve.connectivity import ImageConnectivity, StageConnectivity
from dgserve.models.dgnet.stage import DGStage


def has_routing(model: nn.Module) -> bool:
    return any(isinstance(m, DGStage) for m in model.modules())


@dataclass
class ConnectivityStats:
    """Accumulates per-image routing records; ``summary`` gives the card's edge figures."""

    closed_fractions: list[float] = field(default_factory=list)
    patterns: set[tuple[bool, ...]] = field(default_factory=set)
    per_stage_open: dict[str, list[int]] = field(default_factory=lambda: defaultdict(list))
    possible: dict[str, int] = field(default_factory=dict)
    class_sums: dict[int, Tensor] = field(default_factory=dict)
    class_counts: dict[int, int] = field(default_factory=lambda: defaultdict(int))

    def add(self, record: ImageConnectivity, label: int | None = None) -> None:
        stages = record.of(StageConnectivity)
        opened = sum(s.open_edges for s in stages)
        possible = sum(s.possible_edges for s in stages)
        self.closed_fractions.append(1.0 - opened / possible if possible else 0.0)
        weights = torch.cat([_routed(s.adjacency) for s in stages])
        self.patterns.add(tuple((weights > 0).tolist()))
        for s in stages:
            self.per_stage_open[s.stage].append(s.open_edges)
            self.possible[s.stage] = s.possible_edges
        if label is not None:
            self.class_sums[label] = self.class_sums.get(label, torch.zeros_like(weights)) + weights
            self.class_counts[label] += 1

    def summary(self) -> dict[str, Any]:
        n = len(self.closed_fractions)
        out: dict[str, Any] = {
            "images": n,
            "closed_edge_fraction": sum(self.closed_fractions) / n if n else 0.0,
            "distinct_patterns": len(self.patterns),
            "per_stage_mean_open_edges": {
                stage: [sum(v) / len(v), self.possible[stage]] for stage, v in self.per_stage_open.items()
            },
        }
        if self.class_sums:
            means = {c: (s / self.class_counts[c]) for c, s in sorted(self.class_sums.items())}
            stacked = torch.stack(list(means.values()))
            # Largest mean absolute difference between two classes' mean adjacencies:
            # 0 would mean every class is routed identically on average.
            diffs = (stacked[:, None] - stacked[None]).abs().mean(-1)
            out["class_adjacency_max_difference"] = float(diffs.max())
            out["class_mean_edge_weight"] = {int(c): float(m.mean()) for c, m in means.items()}
        return out


def _routed(adjacency: list[list[float]]) -> Tensor:
    """The routed edges of one stage: block i -> later blocks and the output (rows 2.., cols 1..)."""
    adj = torch.tensor(adjacency)
    rows, cols = torch.tril_indices(adj.shape[0] - 2, adj.shape[1] - 2)
    return adj[rows + 2, cols + 1]
