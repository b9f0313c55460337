"""DG-Net: graph, routers, thresholds, skipping, buffers, training signal."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from dgserve.models.connectivity import collect_connectivity
from dgserve.models.dgnet import DGStage, dg_stages, pin_chain
from dgserve.models.registry import create_model, list_models
from dgserve.training.regularizers import edge_l1

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dgnet_inputs import randomise_routers, varied_images  # noqa: E402

DGNET_MODELS = list_models(family="dgnet", task="classification")




def test_seven_backbones_registered() -> None:
    assert set(DGNET_MODELS) >= set(
        [
            "dgnet_mobilenet_v2",
            "dgnet_regnet_x_1_6gf",
            "dgnet_regnet_x_600mf",
            "dgnet_resnet101",
            "dgnet_resnet18",
            "dgnet_resnet50",
            "dgnet_resnext50_32x4d",
        ]
    )


@pytest.mark.parametrize("name", DGNET_MODELS)
def test_forward_backward(name: str) -> None:
    torch.manual_seed(0)
    model = create_model(name, num_classes=7)
    x = torch.randn(2, 3, 64, 64)
    out = model(x)
    assert out.shape == (2, 7)
    (out.sum() + edge_l1(model)).backward()
    stages = dg_stages(model)
    assert stages, "no DG-Net stage found"
    for _, stage in stages:
        assert stage.tau.grad is not None
        assert all(r.fc.weight.grad is not None for r in stage.routers)


@pytest.mark.parametrize("name", DGNET_MODELS)
def test_every_stage_is_complete_dag(name: str) -> None:
    model = create_model(name, num_classes=3).eval()
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 64))
    for _, stage in dg_stages(model):
        n = stage.num_blocks
        assert [r.fc.out_features for r in stage.routers] == [n - k for k in range(n)]
        adj = stage.last_adjacency
        assert adj is not None and adj.shape == (1, n + 2, n + 2)
        # Only edges from earlier to later nodes exist (strictly lower triangular).
        assert torch.equal(adj, adj.tril(-1))


def test_routers_weight_edges_per_image() -> None:
    torch.manual_seed(0)
    model = create_model("dgnet_resnet18", num_classes=5).eval()
    randomise_routers(model)
    x = varied_images(6)
    with torch.no_grad():
        model(x)
    records = collect_connectivity(model, batch_size=6)
    patterns = {tuple(tuple(r) for s in img["stages"] for r in s.adjacency) for img in records}
    assert len(patterns) > 1, "every image took the same path"
    for img in records:
        for stage in img["stages"]:
            taus = stage.thresholds
            for target, row in enumerate(stage.adjacency):
                for source, w in enumerate(row):
                    if source == 0 or w == 0.0:
                        continue
                    # Open edges carry their router weight, which is at least the source's τ.
                    assert w >= taus[source]
            # A block ran iff one of its input edges is open.
            for j in range(1, len(stage.nodes) - 1):
                assert stage.executed[j] == any(w > 0 for w in stage.adjacency[j][:j])


def test_nodes_without_open_input_are_skipped_and_batch_equals_single() -> None:
    torch.manual_seed(1)
    model = create_model("dgnet_resnet18", num_classes=5).eval()
    randomise_routers(model, scale=8.0, tau=0.55, seed=1)
    x = varied_images(8)
    with torch.no_grad():
        batch_out = model(x)
        batch_records = collect_connectivity(model, 8)
        singles = []
        single_records = []
        for i in range(8):
            singles.append(model(x[i : i + 1]))
            single_records.extend(collect_connectivity(model, 1))
    skipped = [sum(s.skipped_nodes for s in r["stages"]) for r in batch_records]
    assert any(skipped), "the test routers skipped no node; it would not test skipping"
    assert len(set(skipped)) > 1, "every image skipped the same nodes"
    torch.testing.assert_close(batch_out, torch.cat(singles), atol=1e-5, rtol=1e-5)
    for b, s in zip(batch_records, single_records, strict=True):
        for sb, ss in zip(b["stages"], s["stages"], strict=True):
            assert sb.executed == ss.executed
            torch.testing.assert_close(torch.tensor(sb.adjacency), torch.tensor(ss.adjacency))


def test_skipped_node_is_not_computed() -> None:
    """A block whose inputs are all closed never sees the images it is skipped for."""
    block_inputs: list[int] = []

    class Probe(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            block_inputs.append(x.shape[0])
            return self.bn(x)

    stage = DGStage([(str(i), Probe()) for i in range(3)], channels=4).eval()
    with torch.no_grad():
        for router in stage.routers:
            router.pin(torch.ones(router.fc.out_features, dtype=torch.bool))
        # Block 1: its edge to block 2 opens for images with positive features only;
        # its edge to block 3 is shut. Block 2 (when it runs) feeds block 3.
        stage.routers[0].fc.weight[0].fill_(10.0)
        stage.routers[0].fc.bias.copy_(torch.tensor([0.0, -30.0, 30.0]))
        stage.tau.fill_(0.4)
        x = torch.ones(2, 4, 5, 5)
        x[1] = -1.0
        stage(x)
    assert block_inputs == [2, 1, 1]
    ran = stage.last_executed
    assert ran is not None
    assert ran[:, 1:4].tolist() == [[True, True, True], [True, False, False]]


def test_train_and_inference_close_the_same_edges() -> None:
    torch.manual_seed(2)
    model = create_model("dgnet_resnet18", num_classes=5).eval()  # eval: BN uses fixed stats in both
    randomise_routers(model, seed=5)
    x = torch.randn(4, 3, 64, 64)
    with torch.enable_grad():
        out_grad = model(x)  # straight-through path
        adj_grad = [s.last_adjacency.clone() for _, s in dg_stages(model)]  # type: ignore[union-attr]
    with torch.inference_mode():
        out_inf = model(x)
        adj_inf = [s.last_adjacency.clone() for _, s in dg_stages(model)]  # type: ignore[union-attr]
    for a, b in zip(adj_grad, adj_inf, strict=True):
        assert torch.equal(a > 0, b > 0)
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(out_grad.detach(), out_inf)


def test_gradients_reach_routers_and_thresholds() -> None:
    """From the training starting point every router and every τ gets a gradient."""
    torch.manual_seed(3)
    model = create_model("dgnet_resnet18", num_classes=4).train()
    loss = nn.functional.cross_entropy(model(varied_images(4)), torch.tensor([0, 1, 2, 3]))
    (loss + 0.1 * edge_l1(model)).backward()
    for name, stage in dg_stages(model):
        assert stage.tau.grad is not None and bool((stage.tau.grad != 0).all()), name
        for router in stage.routers:
            assert router.fc.weight.grad is not None and router.fc.weight.grad.abs().sum() > 0, name


def test_closed_edge_still_gets_a_gradient() -> None:
    """The straight-through surrogate lets the task loss reopen an edge it needs."""
    stage = DGStage([(str(i), nn.BatchNorm2d(3)) for i in range(2)], channels=3).train()
    with torch.no_grad():
        for router in stage.routers:
            router.pin(torch.ones(router.fc.out_features, dtype=torch.bool))
        stage.routers[0].fc.bias.copy_(torch.tensor([30.0, 0.0]))  # α = 1 to block 2, 0.5 to output
        stage.tau.fill_(0.55)  # closes block 1 → output
    out = stage(torch.randn(4, 3, 4, 4))
    assert stage.last_adjacency is not None
    assert (stage.last_adjacency[:, 3, 1] == 0.0).all()  # closed in the forward pass
    (out * torch.randn_like(out)).sum().backward()
    bias_grad = stage.routers[0].fc.bias.grad
    assert bias_grad is not None and bias_grad[1] != 0  # the closed edge's own logit learns


def test_edge_l1_pushes_thresholds_up() -> None:
    stage = DGStage([(str(i), nn.BatchNorm2d(3)) for i in range(3)], channels=3).train()
    stage(torch.randn(4, 3, 4, 4))
    edge_l1(stage).backward()
    assert stage.tau.grad is not None
    assert (stage.tau.grad <= 0).all() and (stage.tau.grad < 0).any()  # descent raises τ


@pytest.mark.parametrize("name", DGNET_MODELS)
def test_chain_pinned_routes_like_the_backbone(name: str) -> None:
    model = create_model(name, num_classes=3).eval()
    pin_chain(model)
    with torch.no_grad():
        model(torch.randn(2, 3, 64, 64))
    for img in collect_connectivity(model, 2):
        for stage in img["stages"]:
            n = len(stage.nodes)
            expected = [[1.0 if t == s + 1 else 0.0 for s in range(n)] for t in range(n)]
            assert stage.adjacency == expected
            assert all(stage.executed)
            assert stage.open_edges == n - 2
