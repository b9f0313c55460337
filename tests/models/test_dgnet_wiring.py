"""Random wiring (DG-Net Table 4): seeded, acyclic, fully connected stage graphs, kept by the store."""

from __future__ import annotations

from pathlib import Path

import networkx as nx
import pytest
import torch
from safetensors.torch import load_file, save_file

from dgserve.model_store import ModelStore
from dgserve.model_store.weights import WeightsError
from dgserve.models.connectivity import collect_connectivity, describe_graph
from dgserve.models.dgnet import StageWiring, dg_stages, pin_chain, stage_wiring
from dgserve.models.registry import create_model
from dgserve.training.regularizers import edge_l1

RANDOM_KINDS = ["er", "ba", "ws"]
RANDWIRE_NODES = 32  # RandWire's nodes per stage, where the generators' edge counts are known


def as_digraph(wiring: StageWiring) -> nx.DiGraph:
    """The whole stage: input node 0, blocks, output node, with the fixed input → block 1 edge."""
    graph = nx.DiGraph([(0, 1), *wiring.edges])
    graph.add_nodes_from(range(wiring.num_blocks + 2))
    return graph


def block_edges(wiring: StageWiring) -> int:
    return sum(1 for _, target in wiring.edges if target <= wiring.num_blocks)


@pytest.mark.parametrize("kind", RANDOM_KINDS)
@pytest.mark.parametrize("num_blocks", [1, 2, 3, 6, 23, RANDWIRE_NODES])
def test_random_stage_graph_is_an_acyclic_dag_through_every_block(kind: str, num_blocks: int) -> None:
    wiring = stage_wiring(kind, num_blocks, f"7/{kind}")
    graph = as_digraph(wiring)
    output = num_blocks + 1
    assert nx.is_directed_acyclic_graph(graph)
    assert all(source < target for source, target in graph.edges)  # acyclic by node order
    for block in range(1, num_blocks + 1):
        assert nx.has_path(graph, 0, block) and nx.has_path(graph, block, output), block
    assert sorted(set(wiring.edges)) == sorted(wiring.edges)  # no edge twice


@pytest.mark.parametrize("kind", RANDOM_KINDS)
def test_same_seed_same_graph_other_seed_other_graph(kind: str) -> None:
    first = stage_wiring(kind, RANDWIRE_NODES, "0/layer3")
    assert stage_wiring(kind, RANDWIRE_NODES, "0/layer3") == first
    assert stage_wiring(kind, RANDWIRE_NODES, "1/layer3") != first
    assert stage_wiring(kind, RANDWIRE_NODES, "0/layer2") != first  # each stage draws its own


def test_edge_counts_match_each_generator() -> None:
    n = RANDWIRE_NODES
    complete = stage_wiring("complete", n, "0")
    assert len(complete.edges) == n * (n + 1) // 2
    # Block-to-block edges are the generator's, plus at most one from block 1 per block
    # that had no predecessor. WS keeps n·K/2 edges through rewiring; BA (networkx's, from
    # a star of M+1 nodes) has M·(n−M); ER averages P·n(n−1)/2 = 99.2, sd ≈ 9.
    for seed in range(5):
        ws, ba, er = (stage_wiring(kind, n, str(seed)) for kind in ("ws", "ba", "er"))
        assert n * 4 // 2 <= block_edges(ws) <= n * 4 // 2 + n
        assert 5 * (n - 5) <= block_edges(ba) <= 5 * (n - 5) + n
        assert 60 <= block_edges(er) <= 140
        for wiring in (ws, ba, er):
            assert len(wiring.edges) < len(complete.edges)


def test_unknown_wiring_or_routing_is_refused() -> None:
    with pytest.raises(ValueError, match="wiring must be one of"):
        create_model("dgnet_resnet18_slim", num_classes=3, wiring="smallworld")
    with pytest.raises(ValueError, match="routing must be one of"):
        create_model("dgnet_resnet18_slim", num_classes=3, routing="learned")
    with pytest.raises(ValueError, match="wiring_seed must be an integer"):
        create_model("dgnet_resnet18_slim", num_classes=3, wiring="er", wiring_seed="3")


