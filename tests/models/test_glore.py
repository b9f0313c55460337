"""GloRe unit and GloRe ResNets: identity at init, sizes, placement, weights, inspection."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import Tensor, nn
from torchvision.ops import FrozenBatchNorm2d

from dgserve.models import registry
from dgserve.connectivity import ConnectivitySource, GloReUnitConnectivity
from dgserve.models.connectivity import collect_connectivity
from dgserve.models.glore import (
    GloReResNet,
    GloReStage,
    GloReUnit,
    GloReUnit1d,
    GloReUnit2d,
    GloReUnit3d,
)
from dgserve.models.glore.resnet import glore_resnet50, glore_resnet50_2_3

# Forward + backward of the 200-layer nets takes 5-15 s on two CPU cores.
_SLOW_MODELS = {"glore_resnet200", "glore_resnet200_2_3"}


def _glore_classifiers() -> list[str]:
    # Detection models of the glore family have other outputs; they are tested elsewhere.
    return registry.list_models(task="classification", family="glore")


def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _unit_input(dims: int, channels: int = 32) -> Tensor:
    spatial = {1: (10,), 2: (6, 5), 3: (3, 4, 5)}[dims]
    return torch.randn(2, channels, *spatial)


UNIT_CLASSES: dict[int, type[GloReUnit]] = {1: GloReUnit1d, 2: GloReUnit2d, 3: GloReUnit3d}


# ---- the unit ---------------------------------------------------------------------------


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("train", [True, False])
def test_new_unit_is_exactly_identity(dims: int, train: bool) -> None:
    torch.manual_seed(0)
    unit = UNIT_CLASSES[dims](32).train(train)
    x = _unit_input(dims)
    out = unit(x)
    assert out.shape == x.shape
    torch.testing.assert_close(out, x, rtol=0, atol=0)


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_unit_with_nonzero_bn_weight_is_not_identity(dims: int) -> None:
    torch.manual_seed(0)
    unit = GloReUnit(32, dims=dims)  # type: ignore[arg-type]
    with torch.no_grad():
        unit.bn.weight.fill_(1.0)
    x = _unit_input(dims)
    out = unit(x)
    assert out.shape == x.shape
    assert not torch.allclose(out, x)
    # and the unit trains end to end: every parameter gets a gradient
    out.square().sum().backward()
    for name, p in unit.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_unit_sizes_default_to_paper() -> None:
    unit = GloReUnit2d(64)
    assert (unit.num_nodes, unit.num_states) == (16, 32)
    custom = GloReUnit2d(64, num_nodes=8, num_states=12)
    assert custom.node_conv.weight.shape == (8, 8, 1)
    assert custom.channel_conv.weight.shape == (12, 12, 1)
    assert custom.channel_conv.bias is None and custom.extend_conv.bias is None
    assert custom.state_conv.bias is not None and custom.proj_conv.bias is not None
    assert custom.bn.eps == 1e-4
    assert isinstance(GloReUnit1d(8).bn, nn.BatchNorm1d)
    assert isinstance(GloReUnit3d(8).bn, nn.BatchNorm3d)
    assert isinstance(GloReUnit3d(8).state_conv, nn.Conv3d)


def test_unit_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        GloReUnit2d(32)(torch.randn(2, 16, 4, 4))
    with pytest.raises(ValueError):
        GloReUnit2d(32)(torch.randn(2, 32, 4))
    with pytest.raises(ValueError):
        GloReUnit(32, dims=4)  # type: ignore[arg-type]


@pytest.mark.parametrize(("channels", "expected"), [(1024, 1_641_472), (512, 411_136)])
def test_unit_param_count_matches_official(channels: int, expected: int) -> None:
    assert _params(GloReUnit2d(channels)) == expected


def test_normalize_keeps_node_features_independent_of_input_size() -> None:
    """Tiling a map k×k times repeats each location k² times: V's sum grows by k², and
    with 1/L scaling it must not change at all."""
    torch.manual_seed(0)
    small = torch.randn(2, 32, 5, 4)
    large = small.repeat(1, 1, 4, 4)  # L grows 16x, same content
    plain = GloReUnit2d(32, normalize=False)
    scaled = GloReUnit2d(32, normalize=True)
    scaled.load_state_dict(plain.state_dict())
    with torch.no_grad():
        v_plain_small, _ = plain.project(small)
        v_plain_large, _ = plain.project(large)
        v_small, _ = scaled.project(small)
        v_large, _ = scaled.project(large)
    torch.testing.assert_close(v_plain_large, 16 * v_plain_small, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(v_large, v_small, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(v_small, v_plain_small / 20, rtol=1e-5, atol=1e-6)

    # The whole unit then commutes with tiling (BN in eval uses fixed statistics).
    with torch.no_grad():
        scaled.bn.weight.fill_(1.0)
        scaled.eval()
        out_small = scaled(small)
        out_large = scaled(large)
    torch.testing.assert_close(out_large, out_small.repeat(1, 1, 4, 4), rtol=1e-4, atol=1e-4)


def test_unit_bn_stays_trainable_in_frozen_bn_backbone() -> None:
    model = glore_resnet50(num_classes=10, norm_layer=FrozenBatchNorm2d, normalize=True)
    assert isinstance(model.layer1[0].bn1, FrozenBatchNorm2d)
    units = dict(model.glore_units())
    assert len(units) == 3
    for unit in units.values():
        assert unit.normalize
        assert type(unit.bn) is nn.BatchNorm2d
        assert unit.bn.weight.requires_grad


# ---- inspection -------------------------------------------------------------------------


def test_unit_adjacency_needs_no_forward() -> None:
    unit = GloReUnit2d(32)
    assert isinstance(unit, ConnectivitySource)
    assert unit.adjacency.shape == (8, 8)
    torch.testing.assert_close(unit.adjacency, unit.node_conv.weight[:, :, 0].detach())
    assert unit.projection_maps is None
    assert unit.image_connectivity("u") == []


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_unit_image_connectivity(dims: int) -> None:
    torch.manual_seed(0)
    unit = UNIT_CLASSES[dims](32)
    x = _unit_input(dims)
    unit(x)
    maps = unit.projection_maps
    assert maps is not None and maps.dtype == torch.int32
    assert maps.shape == (2, *x.shape[2:])
    expected = unit.proj_conv(x).argmax(dim=1)
    assert torch.equal(maps.long(), expected)

    records = unit.image_connectivity("the_unit")
    assert len(records) == 2
    width = x.shape[-1]
    for i, record in enumerate(records):
        assert isinstance(record, GloReUnitConnectivity)
        assert record.unit == "the_unit" and record.num_nodes == 8
        assert record.adjacency == unit.adjacency.tolist()
        assert torch.equal(torch.tensor(record.projection), expected[i].reshape(-1, width))
        assert all(0 <= node < 8 for row in record.projection for node in row)


def test_model_connectivity_per_image() -> None:
    torch.manual_seed(0)
    model = glore_resnet50_2_3(num_classes=10).eval()
    with torch.no_grad():
        model(torch.randn(2, 3, 64, 64))
    images = collect_connectivity(model, batch_size=2)
    assert len(images) == 2
    for image in images:
        assert not image["stages"]
        names = [u.unit for u in image["glore_units"]]
        assert names == [
            "layer2.units.0",
            "layer2.units.2",
            "layer3.units.0",
            "layer3.units.2",
            "layer3.units.4",
        ]
        for record in image["glore_units"]:
            # 64 px input: Res3 maps are 8x8 (C=512, N=128), Res4 maps 4x4 (C=1024, N=256)
            side, nodes = (8, 128) if record.unit.startswith("layer2") else (4, 256)
            assert record.num_nodes == nodes
            assert len(record.adjacency) == nodes
            assert all(len(row) == nodes for row in record.adjacency)
            assert len(record.projection) == side
            assert all(len(row) == side for row in record.projection)
        assert image.to_dict()["glore_units"][0]["unit"] == "layer2.units.0"


# ---- GloRe ResNets ----------------------------------------------------------------------


def test_registry_lists_glore_models() -> None:
    names = _glore_classifiers()
    assert {
        "glore_resnet50",
        "glore_resnet50_2_3",
        "glore_resnet101",
        "glore_resnext101_32x4d",
        "glore_resnet200",
        "glore_resnet200_2_3",
    } <= set(names)


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(n, marks=pytest.mark.slow) if n in _SLOW_MODELS else n
        for n in _glore_classifiers()
    ],
)
def test_glore_model_forward_backward(name: str) -> None:
    torch.manual_seed(0)
    model = registry.create_model(name, num_classes=7)
    assert isinstance(model, GloReResNet)
    # Make the units non-trivial so the backward pass goes through them too.
    for _, unit in model.glore_units():
        with torch.no_grad():
            unit.bn.weight.fill_(0.1)
    out = model(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 7)
    out.sum().backward()
    for unit_name, unit in model.glore_units():
        assert unit.state_conv.weight.grad is not None, unit_name
        assert unit.state_conv.weight.grad.abs().sum() > 0, unit_name


@pytest.mark.parametrize(
    ("builder", "paper_m", "official"),
    [(glore_resnet50, 30.5, 30_481_448), (glore_resnet50_2_3, 31.4, 31_303_720)],
)
def test_resnet50_param_counts(builder: object, paper_m: float, official: int) -> None:
    model = builder()  # type: ignore[operator]
    params = _params(model)
    # Table 2 of the paper, to its rounding; the official code's layers give `official`.
    assert abs(params / 1e6 - paper_m) <= 0.15
    assert params == official
    assert params - _params(torchvision.models.resnet50()) == sum(
        _params(u) for _, u in model.glore_units()
    )


def test_placement() -> None:
    model = glore_resnet50_2_3()
    assert isinstance(model.layer2, GloReStage) and isinstance(model.layer3, GloReStage)
    assert isinstance(model.layer1, nn.Sequential) and isinstance(model.layer4, nn.Sequential)
    assert model.placement == {"layer2": (0, 2), "layer3": (0, 2, 4)}
    assert list(model.layer2.units) == ["0", "2"]
    assert list(model.layer3.units) == ["0", "2", "4"]
    assert len(model.layer3) == 6 and model.layer3[-1] is model.layer3[5]
    res4 = glore_resnet50()
    assert res4.placement == {"layer3": (0, 2, 4)}
    assert isinstance(res4.layer2, nn.Sequential)


def test_bad_placement_rejected() -> None:
    from torchvision.models.resnet import Bottleneck

    from dgserve.models.glore.resnet import GloReResNet

    with pytest.raises(ValueError):
        GloReResNet(Bottleneck, [3, 4, 6, 3], {"layer2": (4,)})
    with pytest.raises(ValueError):
        GloReResNet(Bottleneck, [3, 4, 6, 3], {"layer5": (0,)})


def test_torchvision_weights_load_with_only_unit_keys_missing() -> None:
    torch.manual_seed(0)
    reference = torchvision.models.resnet50().eval()
    model = glore_resnet50().eval()
    result = model.load_state_dict(reference.state_dict(), strict=False)
    assert result.unexpected_keys == []
    # BatchNorm fills a missing num_batches_tracked itself (for old checkpoints), so
    # load_state_dict does not report it.
    unit_keys = {
        f"{name}.{key}"
        for name, unit in model.glore_units()
        for key in unit.state_dict()
        if not key.endswith("num_batches_tracked")
    }
    assert unit_keys and set(result.missing_keys) == unit_keys
    assert all(".units." in key for key in result.missing_keys)
    # New units are exact identities, so the GloRe net reproduces the torchvision net.
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), reference(x))
