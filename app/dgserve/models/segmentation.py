"""FCN semantic segmentation on GloRe and DG-Net backbones (GloRe paper, section 4, Tables 3-4).

The paper's segmentation network (glore.txt, "Semantic Image Segmentation"):

* an ImageNet ResNet with its last two down-samplings removed (output stride 8) and
  multi-grid dilated convolutions in the last stage (DeepLab v3's (1, 2, 4) grid);
* one GloRe unit, randomly initialised, appended at the end of the FCN just before
  the final classifier, between two convolution layers; ``num_units=2`` gives the
  "+2 GloRe unit" row of Table 3.

Everything but the GloRe units is torchvision's: ``replace_stride_with_dilation`` on
its ResNet, ``IntermediateLayerGetter`` for the backbone, ``FCN`` for the model (which
upsamples the logits to the input size) and ``FCNHead`` for the conv + classifier after
the units. The backbone's state-dict keys are torchvision's under ``backbone.``, so a
torchvision ResNet's weights load with only the head's keys missing.

GloRe's 1/L normalisation is on: segmentation inputs vary in size, and without it the
interaction-space features grow with the number of locations.

``fcn_dgnet_resnet50`` is the same FCN on a DG-Net backbone (every dilated stage a
routed DAG of its blocks), so dense predictions record per-image paths too.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Final

import torchvision
from torch import nn
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.resnet import Bottleneck, ResNet
from torchvision.models.segmentation.fcn import FCN, FCNHead

from dgserve.models.dgnet.backbones import StageOptions, dgnet_from_torchvision
from dgserve.models.dgnet.routing import RoutingKind
from dgserve.models.dgnet.stage import DEFAULT_TAU
from dgserve.models.dgnet.wiring import WiringKind
from dgserve.models.glore.unit import GloReUnit2d
from dgserve.models.registry import register_model
from dgserve.models.widths import set_widths

__all__ = ["GloReSegHead", "apply_multi_grid", "dilation_for", "fcn_on"]

MULTI_GRID: Final = (1, 2, 4)
"""DeepLab v3's multi-grid unit rates for the last stage, times its base dilation."""


def dilation_for(output_stride: int) -> list[bool]:
    """torchvision's ``replace_stride_with_dilation`` flags for an output stride of 8 or 16."""
    flags = {8: [False, True, True], 16: [False, False, True]}
    if output_stride not in flags:
        raise ValueError(f"output_stride must be 8 or 16, got {output_stride}")
    return flags[output_stride]


def apply_multi_grid(stage: nn.Module, grid: Sequence[int]) -> None:
    """Give block i of a dilated stage the 3x3 dilation ``base * grid[i]`` (multi-grid).

    torchvision's dilated ``_make_layer`` gives the first block the previous stage's
    dilation and the rest the stage's own (``base``); multi-grid instead gives every
    block ``base`` times its grid rate, the grid repeating over deeper stages. Padding
    follows the dilation, so shapes are unchanged.
    """
    convs = [getattr(block, "conv2", None) for block in stage.children()]
    for conv in convs:
        if not isinstance(conv, nn.Conv2d) or conv.kernel_size != (3, 3):
            raise TypeError(f"multi-grid needs a 3x3 conv2 in every block, got {type(conv).__name__}")
    base = max(conv.dilation[0] for conv in convs)  # type: ignore[union-attr]
    for i, conv in enumerate(convs):
        assert isinstance(conv, nn.Conv2d)
        rate = base * grid[i % len(grid)]
        conv.dilation, conv.padding = (rate, rate), (rate, rate)


class GloReSegHead(nn.Sequential):
    """conv 3x3 + BN + ReLU, ``num_units`` GloRe units, then torchvision's ``FCNHead``.

    The units sit between two convolution layers just before the final 1x1 classifier,
    where the paper appends them. The first conv reduces the backbone's channels to
    ``channels`` (the paper's 512 for a ResNet-50's 2048).
    """

    def __init__(self, in_channels: int, channels: int, num_classes: int, num_units: int) -> None:
        if num_units < 0:
            raise ValueError(f"num_units must be >= 0, got {num_units}")
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
        ]
        layers += [GloReUnit2d(channels, normalize=True) for _ in range(num_units)]
        layers.append(FCNHead(channels, num_classes))
        super().__init__(*layers)


