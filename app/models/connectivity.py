"""Plain, serialisable records of the path each image took through a network.

Modules that route (DG-Net stages) or reason over a graph (GloRe units) keep the
tensors of their last forward pass; ``collect_connectivity`` turns those into one
``ImageConnectivity`` per image, built only of lists, numbers and strings so the
server can store and return them as JSON without knowing about torch.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn


def adjacency_digest(matrix: Tensor) -> str:
    """A content digest of a matrix: equal digests mean equal float32 values.

    Over the shape and the float32 bytes, so it names exactly what ``tolist()`` (and
    therefore the JSON) of the float32 matrix holds.
    """
    data = matrix.detach().to(torch.float32).cpu().contiguous()
    digest = hashlib.sha256(repr(tuple(data.shape)).encode())
    digest.update(data.numpy().tobytes())
    return digest.hexdigest()[:32]


@dataclass
class StageConnectivity:
    """One DG-Net stage for one image.

    ``adjacency[target][source]`` is the weight of edge source→target after
    thresholding: closed edges are exactly 0. Node 0 is the stage input, nodes
    1..N the blocks, node N+1 the output node.
    """

    stage: str
    nodes: list[str]
    adjacency: list[list[float]]
    thresholds: list[float | None]
    executed: list[bool]
    open_edges: int
    possible_edges: int

    @property
    def active_edge_fraction(self) -> float:
        return self.open_edges / self.possible_edges if self.possible_edges else 1.0

    @property
    def skipped_nodes(self) -> int:
        return sum(1 for ran in self.executed if not ran)


@dataclass
class GloReUnitConnectivity:
    """One GloRe unit for one image.

    ``adjacency`` is the learned node-interaction matrix A_g (the same for every
    image, named by ``adjacency_digest``); ``projection`` gives, for each location of
    the unit's input feature map, the graph node that location projects to most
    strongly.
    """

    unit: str
    num_nodes: int
    adjacency: list[list[float]]
    projection: list[list[int]]
    # Identifies the adjacency's content (equal digests, equal matrices), so that a
    # store keeps one copy of a graph every image of a model version shares.
    adjacency_digest: str = ""

    @property
    def projection_summary(self) -> dict[str, Any]:
        """How the image's locations spread over the graph nodes, without the full map."""
        counts: dict[int, int] = {}
        for row in self.projection:
            for node in row:
                counts[node] = counts.get(node, 0) + 1
        total = sum(counts.values()) or 1
        top = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:5]
        return {
            "height": len(self.projection),
            "width": len(self.projection[0]) if self.projection else 0,
            "nodes_used": len(counts),
            "top_nodes": [{"node": node, "fraction": n / total} for node, n in top],
        }


@dataclass
class ImageConnectivity:
    stages: list[StageConnectivity] = field(default_factory=list)
    glore_units: list[GloReUnitConnectivity] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able, with the derived figures a client would otherwise recompute.

        The lists are shared with the records, not copied (``dataclasses.asdict`` would
        deep-copy every matrix, per image, on the serving path); the result is meant
        to be serialised, not mutated.
        """
        return {
            "stages": [
                {
                    "stage": s.stage, "nodes": s.nodes, "adjacency": s.adjacency, "thresholds": s.thresholds,
                    "executed": s.executed, "open_edges": s.open_edges, "possible_edges": s.possible_edges,
                    "active_edge_fraction": s.active_edge_fraction, "skipped_nodes": s.skipped_nodes,
                }
                for s in self.stages
            ],
            "glore_units": [
                {
                    "unit": u.unit, "num_nodes": u.num_nodes, "adjacency": u.adjacency,
                    "adjacency_digest": u.adjacency_digest, "projection": u.projection,
                    "projection_summary": u.projection_summary,
                }
                for u in self.glore_units
            ],
        }


@runtime_checkable
class ConnectivitySource(Protocol):
    """A module that recorded connectivity during its last forward pass."""

    def image_connectivity(self, name: str) -> list[StageConnectivity] | list[GloReUnitConnectivity]:
        """One record per image of the last batch, named ``name``."""
        ...


def connectivity_sources(model: nn.Module) -> list[tuple[str, ConnectivitySource]]:
    """The modules of ``model`` that record connectivity, with their qualified names.

    Fixed for a model's lifetime, so a server finds them once: the runtime protocol
    check behind this costs microseconds per module, every batch, for hundreds of
    modules.
    """
    return [(name, module) for name, module in model.named_modules() if isinstance(module, ConnectivitySource)]


def collect_connectivity(
    model: nn.Module, batch_size: int, sources: list[tuple[str, ConnectivitySource]] | None = None
) -> list[ImageConnectivity]:
    """Gather every routing/graph module's record of the last forward, per image.

    ``sources`` is ``connectivity_sources(model)``, when the caller already has it.
    """
    images = [ImageConnectivity() for _ in range(batch_size)]
    for name, module in connectivity_sources(model) if sources is None else sources:
        records = module.image_connectivity(name)
        if len(records) != batch_size:
            raise RuntimeError(
                f"{name} recorded {len(records)} images but the batch had {batch_size}; "
                "was the model called since?"
            )
        for image, record in zip(images, records, strict=True):
            if isinstance(record, StageConnectivity):
                image.stages.append(record)
            else:
                image.glore_units.append(record)
    return images
