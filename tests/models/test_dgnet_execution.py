"""DG-Net execution modes: skipping and masked give the same outputs and records; the fused routers and records."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from dgserve.data.scenes import render_classification
from dgserve.imaging import preprocess
from dgserve.model_store import ModelStore
from dgserve.models.dgnet import DGStage, dg_stages, set_execution, threshold_edges
from dgserve.models.registry import create_model, list_models
from dgserve.settings import default_model_store

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dgnet_inputs import randomise_routers as shared_randomise_routers  # noqa: E402
from dgnet_inputs import varied_images as shared_varied_images  # noqa: E402

DGNET_MODELS = list_models(family="dgnet", task="classification")


def randomise_routers(model: nn.Module, scale: float = 8.0, tau: float = 0.55, seed: int = 1) -> None:
    """Wider swings than test_dgnet's, so that whole blocks get skipped for some images."""
    shared_randomise_routers(model, scale=scale, tau=tau, seed=seed)


def varied_images(n: int, size: int = 48, seed: int = 0) -> torch.Tensor:
    return shared_varied_images(n, size=size, seed=seed)


Run = tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]


def run_mode(model: nn.Module, x: torch.Tensor, mode: str) -> Run:
    set_execution(model, mode)  # type: ignore[arg-type]
    with torch.no_grad():
        out = model(x)
    stages = [s for _, s in dg_stages(model)]
    adjacency = [s.last_adjacency.clone() for s in stages]  # type: ignore[union-attr]
    return out, adjacency, [s.last_executed.clone() for s in stages]  # type: ignore[union-attr]


def assert_same_runs(model: nn.Module, x: torch.Tensor) -> int:
    """Skip and masked agree on outputs, open edges, weights and executed flags; returns the blocks skipped."""
    out_s, adj_s, ran_s = run_mode(model, x, "skip")
    out_m, adj_m, ran_m = run_mode(model, x, "masked")
    torch.testing.assert_close(out_m, out_s, atol=1e-5, rtol=1e-5)
    for a_s, a_m, r_s, r_m in zip(adj_s, adj_m, ran_s, ran_m, strict=True):
        assert torch.equal(a_s > 0, a_m > 0)
        assert torch.equal(r_s, r_m)
        torch.testing.assert_close(a_m, a_s, atol=1e-6, rtol=1e-5)
    return sum(int((~r).sum()) for r in ran_s)


@pytest.mark.parametrize("name", DGNET_MODELS)
def test_masked_equals_skip(name: str) -> None:
    torch.manual_seed(0)
    model = create_model(name, num_classes=5).eval()
    randomise_routers(model)
    assert assert_same_runs(model, varied_images(6)) > 0, "no block was skipped; the test would not test skipping"


def test_masked_equals_skip_static_routing() -> None:
    torch.manual_seed(0)
    model = create_model("dgnet_resnet18_slim", num_classes=4, width=8, routing="static").eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, stage in dg_stages(model):
            for router in stage.routers:
                router.logit.copy_(torch.randn(router.logit.shape, generator=gen) * 2)
            stage.tau.fill_(0.5)
    assert assert_same_runs(model, varied_images(4)) > 0


def test_masked_equals_skip_while_training() -> None:
    """With autograd on, the modes give the same outputs and the same gradients."""
    torch.manual_seed(0)
    model = create_model("dgnet_resnet18_slim", num_classes=4, width=8).eval()
    randomise_routers(model)
    x = varied_images(4)
    grads = {}
    outs = {}
    for mode in ("skip", "masked"):
        set_execution(model, mode)  # type: ignore[arg-type]
        model.zero_grad()
        outs[mode] = model(x)
        outs[mode].square().sum().backward()
        grads[mode] = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    torch.testing.assert_close(outs["masked"], outs["skip"], atol=1e-5, rtol=1e-5)
    # A block skipped for every image gets no gradient when skipped and an exactly-zero
    # one when masked (its output only reaches closed edges).
    assert grads["skip"].keys() <= grads["masked"].keys()
    for key, g in grads["masked"].items():
        expected = grads["skip"].get(key, torch.zeros_like(g))
        torch.testing.assert_close(g, expected, atol=1e-4, rtol=1e-3, msg=key)


