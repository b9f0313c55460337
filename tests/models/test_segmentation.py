"""The FCN segmentation models: the paper's layout, torchvision's parts, weights that load, paths recorded."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.segmentation.fcn import FCN, FCNHead

from dgserve.connectivity import GloReUnitConnectivity, StageConnectivity
from dgserve.models.connectivity import collect_connectivity
from dgserve.models.glore.unit import GloReUnit2d
from dgserve.models.registry import create_model, get_entry, list_models
from dgserve.models.segmentation import apply_multi_grid, dilation_for

SEGMENTERS = list_models(task="segmentation")
SLIM = ["fcn_glore_resnet_slim", "fcn_dgnet_resnet_slim"]
FULL = {"fcn_glore_resnet50": torchvision.models.resnet50, "fcn_glore_resnet101": torchvision.models.resnet101,
        "fcn_dgnet_resnet50": torchvision.models.resnet50}  # fmt: skip


def test_the_issue_models_are_registered() -> None:
    assert set(FULL) | set(SLIM) <= set(SEGMENTERS)


@pytest.mark.parametrize("name", SEGMENTERS)
def test_each_segmenter_is_a_torchvision_fcn_whose_logits_match_the_input_size(name: str) -> None:
    torch.manual_seed(0)
    model = create_model(name, num_classes=5).eval()
    assert isinstance(model, FCN)
    with torch.no_grad():
        out = model(torch.randn(1, 3, 48, 80))
    assert out["out"].shape == (1, 5, 48, 80)
    # Output stride 8: layer4's features are an eighth of the input, as the paper's FCN.
    with torch.no_grad():
        features = model.backbone(torch.randn(1, 3, 64, 96))["out"]
    assert features.shape[-2:] == (8, 12)


@pytest.mark.parametrize("name", SLIM)
def test_slim_segmenters_train(name: str) -> None:
    torch.manual_seed(0)
    model = create_model(name, num_classes=4)
    x, y = torch.randn(2, 3, 64, 64), torch.randint(0, 4, (2, 64, 64))
    loss = nn.functional.cross_entropy(model(x)["out"], y)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None for g in grads) and any(float(g.abs().sum()) > 0 for g in grads)  # type: ignore[union-attr]


def test_the_glore_unit_sits_between_two_convolutions_before_the_classifier_with_1_over_l() -> None:
    model = create_model("fcn_glore_resnet50", num_classes=19)
    head = list(model.classifier.children())
    assert isinstance(head[0], nn.Conv2d) and head[0].out_channels == 512  # the paper's reduction of 2048
    assert isinstance(head[3], GloReUnit2d) and head[3].normalize
    assert isinstance(head[4], FCNHead)  # conv 3x3, then the final 1x1 classifier
    two = create_model("fcn_glore_resnet50", num_classes=19, num_units=2)
    assert sum(isinstance(m, GloReUnit2d) for m in two.modules()) == 2
    plain = create_model("fcn_glore_resnet50", num_classes=19, num_units=0)
    assert not any(isinstance(m, GloReUnit2d) for m in plain.modules())


def test_multi_grid_dilates_the_last_stage_1_2_4_times_its_rate() -> None:
    model = create_model("fcn_glore_resnet50", num_classes=19)
    assert [block.conv2.dilation for block in model.backbone.layer4] == [(4, 4), (8, 8), (16, 16)]
    # torchvision's own dilation elsewhere: a stage's first block keeps the previous rate.
    assert [block.conv2.dilation for block in model.backbone.layer3] == [(1, 1)] + [(2, 2)] * 5
    no_grid = create_model("fcn_glore_resnet50", num_classes=19, multi_grid=None)
    assert [block.conv2.dilation for block in no_grid.backbone.layer4] == [(2, 2), (4, 4), (4, 4)]
    with pytest.raises(ValueError, match="output_stride"):
        dilation_for(32)
    with pytest.raises(TypeError, match="3x3 conv2"):
        apply_multi_grid(nn.Sequential(nn.Conv2d(1, 1, 1)), (1, 2))


@pytest.mark.parametrize("name", sorted(FULL))
def test_a_torchvision_resnet_state_dict_leaves_only_the_new_parts_missing(name: str) -> None:
    resnet = FULL[name]()
    model = create_model(name, num_classes=19)
    weights = {f"backbone.{k}": v for k, v in resnet.state_dict().items() if not k.startswith("fc.")}
    result = model.load_state_dict(weights, strict=False)
    assert result.unexpected_keys == []
    new = ("classifier.",) if get_entry(name).family == "glore" else ("classifier.", "backbone.layer")
    assert result.missing_keys and all(k.startswith(new) for k in result.missing_keys)
    if get_entry(name).family == "dgnet":  # only the routers and thresholds are new in the backbone
        backbone_missing = [k for k in result.missing_keys if k.startswith("backbone.")]
        assert all(".routers." in k or k.endswith(".tau") for k in backbone_missing), backbone_missing[:5]
    torch.testing.assert_close(model.backbone.conv1.weight, resnet.conv1.weight)


@pytest.mark.parametrize("name", SLIM)
def test_dense_predictions_record_each_images_path(name: str) -> None:
    torch.manual_seed(0)
    model = create_model(name, num_classes=4).eval()
    with torch.no_grad():
        model(torch.randn(3, 3, 64, 64))
    records = collect_connectivity(model, 3)
    assert len(records) == 3
    if get_entry(name).family == "glore":
        units = records[0].of(GloReUnitConnectivity)
        assert len(units) == 1
        assert len(units[0].projection) == 8  # the feature map's rows at output stride 8
    else:
        assert len(records[0].of(StageConnectivity)) == 4


def test_the_dgnet_fcn_takes_the_baselines_routing_and_wiring() -> None:
    torch.manual_seed(0)
    model = create_model("fcn_dgnet_resnet_slim", num_classes=3, routing="static", wiring="ws", wiring_seed=3).eval()
    with torch.no_grad():
        model(torch.randn(2, 3, 48, 48))
    first, second = collect_connectivity(model, 2)
    # Static routing: one weight per edge for every image, so both images share a matrix.
    assert [s.adjacency for s in first.of(StageConnectivity)] == [s.adjacency for s in second.of(StageConnectivity)]
