"""torchvision ResNets at other widths.

torchvision's ``ResNet`` fixes its stage widths at 64-128-256-512. The small models
dgserve trains on CPU and ships in its store keep the ResNet-18 layout at a fraction
of that width. ``set_widths`` rebuilds the stem, stages and head of a torchvision
``ResNet`` with torchvision's own ``_make_layer`` and the same initialisation, so the
result is still a torchvision ResNet (DG-Net and GloRe wrap it unchanged).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet


def set_widths(
    model: ResNet,
    block: type[BasicBlock | Bottleneck],
    layers: Sequence[int],
    widths: Sequence[int],
    replace_stride_with_dilation: Sequence[bool] = (False, False, False),
) -> None:
    """Rebuild ``model`` at stage ``widths``; ``replace_stride_with_dilation`` as torchvision's ResNet takes it."""
    if len(widths) != 4 or len(layers) != 4:
        raise ValueError(f"need 4 widths and 4 stage depths, got {list(widths)} and {list(layers)}")
    if len(replace_stride_with_dilation) != 3:
        raise ValueError(f"replace_stride_with_dilation needs 3 flags, got {list(replace_stride_with_dilation)}")
    dilate = list(replace_stride_with_dilation)
    norm = model._norm_layer
    model.inplanes = widths[0]
    model.dilation = 1  # _make_layer accumulates it, as in ResNet.__init__
    model.conv1 = nn.Conv2d(3, widths[0], kernel_size=7, stride=2, padding=3, bias=False)
    model.bn1 = norm(widths[0])
    model.layer1 = model._make_layer(block, widths[0], layers[0])
    model.layer2 = model._make_layer(block, widths[1], layers[1], stride=2, dilate=dilate[0])
    model.layer3 = model._make_layer(block, widths[2], layers[2], stride=2, dilate=dilate[1])
    model.layer4 = model._make_layer(block, widths[3], layers[3], stride=2, dilate=dilate[2])
    model.fc = nn.Linear(widths[3] * block.expansion, model.fc.out_features)
    for m in model.modules():  # as torchvision's ResNet.__init__
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d | nn.GroupNorm):
            nn.init.constant_(m.weight, 1)
            nn.init.constant_(m.bias, 0)


def slim_resnet18(width: int, num_classes: int, norm_layer: type[nn.Module] | None = None) -> ResNet:
    """ResNet-18's layout (BasicBlocks, 2-2-2-2) at stage widths w, 2w, 4w, 8w."""
    model = ResNet(BasicBlock, [2, 2, 2, 2], num_classes=num_classes, norm_layer=norm_layer)
    set_widths(model, BasicBlock, [2, 2, 2, 2], [width, 2 * width, 4 * width, 8 * width])
    return model
