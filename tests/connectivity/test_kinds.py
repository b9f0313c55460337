"""Connectivity kinds: each declares its own fields, and everything generic follows from them.

The third kind defined here stands for the next one a contributor adds: registering it
is all it takes for records, ``?connectivity=false``, the store's de-duplication, the
API schema and the graph description to handle it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar

import pytest

from dgserve.api.schemas import record_schema
from dgserve.connectivity import (
    ConnectivityRecord,
    GloReUnitConnectivity,
    GraphDescription,
    ImageConnectivity,
    StageConnectivity,
    describe,
    kind_of,
    kinds,
    register_kind,
    strip_matrices,
)
from dgserve.connectivity import base
from dgserve.connectivity.base import matrix, shared, value
from dgserve.inspection.shared import attach_shared, split_shared


@dataclass(frozen=True, slots=True)
class HeadGraph(GraphDescription):
    kind: ClassVar[str] = "attention_heads"

    name: str
    heads: int


@dataclass(frozen=True, slots=True)
class HeadConnectivity(ConnectivityRecord):
    """A made-up third kind: per-image attention over a head's tokens, and a shared bias."""

    kind: ClassVar[str] = "attention_heads"
    derived: ClassVar[tuple[str, ...]] = ("peak",)
    Graph: ClassVar[type[GraphDescription]] = HeadGraph
    name_field: ClassVar[str] = "head"

    head: str = value("the head's module name")
    attention: list[list[float]] = matrix("per-image attention")
    bias: list[float] = shared("bias_digest", "the same for every image")
    bias_digest: str = value("names the bias")

    @property
    def peak(self) -> float:
        """The strongest attention weight."""
        return max(max(row) for row in self.attention)


@pytest.fixture
def third_kind(monkeypatch: pytest.MonkeyPatch) -> Iterator[type[HeadConnectivity]]:
    # A private copy of the registry, so the kind is gone again after the test.
    monkeypatch.setattr(base, "_KINDS", dict(base._KINDS))
    yield register_kind(HeadConnectivity)


def head(name: str = "h0") -> HeadConnectivity:
    return HeadConnectivity(head=name, attention=[[0.25, 0.75]], bias=[1.0, 2.0], bias_digest="d1")


def stage() -> StageConnectivity:
    return StageConnectivity("layer1", ["input", "0", "output"], [[0.0] * 3, [1.0, 0, 0], [0, 0.4, 0]],
                             [None, 0.1, None], [True, True, True], 1, 1)  # fmt: skip


def test_the_bundled_kinds_declare_their_fields() -> None:
    assert [k.kind for k in kinds()] == ["stages", "glore_units"]
    assert StageConnectivity.matrix_fields == {"adjacency"}
    assert GloReUnitConnectivity.matrix_fields == {"adjacency", "projection"}
    assert GloReUnitConnectivity.shared_fields == {"adjacency": "adjacency_digest"}
    assert kind_of("stages") is StageConnectivity


def test_to_dict_has_every_field_then_the_derived_figures() -> None:
    data = stage().to_dict()
    assert list(data) == [*StageConnectivity.field_names, "active_edge_fraction", "skipped_nodes"]
    assert data["active_edge_fraction"] == 1.0 and data["skipped_nodes"] == 0


def test_an_unregistered_record_is_refused_not_misfiled() -> None:
    with pytest.raises(TypeError, match="HeadConnectivity is not a registered connectivity kind"):
        ImageConnectivity([head()])


def test_a_third_kind_flows_through_every_generic_path(third_kind: type[HeadConnectivity]) -> None:
    image = ImageConnectivity([stage(), head()])
    data = json.loads(json.dumps(image.to_dict()))
    assert list(data) == ["stages", "glore_units", "attention_heads"]
    assert data["attention_heads"][0]["peak"] == 0.75 and image.of(HeadConnectivity) == [head()]

    light = strip_matrices(data)  # ?connectivity=false
    assert set(light["attention_heads"][0]) == {"head", "bias_digest", "peak"}
    assert "adjacency" not in light["stages"][0] and "executed" in light["stages"][0]

    stored, graphs = split_shared(data)  # the inspection store keeps the bias once
    assert graphs == {"d1": [1.0, 2.0]} and stored["attention_heads"][0]["bias_shared"] is True
    assert "bias" not in stored["attention_heads"][0]
    assert attach_shared(json.loads(json.dumps(stored)), graphs.__getitem__) == data

    schema = record_schema(third_kind).model_json_schema()
    assert schema["properties"]["attention"]["anyOf"][1] == {"type": "null"}  # optional: a matrix
    assert set(schema["required"]) == {"head", "bias_digest", "peak"}

    class Source:
        def image_connectivity(self, name: str) -> list[HeadConnectivity]:
            return [head(name)]

        def graph_description(self, name: str) -> HeadGraph:
            return HeadGraph(name=name, heads=4)

    assert describe([("encoder.h0", Source())]) == {
        "stages": [], "glore_units": [], "attention_heads": [{"name": "encoder.h0", "heads": 4}],
    }  # fmt: skip


@dataclass(frozen=True, slots=True)
class Clash(ConnectivityRecord):
    kind: ClassVar[str] = "stages"
    Graph: ClassVar[type[GraphDescription]] = StageConnectivity.Graph
    name_field: ClassVar[str] = "stage"
    stage: str = value()


@dataclass(frozen=True, slots=True)
class WrongGraph(ConnectivityRecord):
    kind: ClassVar[str] = "other"
    Graph: ClassVar[type[GraphDescription]] = HeadGraph
    name_field: ClassVar[str] = "head"
    head: str = value()


@dataclass(frozen=True, slots=True)
class Orphan(ConnectivityRecord):
    kind: ClassVar[str] = "attention_heads"
    Graph: ClassVar[type[GraphDescription]] = HeadGraph
    name_field: ClassVar[str] = "head"
    head: str = value()
    bias: list[float] = shared("nowhere")


@pytest.mark.parametrize(
    ("kind", "error", "message"),
    [(Clash, ValueError, "already registered"), (WrongGraph, TypeError, "must declare kind = 'other'"),
     (Orphan, TypeError, "not a field")],
)  # fmt: skip
def test_registration_checks_the_declarations(
    monkeypatch: pytest.MonkeyPatch, kind: type[ConnectivityRecord], error: type[Exception], message: str
) -> None:
    monkeypatch.setattr(base, "_KINDS", dict(base._KINDS))
    with pytest.raises(error, match=message):
        register_kind(kind)
