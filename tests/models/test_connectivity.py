"""The per-image connectivity records: what is collected, and their JSON form."""

from __future__ import annotations

import json
from dataclasses import fields

import pytest
import torch

from dgserve.connectivity import GloReUnitConnectivity, StageConnectivity
from dgserve.models.connectivity import collect_connectivity, connectivity_sources
from dgserve.models.registry import create_model


def _after_one_forward(arch: str, batch: int) -> torch.nn.Module:
    torch.manual_seed(0)
    model = create_model(arch, num_classes=4).eval()
    with torch.inference_mode():
        model(torch.randn(batch, 3, 64, 64))
    return model


@pytest.fixture(scope="module")
def dgnet() -> torch.nn.Module:
    return _after_one_forward("dgnet_resnet18_slim", 3)


@pytest.fixture(scope="module")
def glore() -> torch.nn.Module:
    return _after_one_forward("glore_resnet18_slim", 2)


def test_sources_are_the_routing_and_graph_modules(dgnet: torch.nn.Module, glore: torch.nn.Module) -> None:
    stages = [name for name, _ in connectivity_sources(dgnet)]
    assert stages == ["layer1", "layer2", "layer3", "layer4"]
    assert [(name, type(m).__name__) for name, m in connectivity_sources(glore)] == [
        ("layer2.units.0", "GloReUnit2d"), ("layer3.units.0", "GloReUnit2d")
    ]


def test_precomputed_sources_give_the_same_records(dgnet: torch.nn.Module) -> None:
    fresh = collect_connectivity(dgnet, 3)
    cached = collect_connectivity(dgnet, 3, connectivity_sources(dgnet))
    assert [r.to_dict() for r in fresh] == [r.to_dict() for r in cached]


def test_records_differ_per_image(dgnet: torch.nn.Module) -> None:
    records = collect_connectivity(dgnet, 3)
    # Each image has its own matrix object: one image's record never aliases another's.
    matrices = [r["stages"][0].adjacency for r in records]
    assert len({id(m) for m in matrices}) == 3
    assert all(len(m) == len(records[0]["stages"][0].nodes) for m in matrices)


@pytest.mark.parametrize("which", ["dgnet", "glore"])
def test_to_dict_carries_every_field_and_the_derived_figures(which: str, request: pytest.FixtureRequest) -> None:
    model = request.getfixturevalue(which)
    batch = 3 if which == "dgnet" else 2
    record = collect_connectivity(model, batch)[0]
    data = json.loads(json.dumps(record.to_dict()))
    for stage, raw in zip(data["stages"], record["stages"], strict=True):
        assert {f.name for f in fields(StageConnectivity)} <= stage.keys()
        assert stage["adjacency"] == raw.adjacency
        assert stage["active_edge_fraction"] == raw.active_edge_fraction
        assert stage["skipped_nodes"] == raw.skipped_nodes
    for unit, raw_unit in zip(data["glore_units"], record["glore_units"], strict=True):
        assert {f.name for f in fields(GloReUnitConnectivity)} <= unit.keys()
        assert unit["projection_summary"] == raw_unit.projection_summary
    assert data["stages"] or data["glore_units"]


def test_a_stale_batch_size_is_refused(dgnet: torch.nn.Module) -> None:
    with pytest.raises(RuntimeError, match="recorded 3 images but the batch had 2"):
        collect_connectivity(dgnet, 2)
