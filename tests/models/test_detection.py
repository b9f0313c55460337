"""Faster R-CNN + FPN on DG-Net and GloRe bodies."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from dgserve.models.connectivity import collect_connectivity
from dgserve.models.detection import always_trainable
from dgserve.models.registry import create_model, get_entry, list_models

DETECTION_MODELS = list_models(task="detection")
SMALL = {"min_size": 128, "max_size": 160}


def test_detectors_registered() -> None:
    assert set(DETECTION_MODELS) >= {
        "fasterrcnn_dgnet_resnet101_fpn",
        "fasterrcnn_dgnet_resnet50_fpn",
        "fasterrcnn_glore_resnet50_fpn",
        "fasterrcnn_dgnet_resnet18_slim_fpn",
    }


def _targets() -> list[dict[str, torch.Tensor]]:
    return [
        {"boxes": torch.tensor([[10.0, 12.0, 60.0, 70.0]]), "labels": torch.tensor([1])},
        {"boxes": torch.tensor([[5.0, 5.0, 40.0, 30.0], [50.0, 60.0, 100.0, 110.0]]), "labels": torch.tensor([2, 3])},
    ]


@pytest.mark.parametrize("name", DETECTION_MODELS)
def test_detector_trains_and_returns_connectivity(name: str) -> None:
    torch.manual_seed(0)
    model = create_model(name, num_classes=4, frozen_bn=False, trainable_backbone_layers=5, **SMALL)  # type: ignore[arg-type]
    images = [torch.rand(3, 120, 140), torch.rand(3, 128, 128)]
    losses = model(images, _targets())
    assert {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"} <= losses.keys()
    sum(losses.values()).backward()
    model.eval()
    with torch.no_grad():
        detections = model(images)
    assert len(detections) == 2 and {"boxes", "labels", "scores"} <= detections[0].keys()
    records = collect_connectivity(model, 2)
    if get_entry(name).family == "dgnet":
        assert [s.stage for s in records[0]["stages"]] == [f"backbone.body.layer{i}" for i in range(1, 5)]
    else:
        assert len(records[0]["glore_units"]) == 3


@pytest.mark.parametrize("name", DETECTION_MODELS)
@pytest.mark.parametrize("trainable", [0, 3])
def test_freezing_keeps_routers_thresholds_and_glore_trainable(name: str, trainable: int) -> None:
    model = create_model(name, num_classes=3, frozen_bn=True, trainable_backbone_layers=trainable, **SMALL)
    body = model.backbone.body
    kept = {id(p) for p in always_trainable(body)}
    assert kept, "no router, threshold or GloRe parameter found"
    for pname, param in body.named_parameters():
        if id(param) in kept:
            assert param.requires_grad, pname
        elif not pname.startswith(("layer4", "layer3", "layer2")[:trainable]) or trainable == 0:
            assert not param.requires_grad, pname
    # GloRe's zero-initialised BN must stay a real, trainable BatchNorm under frozen BN.
    for mname, module in body.named_modules():
        if ".units." in f".{mname}." or mname.startswith("units"):
            assert not isinstance(module, FrozenBatchNorm2d), mname
    norms = [m for m in body.modules() if isinstance(m, nn.BatchNorm2d)]
    if get_entry(name).family == "glore":
        assert norms and all(m.weight.requires_grad for m in norms)
    # Training still reaches what must train.
    model.train()
    losses = model([torch.rand(3, 128, 128)], _targets()[:1])
    sum(losses.values()).backward()
    grads = [p.grad for p in always_trainable(body)]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
