"""The registry and the one factory."""

from __future__ import annotations

import pytest
from torch import nn

from dgserve.models.registry import UnknownArchitectureError, create_model, get_entry, list_models

ALL_MODELS = list_models()


def test_issue_architectures_are_registered() -> None:
    expected = {
        "dgnet_resnet18", "dgnet_resnet50", "dgnet_resnet101", "dgnet_resnext50_32x4d", "dgnet_mobilenet_v2",
        "dgnet_regnet_x_600mf", "dgnet_regnet_x_1_6gf", "glore_resnet50", "glore_resnet50_2_3",
        "glore_resnet101", "glore_resnext101_32x4d", "glore_resnet200", "fasterrcnn_dgnet_resnet50_fpn",
        "fasterrcnn_dgnet_resnet101_fpn", "fasterrcnn_glore_resnet50_fpn",
        "fcn_glore_resnet50", "fcn_glore_resnet101", "fcn_dgnet_resnet50",
    }  # fmt: skip
    assert expected <= set(ALL_MODELS)


@pytest.mark.parametrize("name", ALL_MODELS)
def test_entry_is_described_and_filterable(name: str) -> None:
    entry = get_entry(name)
    assert entry.description
    assert name in list_models(task=entry.task) and name in list_models(family=entry.family)
    assert name.startswith(("dgnet_", "glore_", "fasterrcnn_", "fcn_"))


@pytest.mark.parametrize(
    "name",
    ["dgnet_resnet18_slim", "glore_resnet18_slim", "fasterrcnn_dgnet_resnet18_slim_fpn", "fcn_glore_resnet_slim",
     "fcn_dgnet_resnet_slim"],
)  # fmt: skip
def test_slim_variants_build(name: str) -> None:
    model = create_model(name, num_classes=5)
    assert isinstance(model, nn.Module)
    assert sum(p.numel() for p in model.parameters()) < 5_000_000


def test_unknown_architecture_names_the_known_ones() -> None:
    with pytest.raises(UnknownArchitectureError, match="dgnet_resnet50"):
        create_model("resnet9000")
