"""Faster R-CNN + FPN on DG-Net and GloRe backbones, built from torchvision.models.detection.

The RPN, RoI heads, box coder and NMS are torchvision's. What is ours is the body
(a DG-Net or GloRe ResNet) and which of its parameters train: torchvision's
``_resnet_fpn_extractor`` freezes every parameter outside the trainable layers, which
would freeze routers, thresholds and GloRe units that never saw ImageNet. Here those
always stay trainable, whatever ``trainable_backbone_layers`` says.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torchvision
from torch import nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool
from torchvision.ops.misc import FrozenBatchNorm2d

from dgserve.models.connectivity import ConnectivitySource
from dgserve.models.dgnet.backbones import StageOptions, block_channels, dgnet_from_torchvision
from dgserve.models.dgnet.routing import RoutingKind
from dgserve.models.dgnet.stage import DEFAULT_TAU, DGStage
from dgserve.models.dgnet.wiring import WiringKind
from dgserve.models.glore.resnet import glore_resnet50
from dgserve.models.registry import register_model

_LAYERS_BY_DEPTH = ["layer4", "layer3", "layer2", "layer1", "conv1"]


def always_trainable(body: nn.Module) -> Iterator[nn.Parameter]:
    """Routers, thresholds and GloRe units: new parts that pretrained weights never set."""
    for module in body.modules():
        if isinstance(module, DGStage):
            yield module.tau
            yield from module.routers.parameters()
        elif isinstance(module, ConnectivitySource):
            yield from module.parameters()


def resnet_fpn_backbone(body: nn.Module, trainable_layers: int, out_channels: int = 256) -> BackboneWithFPN:
    """FPN over layer1..layer4 of a torchvision-style ResNet body (DG-Net or GloRe)."""
    if not 0 <= trainable_layers <= 5:
        raise ValueError(f"trainable_backbone_layers must be in [0, 5], got {trainable_layers}")
    train = _LAYERS_BY_DEPTH[:trainable_layers] + (["bn1"] if trainable_layers == 5 else [])
    for name, param in body.named_parameters():
        param.requires_grad_(any(name.startswith(layer) for layer in train))
    for param in always_trainable(body):
        param.requires_grad_(True)
    stages = ("layer1", "layer2", "layer3", "layer4")
    return BackboneWithFPN(
        body,
        return_layers={name: str(i) for i, name in enumerate(stages)},
        in_channels_list=[block_channels(getattr(body, name)) for name in stages],
        out_channels=out_channels,
        extra_blocks=LastLevelMaxPool(),
    )


def norm_for(frozen_bn: bool) -> type[nn.Module]:
    # Frozen BN suits fine-tuning from ImageNet statistics; training from scratch
    # (the bundled models) needs BN that learns.
    return FrozenBatchNorm2d if frozen_bn else nn.BatchNorm2d


def _dgnet_body(depth: int, frozen_bn: bool, options: StageOptions) -> nn.Module:
    plain = {50: torchvision.models.resnet50, 101: torchvision.models.resnet101}[depth](norm_layer=norm_for(frozen_bn))
    return dgnet_from_torchvision(plain, options=options)


def _register_dgnet_detector(depth: int) -> None:
    name = f"fasterrcnn_dgnet_resnet{depth}_fpn"

    def builder(
        num_classes: int = 91,
        *,
        trainable_backbone_layers: int = 3,
        frozen_bn: bool = True,
        tau_init: float = DEFAULT_TAU,
        routing: RoutingKind = "dynamic",
        wiring: WiringKind = "complete",
        wiring_seed: int = 0,
        **kwargs: Any,
    ) -> FasterRCNN:
        body = _dgnet_body(depth, frozen_bn, StageOptions(tau_init, routing, wiring, wiring_seed))
        return FasterRCNN(resnet_fpn_backbone(body, trainable_backbone_layers), num_classes=num_classes, **kwargs)

    builder.__name__ = name
    description = f"Faster R-CNN + FPN on a DG-Net ResNet-{depth}."
    register_model(name, task="detection", family="dgnet", description=description)(builder)


for _depth in (50, 101):
    _register_dgnet_detector(_depth)


@register_model("fasterrcnn_glore_resnet50_fpn", task="detection", family="glore")
def fasterrcnn_glore_resnet50_fpn(
    num_classes: int = 91,
    *,
    trainable_backbone_layers: int = 3,
    frozen_bn: bool = True,
    **kwargs: Any,
) -> FasterRCNN:
    """Faster R-CNN + FPN on a GloRe ResNet-50 (3 units at Res4, 1/L normalised for any input size)."""
    body = glore_resnet50(norm_layer=norm_for(frozen_bn), normalize=True)
    return FasterRCNN(resnet_fpn_backbone(body, trainable_backbone_layers), num_classes=num_classes, **kwargs)