class Probe(nn.Module):
    """A block that remembers the batch sizes it saw."""

    def __init__(self, seen: list[int]) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(4)
        self.seen = seen

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.shape[0])
        return self.bn(x)


def probe_stage(execution: str) -> tuple[DGStage, list[int]]:
    """Block 1 opens its edge to block 2 for positive images only; block 2 feeds block 3."""
    seen: list[int] = []
    blocks = [(str(i), Probe(seen)) for i in range(3)]
    stage = DGStage(blocks, channels=4, execution=execution).eval()  # type: ignore[arg-type]
    with torch.no_grad():
        for router in stage.routers:
            router.pin(torch.ones(router.fc.out_features, dtype=torch.bool))
        stage.routers[0].fc.weight[0].fill_(10.0)
        stage.routers[0].fc.bias.copy_(torch.tensor([0.0, -30.0, 30.0]))
        stage.tau.fill_(0.4)
    return stage, seen


@pytest.mark.parametrize(("execution", "expected"), [("skip", [2, 1, 1]), ("masked", [2, 2, 2]), ("auto", [2, 1, 1])])
def test_masked_runs_every_block_on_the_whole_batch(execution: str, expected: list[int]) -> None:
    stage, seen = probe_stage(execution)
    x = torch.ones(2, 4, 5, 5)
    x[1] = -1.0
    with torch.no_grad():
        out = stage(x)
    assert seen == expected  # auto is skip off CUDA
    reference, _ = probe_stage("skip")
    with torch.no_grad():
        torch.testing.assert_close(out, reference(x))
    assert stage.last_executed is not None
    assert stage.last_executed[:, 1:4].tolist() == [[True, True, True], [True, False, False]]


def test_execution_is_a_builder_option_and_checked() -> None:
    model = create_model("dgnet_resnet18_slim", num_classes=3, width=8, execution="masked")
    assert {s.execution for _, s in dg_stages(model)} == {"masked"}
    with pytest.raises(ValueError, match="execution"):
        create_model("dgnet_resnet18_slim", num_classes=3, width=8, execution="sometimes")
    with pytest.raises(ValueError, match="execution"):
        set_execution(model, "sometimes")  # type: ignore[arg-type]


@pytest.mark.parametrize("routing", ["dynamic", "static"])
def test_stage_gates_equal_the_per_node_routers(routing: str) -> None:
    """The stage's fused gating computes exactly Router/StaticRouter followed by threshold_edges."""
    torch.manual_seed(0)
    model = create_model("dgnet_resnet18_slim", num_classes=3, width=8, routing=routing).eval()
    if routing == "dynamic":
        randomise_routers(model, tau=0.5)
    else:
        with torch.no_grad():
            for _, stage in dg_stages(model):
                for router in stage.routers:
                    router.logit.normal_(0.0, 2.0)
                stage.tau.fill_(0.5)
    closed = []
    with torch.no_grad():  # the fused path; training calls each router module
        gates_equal_routers(model, closed)
    assert any(closed) and not all(closed), "τ should close some edges and keep others open"


def gates_equal_routers(model: nn.Module, closed: list[bool]) -> None:
    routing = dg_stages(model)[0][1].routing
    for _, stage in dg_stages(model):
        feats = torch.randn(3, stage.channels, 4, 4)
        static = stage.static_gates() if routing == "static" else None
        for k, router in enumerate(stage.routers):
            old = threshold_edges(router(feats), stage.tau[k], stage.temperature)
            new = static[k].expand(3, -1) if static is not None else stage._gate(k, feats)
            assert torch.equal(new, old)
            closed.extend((old == 0).flatten().tolist())


@pytest.mark.parametrize("mode", ["skip", "masked"])
def test_record_matches_the_gates(mode: str) -> None:
    """The one-scatter record puts each gate at adjacency[target, source] and nothing elsewhere."""
    torch.manual_seed(0)
    model = create_model("dgnet_resnet18", num_classes=3, wiring="er", wiring_seed=3).eval()
    randomise_routers(model)
    run_mode(model, varied_images(3), mode)
    for _, stage in dg_stages(model):
        adj = stage.last_adjacency
        assert adj is not None
        assert (adj[:, 1, 0] == 1.0).all()
        off_wiring = ~stage.wiring_mask
        off_wiring[1, 0] = False
        assert (adj[:, off_wiring] == 0).all()


