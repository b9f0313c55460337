"""Static connectivity (DG-Net Table 6, α rows): one learned weight per edge, the same for every image."""

from __future__ import annotations

import pytest
import torch

from dgserve.models.connectivity import collect_connectivity, describe_graph
from dgserve.models.dgnet import Router, StaticRouter, dg_stages
from dgserve.models.registry import create_model, get_entry, list_models
from dgserve.training.regularizers import edge_l1

# Every DG-Net classifier and detector builder takes routing= and wiring=.
CLASSIFIERS = list_models(family="dgnet", task="classification")
DETECTORS = list_models(family="dgnet", task="detection")


def varied_images(n: int, size: int = 32) -> torch.Tensor:
    """Images of different brightness and contrast: a dynamic router would route them differently."""
    gen = torch.Generator().manual_seed(0)
    contrast = torch.linspace(0.2, 3.0, n).view(n, 1, 1, 1)
    return torch.randn(n, 3, size, size, generator=gen) * contrast + torch.linspace(-2, 2, n).view(n, 1, 1, 1)


def spread_static_weights(model: torch.nn.Module, tau: float = 0.5) -> None:
    """Logits on both sides of τ, so some edges close (for every image alike)."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, stage in dg_stages(model):
            for router in stage.routers:
                router.logit.copy_(torch.randn(router.logit.shape, generator=gen) * 2)
            stage.tau.fill_(tau)


@pytest.mark.parametrize("name", CLASSIFIERS)
def test_static_routing_gives_every_image_the_same_matrix(name: str) -> None:
    torch.manual_seed(0)
    model = create_model(name, num_classes=3, routing="static").eval()
    routers = [m for m in model.modules() if isinstance(m, Router | StaticRouter)]
    assert routers and all(isinstance(r, StaticRouter) for r in routers)
    spread_static_weights(model)
    with torch.no_grad():
        model(varied_images(4))
    records = collect_connectivity(model, 4)
    for stage_records in zip(*(r["stages"] for r in records), strict=True):
        first = stage_records[0]
        assert all(s.adjacency == first.adjacency and s.executed == first.executed for s in stage_records)
        assert len(first.adjacency) == len(first.nodes)  # the same record shape as dynamic routing
    closed = [s.open_edges < s.possible_edges for s in records[0]["stages"]]
    assert any(closed), "τ closed no edge; the check above would be weaker"
    assert {g["routing"] for g in describe_graph(model)["stages"]} == {"static"}


def test_static_weights_and_thresholds_learn() -> None:
    torch.manual_seed(0)
    model = create_model("dgnet_resnet18_slim", num_classes=4, routing="static", width=8).train()
    loss = torch.nn.functional.cross_entropy(model(varied_images(4)), torch.tensor([0, 1, 2, 3]))
    (loss + 0.1 * edge_l1(model)).backward()
    for name, stage in dg_stages(model):
        assert stage.tau.grad is not None and bool((stage.tau.grad != 0).any()), name
        for router in stage.routers:
            assert router.logit.grad is not None and bool((router.logit.grad != 0).all()), name


def test_static_closed_edge_is_closed_for_every_image_and_skips_the_block() -> None:
    model = create_model("dgnet_resnet18_slim", num_classes=3, routing="static", width=8).eval()
    _, layer2 = dg_stages(model)[1]
    with torch.no_grad():
        # layer2 has blocks 1, 2: shut block 1 → block 2, keep block 1 → output.
        layer2.routers[0].pin(torch.tensor([False, True]))
        model(varied_images(3))
    for record in collect_connectivity(model, 3):
        stage = record["stages"][1]
        assert stage.adjacency[2][1] == 0.0 and stage.adjacency[3][1] == 1.0
        assert stage.executed == [True, True, False, True]


@pytest.mark.parametrize("name", DETECTORS)
def test_detector_backbones_take_routing_and_wiring(name: str) -> None:
    assert get_entry(name).family == "dgnet"
    model = create_model(name, num_classes=3, routing="static", wiring="ba", wiring_seed=1)
    stages = describe_graph(model)["stages"]
    assert stages and {(g["routing"], g["wiring"]) for g in stages} == {("static", "ba")}


def test_static_detector_routes_every_image_alike() -> None:
    torch.manual_seed(0)
    model = create_model(
        "fasterrcnn_dgnet_resnet18_slim_fpn", num_classes=3, routing="static", width=8, min_size=64, max_size=64
    ).eval()
    spread_static_weights(model)
    images = list(varied_images(2, size=64))
    with torch.no_grad():
        model(images)
    first, second = collect_connectivity(model, 2)
    assert [s.adjacency for s in first["stages"]] == [s.adjacency for s in second["stages"]]