def fcn_on(
    backbone: ResNet,
    num_classes: int,
    *,
    num_units: int,
    head_channels: int | None = None,
    aux_loss: bool = False,
    dgnet: StageOptions | None = None,
) -> FCN:
    """torchvision's FCN over ``backbone``'s ``layer4`` (and ``layer3`` for the auxiliary head).

    ``num_units=0`` is the plain FCN head (torchvision's ``FCNHead``), the paper's
    baseline row and the DG-Net FCN's head. ``dgnet`` turns the backbone's stages into
    DG-Net stages built so, once its channels are known.
    """
    stage4_channels = _out_channels(backbone.layer4)
    stage3_channels = _out_channels(backbone.layer3)
    if dgnet is not None:
        dgnet_from_torchvision(backbone, options=dgnet)
    returns = {"layer4": "out", "layer3": "aux"} if aux_loss else {"layer4": "out"}
    body = IntermediateLayerGetter(backbone, return_layers=returns)
    classifier: nn.Module
    if num_units == 0:
        classifier = FCNHead(stage4_channels, num_classes)
    else:
        classifier = GloReSegHead(stage4_channels, head_channels or stage4_channels // 4, num_classes, num_units)
    aux = FCNHead(stage3_channels, num_classes) if aux_loss else None
    return FCN(body, classifier, aux)


def _out_channels(stage: nn.Module) -> int:
    last = list(stage.children())[-1]
    return int(last.conv3.out_channels if isinstance(last, Bottleneck) else last.conv2.out_channels)  # type: ignore[union-attr]


def _dilated_resnet(
    build: Callable[..., ResNet], output_stride: int, multi_grid: Sequence[int] | None, **kwargs: Any
) -> ResNet:
    model = build(replace_stride_with_dilation=dilation_for(output_stride), **kwargs)
    if multi_grid:
        apply_multi_grid(model.layer4, multi_grid)
    return model


# --- the paper's networks -----------------------------------------------------------------


def _register_glore(name: str, build: Callable[..., ResNet], depth: int) -> None:
    def builder(
        num_classes: int = 19,
        *,
        num_units: int = 1,
        output_stride: int = 8,
        multi_grid: Sequence[int] | None = MULTI_GRID,
        head_channels: int = 512,
        aux_loss: bool = False,
    ) -> FCN:
        backbone = _dilated_resnet(build, output_stride, multi_grid)
        return fcn_on(backbone, num_classes, num_units=num_units, head_channels=head_channels, aux_loss=aux_loss)

    description = (
        f"FCN on a dilated ResNet-{depth} (output stride 8, multi-grid) with GloRe unit(s) before the "
        "classifier (GloRe Tables 3-4)."
    )
    builder.__name__, builder.__doc__ = name, description
    register_model(name, task="segmentation", family="glore", description=description)(builder)


_register_glore("fcn_glore_resnet50", torchvision.models.resnet50, 50)
_register_glore("fcn_glore_resnet101", torchvision.models.resnet101, 101)


@register_model("fcn_dgnet_resnet50", task="segmentation", family="dgnet")
def fcn_dgnet_resnet50(
    num_classes: int = 19,
    *,
    output_stride: int = 8,
    multi_grid: Sequence[int] | None = MULTI_GRID,
    tau_init: float = DEFAULT_TAU,
    routing: RoutingKind = "dynamic",
    wiring: WiringKind = "complete",
    wiring_seed: int = 0,
    aux_loss: bool = False,
) -> FCN:
    """FCN on a dilated DG-Net ResNet-50: every stage a routed DAG, paths recorded per image."""
    backbone = _dilated_resnet(torchvision.models.resnet50, output_stride, multi_grid)
    options = StageOptions(tau_init, routing, wiring, wiring_seed)
    return fcn_on(backbone, num_classes, num_units=0, aux_loss=aux_loss, dgnet=options)


# --- small variants that train on this CPU --------------------------------------------------


def slim_dilated_resnet(width: int, layers: Sequence[int], output_stride: int, multi_grid: Sequence[int] | None) -> ResNet:
    """Bottleneck ResNet at stage widths w-2w-4w-8w, dilated (torchvision's BasicBlock cannot dilate)."""
    model = ResNet(Bottleneck, list(layers))
    set_widths(model, Bottleneck, layers, [width, 2 * width, 4 * width, 8 * width], dilation_for(output_stride))
    if multi_grid:
        apply_multi_grid(model.layer4, multi_grid)
    return model


@register_model("fcn_glore_resnet_slim", task="segmentation", family="glore")
def fcn_glore_resnet_slim(
    num_classes: int = 9,
    *,
    width: int = 8,
    layers: Sequence[int] = (1, 1, 2, 1),
    num_units: int = 1,
    output_stride: int = 8,
    multi_grid: Sequence[int] | None = MULTI_GRID,
    head_channels: int | None = None,
) -> FCN:
    """The GloRe FCN on a slim dilated Bottleneck ResNet (stage widths w-2w-4w-8w, default w=8)."""
    backbone = slim_dilated_resnet(width, layers, output_stride, multi_grid)
    return fcn_on(backbone, num_classes, num_units=num_units, head_channels=head_channels)


@register_model("fcn_dgnet_resnet_slim", task="segmentation", family="dgnet")
def fcn_dgnet_resnet_slim(
    num_classes: int = 9,
    *,
    width: int = 8,
    layers: Sequence[int] = (2, 2, 2, 2),
    output_stride: int = 8,
    multi_grid: Sequence[int] | None = MULTI_GRID,
    tau_init: float = DEFAULT_TAU,
    routing: RoutingKind = "dynamic",
    wiring: WiringKind = "complete",
    wiring_seed: int = 0,
) -> FCN:
    """The DG-Net FCN on a slim dilated Bottleneck ResNet (stage widths w-2w-4w-8w, default w=8)."""
    backbone = slim_dilated_resnet(width, layers, output_stride, multi_grid)
    options = StageOptions(tau_init, routing, wiring, wiring_seed)
    return fcn_on(backbone, num_classes, num_units=0, dgnet=options)