def test_bundled_weights_load_and_modes_agree_on_real_images() -> None:
    loaded = ModelStore(default_model_store()).load("shapes-dgnet")
    model = loaded.model.eval()
    keys = set(model.state_dict())
    assert any(".routers." in k for k in keys)
    rendered = [render_classification(11, i, 64) for i in range(8)]
    x = torch.stack([preprocess(img, loaded.manifest.preprocessing) for img, _ in rendered])
    labels = torch.tensor([label for _, label in rendered])
    assert_same_runs(model, x)
    set_execution(model, "masked")
    with torch.no_grad():
        assert int((model(x).argmax(1) == labels).sum()) >= 7


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.usefixtures("full_precision")  # tests/conftest.py: TF32 would flip edges near their τ
def test_auto_is_masked_on_cuda_and_agrees_with_cpu() -> None:
    torch.manual_seed(0)
    model = create_model("dgnet_resnet18_slim", num_classes=4, width=8).eval()
    randomise_routers(model)
    x = varied_images(4)
    out_cpu, adj_cpu, ran_cpu = run_mode(model, x, "skip")
    model.cuda()
    with torch.no_grad():
        set_execution(model, "auto")
        out_gpu = model(x.cuda())
    stages = [s for _, s in dg_stages(model)]
    torch.testing.assert_close(out_gpu.cpu(), out_cpu, atol=1e-3, rtol=1e-3)
    for stage, ran in zip(stages, ran_cpu, strict=True):
        assert stage.last_executed is not None and torch.equal(stage.last_executed.cpu(), ran)


@pytest.mark.parametrize("name", DGNET_MODELS)
def test_skipping_keeps_feature_maps_channels_last(name: str) -> None:
    """Under channels_last convolutions (DGSERVE_MEMORY_FORMAT's default) every block reads a
    channels_last map, including a sum fed by a block that ran on part of the batch; and
    the modes still agree."""
    torch.manual_seed(0)
    model = create_model(name, num_classes=5).eval()
    randomise_routers(model)
    torch.nn.utils.convert_conv2d_weight_memory_format(model, torch.channels_last)
    layouts: list[bool] = []
    hooks = [
        block.register_forward_pre_hook(
            lambda _m, args: layouts.append(args[0].is_contiguous(memory_format=torch.channels_last))
        )
        for _, stage in dg_stages(model)
        for block in stage.blocks()
    ]
    set_execution(model, "skip")
    with torch.no_grad():
        model(varied_images(6))
    for hook in hooks:
        hook.remove()
    assert layouts and all(layouts)
    assert assert_same_runs(model, varied_images(6)) > 0, "no block was skipped; the test would not test skipping"


@pytest.mark.parametrize("execution", ["auto", "skip"])
def test_every_execution_runs_masked_under_torch_compile(execution: str) -> None:
    """Skip's per-block host reads cannot be traced into one graph: ``fullgraph`` would refuse
    them. Under torch.compile every mode runs masked, with the skip mode's outputs and records."""
    torch.manual_seed(0)
    model = create_model("dgnet_resnet18_slim", num_classes=4, width=8).eval()
    randomise_routers(model)
    x = varied_images(4)
    out_skip, adj_skip, ran_skip = run_mode(model, x, "skip")
    assert sum(int((~r).sum()) for r in ran_skip) > 0, "no block was skipped; the test would not test skipping"
    set_execution(model, execution)  # type: ignore[arg-type]
    # Dynamo's cache is per forward's code, not per thread: graphs that other tests' workers
    # compiled for the same ResNet.forward (with their raised limit) count against this
    # thread's limit of 8.
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    with torch.no_grad():
        out = compiled(x)
    torch.testing.assert_close(out, out_skip, atol=1e-5, rtol=1e-5)
    for (_, stage), adj, ran in zip(dg_stages(model), adj_skip, ran_skip, strict=True):
        assert stage.last_executed is not None and torch.equal(stage.last_executed, ran)
        torch.testing.assert_close(stage.last_adjacency, adj, atol=1e-6, rtol=1e-5)
