"""Small registered variants that train on 2 CPU cores and ship in the bundled store.

They keep ResNet-18's layout (BasicBlocks, 2-2-2-2) at stage widths w, 2w, 4w, 8w.
The default w = 32 is half of ResNet-18's width, so about a quarter of its weights.
Otherwise they are the same DG-Net, GloRe and Faster R-CNN as the full-size
architectures.
"""

from __future__ import annotations

from typing import Any

from torch import nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.resnet import BasicBlock

from dgserve.models.detection import norm_for, resnet_fpn_backbone
from dgserve.models.dgnet.backbones import StageOptions, dgnet_from_torchvision
from dgserve.models.dgnet.execution import ExecutionKind
from dgserve.models.dgnet.routing import RoutingKind
from dgserve.models.dgnet.stage import DEFAULT_TAU
from dgserve.models.dgnet.wiring import WiringKind
from dgserve.models.glore.resnet import GloReResNet
from dgserve.models.registry import register_model
from dgserve.models.widths import slim_resnet18

# One unit after the first block of Res3 and of Res4, as the paper's "(1, 1)" pattern.
SLIM_GLORE_PLACEMENT = {"layer2": (0,), "layer3": (0,)}


@register_model("dgnet_resnet18_slim", task="classification", family="dgnet")
def dgnet_resnet18_slim(
    num_classes: int = 1000,
    *,
    width: int = 32,
    tau_init: float = DEFAULT_TAU,
    norm_layer: type[nn.Module] | None = None,
    routing: RoutingKind = "dynamic",
    wiring: WiringKind = "complete",
    wiring_seed: int = 0,
    execution: ExecutionKind = "auto",
) -> nn.Module:
    """DG-Net on ResNet-18's layout at stage widths w-2w-4w-8w (default w=32)."""
    options = StageOptions(tau_init, routing, wiring, wiring_seed, execution)
    return dgnet_from_torchvision(slim_resnet18(width, num_classes, norm_layer), options=options)


@register_model("glore_resnet18_slim", task="classification", family="glore")
def glore_resnet18_slim(
    num_classes: int = 1000, *, width: int = 32, normalize: bool = False, norm_layer: type[nn.Module] | None = None
) -> GloReResNet:
    """GloRe on ResNet-18's layout at widths w-2w-4w-8w, one unit after the first block of Res3 and Res4."""
    return GloReResNet(
        BasicBlock,
        [2, 2, 2, 2],
        SLIM_GLORE_PLACEMENT,
        num_classes=num_classes,
        norm_layer=norm_layer,
        normalize=normalize,
        widths=[width, 2 * width, 4 * width, 8 * width],
    )


@register_model("fasterrcnn_dgnet_resnet18_slim_fpn", task="detection", family="dgnet")
def fasterrcnn_dgnet_resnet18_slim_fpn(
    num_classes: int = 91,
    *,
    width: int = 32,
    fpn_channels: int = 64,
    representation_size: int = 256,
    trainable_backbone_layers: int = 5,
    frozen_bn: bool = False,
    tau_init: float = DEFAULT_TAU,
    min_size: int = 128,
    max_size: int = 256,
    anchor_sizes: tuple[int, ...] = (8, 16, 32, 64, 128),
    routing: RoutingKind = "dynamic",
    wiring: WiringKind = "complete",
    wiring_seed: int = 0,
    **kwargs: Any,
) -> FasterRCNN:
    """Faster R-CNN + FPN on the slim DG-Net, sized for small images (anchors 8-128 px)."""
    options = StageOptions(tau_init, routing, wiring, wiring_seed)
    body = dgnet_from_torchvision(slim_resnet18(width, 1000, norm_for(frozen_bn)), options=options)
    backbone = resnet_fpn_backbone(body, trainable_backbone_layers, out_channels=fpn_channels)
    anchors = AnchorGenerator(tuple((s,) for s in anchor_sizes), ((0.5, 1.0, 2.0),) * len(anchor_sizes))
    return FasterRCNN(
        backbone,
        num_classes=None,  # set by box_predictor below
        min_size=min_size,
        max_size=max_size,
        rpn_anchor_generator=anchors,
        box_head=TwoMLPHead(fpn_channels * 7 * 7, representation_size),
        box_predictor=FastRCNNPredictor(representation_size, num_classes),
        **kwargs,
    )
