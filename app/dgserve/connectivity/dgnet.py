"""The DG-Net stage kind: each stage's thresholded edge matrix and which blocks ran."""

from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Mapping
from typing import Any, ClassVar

from dgserve.connectivity.base import (
    Aggregate,
    ConnectivityRecord,
    GraphDescription,
    TensorField,
    matrix,
    register_kind,
    value,
)

__all__ = ["StageConnectivity", "StageGraph"]


@dataclass(frozen=True, slots=True)
class StageGraph(GraphDescription):
    kind: ClassVar[str] = "stages"

    name: str
    nodes: list[str]
    possible_edges: int
    # How the stage is wired and routed, so a client tells a random DAG (RandWire's
    # baselines) or static edge weights from the paper's per-image complete DAG.
    routing: str  # "dynamic": a router per block and image; "static": one weight per edge for every image
    wiring: str  # "complete", or a random DAG: "er", "ba", "ws"
    edges: list[list[int]]  # every routed edge as [source, target] node indices (not the fixed input → block 1)


@register_kind
@dataclass(frozen=True, slots=True)
class StageConnectivity(ConnectivityRecord):
    """One DG-Net stage for one image.

    ``adjacency[target][source]`` is the weight of edge source→target after
    thresholding: closed edges are exactly 0. Node 0 is the stage input, nodes
    1..N the blocks, node N+1 the output node.
    """

    kind: ClassVar[str] = "stages"
    derived: ClassVar[tuple[str, ...]] = ("active_edge_fraction", "skipped_nodes")
    Graph: ClassVar[type[GraphDescription]] = StageGraph
    name_field: ClassVar[str] = "stage"
    tensor: ClassVar[TensorField | None] = TensorField("adjacency", "FP32", ndim=2)
    aggregates: ClassVar[tuple[Aggregate, ...]] = (
        Aggregate("adjacency", "edges"),
        Aggregate("executed", "frequency"),
        Aggregate("active_edge_fraction", "mean"),
    )

    stage: str = value("the stage's module name")
    nodes: list[str] = value("node names: input, the blocks, output")
    adjacency: list[list[float]] = matrix(
        "adjacency[target][source] edge weight after thresholding (closed edges 0); "
        "left out with ?connectivity=false"
    )
    thresholds: list[float | None] = value("each node's threshold tau (None for input and output)")
    executed: list[bool] = value("which nodes ran for this image")
    open_edges: int = value("routed edges left open")
    possible_edges: int = value("routed edges the stage's wiring has (all later nodes, in the complete DAG)")

    @classmethod
    def tensor_dims(cls, graph: Mapping[str, Any]) -> tuple[int, ...]:
        n = len(graph["nodes"])
        return (n, n)

    @property
    def active_edge_fraction(self) -> float:
        return self.open_edges / self.possible_edges if self.possible_edges else 1.0

    @property
    def skipped_nodes(self) -> int:
        return sum(1 for ran in self.executed if not ran)
