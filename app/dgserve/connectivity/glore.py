"""The GloRe unit kind: a unit's interaction graph A_g and where the image projected."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

# pydantic derives the API schema from these, and needs typing_extensions' TypedDict before 3.12.
from typing_extensions import TypedDict

from dgserve.connectivity.base import (
    Aggregate,
    ConnectivityRecord,
    GraphDescription,
    TensorField,
    matrix,
    register_kind,
    shared,
    value,
)

__all__ = ["GloReUnitConnectivity", "GloReUnitGraph", "ProjectedNode", "ProjectionSummary"]


class ProjectedNode(TypedDict):
    node: int
    fraction: float  # share of the feature map's locations projecting most to this node


class ProjectionSummary(TypedDict):
    height: int
    width: int
    nodes_used: int  # graph nodes that some location projects to most strongly
    top_nodes: list[ProjectedNode]


@dataclass(frozen=True, slots=True)
class GloReUnitGraph(GraphDescription):
    kind: ClassVar[str] = "glore_units"

    name: str
    num_nodes: int
    num_states: int
    in_channels: int


@register_kind
@dataclass(frozen=True, slots=True)
class GloReUnitConnectivity(ConnectivityRecord):
    """One GloRe unit for one image.

    ``adjacency`` is the learned node-interaction matrix A_g (the same for every
    image, named by ``adjacency_digest``); ``projection`` gives, for each location of
    the unit's input feature map, the graph node that location projects to most
    strongly.
    """

    kind: ClassVar[str] = "glore_units"
    derived: ClassVar[tuple[str, ...]] = ("projection_summary",)
    Graph: ClassVar[type[GraphDescription]] = GloReUnitGraph
    name_field: ClassVar[str] = "unit"
    # The projection map; its size follows the input's, so images of a batch may differ
    # (detection), and -1 pads the smaller ones.
    tensor: ClassVar[TensorField | None] = TensorField("projection", "INT32", ndim=2, pad=-1)
    aggregates: ClassVar[tuple[Aggregate, ...]] = (Aggregate("projection", "shares", size_field="num_nodes"),)

    unit: str = value("the unit's module name")
    num_nodes: int = value("graph nodes N")
    adjacency: list[list[float]] = shared(
        "adjacency_digest",
        "the learned N x N interaction graph A_g; left out with ?connectivity=false",
    )
    adjacency_digest: str = value(
        "names A_g's content: equal digests, equal matrices (A_g is a weight, so one per unit per version)"
    )
    projection: list[list[int]] = matrix(
        "per feature-map location, the node it projects to most; left out with ?connectivity=false"
    )
    # Last, with a default: records written before video existed read as one frame.
    frames: int = value(
        "frames T of the projection map: 1 for an image; a video unit's T frames of H x W are "
        "stacked top to bottom, so projection is (T·H) x W and frame t is rows t·H to (t+1)·H",
        default=1,
    )

    @property
    def projection_summary(self) -> ProjectionSummary:
        """How the image's locations spread over the graph nodes, without the full map (height: one frame's)."""
        counts: dict[int, int] = {}
        for row in self.projection:
            for node in row:
                counts[node] = counts.get(node, 0) + 1
        total = sum(counts.values()) or 1
        top = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:5]
        return {
            "height": len(self.projection) // max(self.frames, 1),
            "width": len(self.projection[0]) if self.projection else 0,
            "nodes_used": len(counts),
            "top_nodes": [{"node": node, "fraction": n / total} for node, n in top],
        }