@pytest.mark.parametrize("kind", RANDOM_KINDS)
def test_random_wired_model_trains_and_never_opens_an_absent_edge(kind: str) -> None:
    torch.manual_seed(0)
    model = create_model("dgnet_resnet50", num_classes=4, wiring=kind, wiring_seed=2, tau_init=0.0)
    out = model(torch.randn(2, 3, 32, 32))
    (out.sum() + edge_l1(model)).backward()
    for name, stage in dg_stages(model):
        # Routers weight only the edges the wiring has.
        assert [r.num_edges for r in stage.routers] == [len(t) for t in stage.wiring.successors], name
        assert all(r.fc.weight.grad is not None for r in stage.routers)
        adj = stage.last_adjacency
        assert adj is not None
        routed = adj.clone()
        routed[:, 1, 0] = 0  # the fixed input edge
        # With τ = 0 every existing edge is open, and nothing else is.
        assert torch.equal(routed[0] > 0, stage.wiring_mask)
        assert stage.possible_edges == int(stage.wiring_mask.sum())


def test_graph_description_shows_the_wiring() -> None:
    complete = describe_graph(create_model("dgnet_resnet50", num_classes=3))["stages"]
    model = create_model("dgnet_resnet50", num_classes=3, wiring="ws", wiring_seed=3)
    described = describe_graph(model)["stages"]
    for full, graph, (_, stage) in zip(complete, described, dg_stages(model), strict=True):
        assert (full["wiring"], graph["wiring"], graph["routing"]) == ("complete", "ws", "dynamic")
        assert [tuple(e) for e in graph["edges"]] == stage.wiring.edges
        assert len(graph["edges"]) == graph["possible_edges"]
        assert {tuple(e) for e in graph["edges"]} <= {tuple(e) for e in full["edges"]}
    assert sum(g["possible_edges"] for g in described) < sum(g["possible_edges"] for g in complete)


def test_seed_decides_the_model_graph() -> None:
    def graphs(seed: int) -> list[list[list[int]]]:
        model = create_model("dgnet_resnet50", num_classes=3, wiring="er", wiring_seed=seed)
        return [g["edges"] for g in describe_graph(model)["stages"]]

    assert graphs(5) == graphs(5)
    assert graphs(5) != graphs(6)


def test_chain_pinning_needs_the_chain_edges() -> None:
    model = create_model("dgnet_resnet50", num_classes=3, wiring="er", wiring_seed=0)
    lacking = [s for _, s in dg_stages(model) if any(t[0] != k + 2 for k, t in enumerate(s.wiring.successors))]
    assert lacking, "every stage drew the chain; pick another seed"
    with pytest.raises(ValueError, match="lacks the chain edges"):
        pin_chain(model)


def save_random_wired(root: Path) -> tuple[ModelStore, torch.nn.Module]:
    kwargs = {"num_classes": 3, "wiring": "ws", "wiring_seed": 3, "routing": "static"}
    torch.manual_seed(0)
    model = create_model("dgnet_resnet18_slim", **kwargs)
    store = ModelStore(root)
    pre = {"input_size": [32, 32], "mean": [0.5] * 3, "std": [0.25] * 3}
    store.save(model, name="rw", architecture="dgnet_resnet18_slim", arch_kwargs=kwargs, labels=["a", "b", "c"],
               preprocessing=pre)  # fmt: skip
    return store, model


def test_manifest_rebuilds_the_same_graph(tmp_path: Path) -> None:
    store, model = save_random_wired(tmp_path)
    loaded = store.load("rw")
    assert loaded.manifest.arch_kwargs["wiring_seed"] == 3
    assert describe_graph(loaded.model) == describe_graph(model)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x), model.eval()(x))
    for a, b in zip(collect_connectivity(loaded.model, 2), collect_connectivity(model, 2), strict=True):
        assert [s.adjacency for s in a["stages"]] == [s.adjacency for s in b["stages"]]


def test_weights_of_another_graph_are_refused(tmp_path: Path) -> None:
    """Should networkx ever draw another graph for a stored seed, loading says so."""
    store, _ = save_random_wired(tmp_path)
    stored = store.resolve("rw")
    state = load_file(str(stored.weights_path))
    mask = state["layer3.wiring_mask"].clone()
    mask[3, 1] = ~mask[3, 1]  # one edge added or taken away
    state["layer3.wiring_mask"] = mask
    save_file(state, str(stored.weights_path), metadata={"format": "pt"})
    model = create_model("dgnet_resnet18_slim", **stored.manifest.arch_kwargs)
    with pytest.raises(RuntimeError, match="layer3.wiring_mask: the stored ws graph differs"):
        model.load_state_dict(state)
    with pytest.raises(WeightsError):  # the checksum catches the rewritten file before anything
        store.load("rw")
