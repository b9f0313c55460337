"""GloRe on video (GloRe section 4.4, Table 5): I3D-style 3-D ResNets with 3-D GloRe units.

Built from torchvision's video ResNet blocks (``torchvision.models.video.resnet``:
``Bottleneck``, ``BasicBlock``, ``Conv3DSimple``); what torchvision's ``VideoResNet``
cannot express is added here, following the paper and the official PyTorch code
(facebookresearch/GloRe ``network/resnet50_3d_gcn_x5.py``, read, not copied):

* the stem is a 3×5×5 convolution, stride (1, 2, 2), then a (1, 3, 3) max-pool of
  stride (1, 2, 2) -- the paper's "3 × 5 × 5 instead of 7 × 7 × 7, for speed";
* I3D inflation per block, not per stage: a block is "3-D" when its first 1×1×1
  convolution is inflated to 3×1×1 (its 3×3 stays 1×3×3). 3-D blocks are every block
  of Res2, the odd blocks (1-based) of Res3 and Res4, and the middle block of Res5;
* time is halved once, by the first block of Res3 (stride (2, 2, 2)), so an 8-frame
  clip ends Res5 with 4 frames;
* five 3-D GloRe units: after blocks 1 and 3 of Res3 and 1, 3 and 5 of Res4, the same
  positions as the image networks' "+2 Res3 +3 Res4" (``RES3_RES4_PLACEMENT``).

The stem is 64 channels wide, as the ImageNet ResNet-50 that the paper inflates (the
official code's "lite" stem has 32). Module names follow torchvision's ResNet
(``stem``, ``layer1`` … ``layer4``, ``fc``), and units live in ``GloReStage`` as in the
image networks, so a unit's name (``layer3.units.0``) means the same in both.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from functools import partial
from typing import Any, Final

from torch import Tensor, nn
from torchvision.models.video.resnet import BasicBlock, Bottleneck, Conv3DSimple

from dgserve.models.glore.resnet import RES3_RES4_PLACEMENT, GloReStage, Placement
from dgserve.models.glore.unit import GloReUnit3d
from dgserve.models.registry import register_model

__all__ = ["GloReVideoResNet", "VIDEO_TASK", "i3d_inflation"]

VIDEO_TASK: Final = "video_classification"
_STAGES: Final = ("layer1", "layer2", "layer3", "layer4")

Inflation = Sequence[Sequence[bool]]
"""Per stage, per block: whether the block is 3-D (sees several frames at once)."""


def i3d_inflation(layers: Sequence[int]) -> list[list[bool]]:
    """The official code's pattern: all of Res2, odd blocks of Res3/Res4, Res5's middle block."""
    res2, res3, res4, res5 = layers
    return [
        [True] * res2,
        [i % 2 == 0 for i in range(res3)],
        [i % 2 == 0 for i in range(res4)],
        [i == res5 // 2 for i in range(res5)],
    ]


class SpatialConv3d(nn.Conv3d):
    """A torchvision conv builder: ``t``×3×3 (``Conv3DNoTemporal`` for t = 1) whose stride
    can also halve time. Time is strided only where space is (a block's first conv)."""

    def __init__(
        self,
        in_planes: int,
        out_planes: int,
        midplanes: int | None = None,
        stride: int = 1,
        padding: int = 1,
        *,
        temporal_kernel: int = 1,
        temporal_stride: int = 1,
    ) -> None:
        super().__init__(
            in_planes, out_planes, kernel_size=(temporal_kernel, 3, 3),
            stride=(temporal_stride if stride > 1 else 1, stride, stride),
            padding=(temporal_kernel // 2, padding, padding), bias=False,
        )  # fmt: skip


def _stem(width: int, maxpool: bool) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv3d(3, width, kernel_size=(3, 5, 5), stride=(1, 2, 2), padding=(1, 2, 2), bias=False),
        nn.BatchNorm3d(width),
        nn.ReLU(inplace=True),
    ]
    if maxpool:
        layers.append(nn.MaxPool3d(kernel_size=(1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1)))
    return nn.Sequential(*layers)


class GloReVideoResNet(nn.Module):
    """A 3-D ResNet of torchvision video blocks with 3-D GloRe units placed per ``placement``.

    Input ``(n, 3, T, H, W)``. ``inflation`` says which blocks are 3-D: a 3-D
    ``Bottleneck`` gets a 3×1×1 first convolution (I3D), a 3-D ``BasicBlock`` 3×3×3
    convolutions (torchvision's ``Conv3DSimple``, as in its R3D-18); 2-D blocks keep
    1×3×3. ``temporal_strides`` halve time at each stage's first block (where the
    stage also strides space).
    """

    def __init__(
        self,
        block: type[BasicBlock | Bottleneck],
        layers: Sequence[int],
        widths: Sequence[int],
        placement: Placement,
        *,
        inflation: Inflation,
        temporal_strides: Sequence[int] = (1, 2, 1, 1),
        num_classes: int = 400,
        stem_width: int = 64,
        stem_maxpool: bool = True,
        dropout: float = 0.0,
        normalize: bool = False,
    ) -> None:
        super().__init__()
        if not len(layers) == len(widths) == len(temporal_strides) == len(inflation) == 4:
            raise ValueError("need 4 stage depths, widths, temporal strides and inflation patterns")
        self.stem = _stem(stem_width, stem_maxpool)
        inplanes = stem_width
        stages: list[nn.Sequential] = []
        stages_spec = zip(layers, widths, temporal_strides, inflation, strict=True)
        for index, (depth, width, t_stride, inflate) in enumerate(stages_spec):
            if len(inflate) != depth:
                raise ValueError(f"stage {index + 1} has {depth} blocks but {len(inflate)} inflation flags")
            stride = 1 if index == 0 else 2
            stages.append(_stage(block, inplanes, width, depth, stride, t_stride, inflate))
            inplanes = width * block.expansion
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool3d(1)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(inplanes, num_classes)
        _init_backbone(self)  # before the units, whose BatchNorm starts at zero on purpose
        self.placement: dict[str, tuple[int, ...]] = {}
        for stage_name, indices in placement.items():
            if stage_name not in _STAGES:
                raise ValueError(f"unknown stage {stage_name!r}; expected one of {_STAGES}")
            blocks: nn.Sequential = getattr(self, stage_name)
            channels = widths[_STAGES.index(stage_name)] * block.expansion
            units = {i: GloReUnit3d(channels, normalize=normalize) for i in sorted(set(indices))}
            setattr(self, stage_name, GloReStage(blocks, units))
            self.placement[stage_name] = tuple(sorted(units))

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 5 or x.shape[1] != 3:
            raise ValueError(f"expected clips of shape (n, 3, T, H, W), got {tuple(x.shape)}")
        x = self.stem(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.dropout(self.avgpool(x).flatten(1)))

    def glore_units(self) -> Iterator[tuple[str, GloReUnit3d]]:
        """(qualified name, unit) for every GloRe unit, in forward order."""
        for name, module in self.named_modules():
            if isinstance(module, GloReUnit3d):
                yield name, module


def _stage(
    block: type[BasicBlock | Bottleneck],
    inplanes: int,
    planes: int,
    depth: int,
    stride: int,
    temporal_stride: int,
    inflate: Sequence[bool],
) -> nn.Sequential:
    out_planes = planes * block.expansion
    blocks: list[nn.Module] = []
    for i in range(depth):
        first = i == 0
        # A Bottleneck is inflated on its first 1×1 (below); its 3×3 stays spatial.
        t_kernel = 3 if inflate[i] and block is BasicBlock else 1
        t_stride = temporal_stride if first else 1
        builder: Callable[..., nn.Module]
        if t_kernel == 3 and t_stride == (stride if first else 1):
            builder = Conv3DSimple  # torchvision's own 3×3×3, which strides time as it strides space
        else:
            builder = partial(SpatialConv3d, temporal_kernel=t_kernel, temporal_stride=t_stride)
        downsample = None
        if first and (stride != 1 or temporal_stride != 1 or inplanes != out_planes):
            downsample = nn.Sequential(
                nn.Conv3d(inplanes, out_planes, kernel_size=1, stride=(temporal_stride, stride, stride), bias=False),
                nn.BatchNorm3d(out_planes),
            )
        residual = block(inplanes, planes, builder, stride if first else 1, downsample)
        if inflate[i] and block is Bottleneck:
            # I3D: the first 1×1 becomes 3×1×1, so the block mixes neighbouring frames.
            residual.conv1[0] = nn.Conv3d(inplanes, planes, kernel_size=(3, 1, 1), padding=(1, 0, 0), bias=False)
        blocks.append(residual)
        inplanes = out_planes
    return nn.Sequential(*blocks)


def _init_backbone(model: nn.Module) -> None:
    # As torchvision's VideoResNet.__init__.
    for m in model.modules():
        if isinstance(m, nn.Conv3d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm3d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)


def _i3d(layers: Sequence[int], num_classes: int, dropout: float, normalize: bool, **kw: Any) -> GloReVideoResNet:
    return GloReVideoResNet(
        Bottleneck, layers, (64, 128, 256, 512), RES3_RES4_PLACEMENT, inflation=i3d_inflation(layers),
        num_classes=num_classes, dropout=dropout, normalize=normalize, **kw,
    )  # fmt: skip


@register_model("glore_resnet50_3d", task=VIDEO_TASK, family="glore")
def glore_resnet50_3d(num_classes: int = 400, *, dropout: float = 0.5, normalize: bool = False) -> GloReVideoResNet:
    """I3D ResNet-50 (3×5×5 stem) with 2 GloRe units at Res3 and 3 at Res4 (GloRe Table 5)."""
    return _i3d((3, 4, 6, 3), num_classes, dropout, normalize)


@register_model("glore_resnet101_3d", task=VIDEO_TASK, family="glore")
def glore_resnet101_3d(num_classes: int = 400, *, dropout: float = 0.5, normalize: bool = False) -> GloReVideoResNet:
    """I3D ResNet-101 (3×5×5 stem) with 2 GloRe units at Res3 and 3 at Res4 (GloRe Table 5)."""
    return _i3d((3, 4, 23, 3), num_classes, dropout, normalize)


@register_model("glore_resnet18_3d_slim", task=VIDEO_TASK, family="glore")
def glore_resnet18_3d_slim(
    num_classes: int = 400, *, width: int = 16, maxpool: bool = False, normalize: bool = False
) -> GloReVideoResNet:
    """R3D-18's layout (3×3×3 BasicBlocks) at widths w-2w-4w-8w, one 3-D GloRe unit after the first block of Res3 and Res4.

    For small clips (32-64 px) trained on a CPU: no max-pool after the stem by default,
    and every stage after the first halves time, as torchvision's R3D-18 does.
    """
    return GloReVideoResNet(
        BasicBlock, (2, 2, 2, 2), (width, 2 * width, 4 * width, 8 * width), {"layer2": (0,), "layer3": (0,)},
        inflation=[[True, True]] * 4, temporal_strides=(1, 2, 2, 2), num_classes=num_classes,
        stem_width=width, stem_maxpool=maxpool, normalize=normalize,
    )  # fmt: skip
