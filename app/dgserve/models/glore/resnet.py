"""GloRe ResNets: torchvision's own ResNet with GloRe units after chosen blocks.

Units go inside the stage they follow: a stage's ``nn.Sequential`` is swapped for a
``GloReStage`` that keeps torchvision's child names ("0", "1", …) for its blocks and
holds the units in ``units``, keyed by the index of the block each one runs after.
State-dict keys of the backbone are therefore exactly torchvision's, so torchvision
ResNet weights load with only the ``.units.`` keys missing, and anything that walks a
torchvision ResNet by attribute name (detection's FPN extractor, layer freezing by
name prefix) keeps working.

Placements follow Table 2 of the paper and the official code (NOTES.md): "+3 at Res4"
puts units after blocks 1, 3 and 5 of Res4 (torchvision ``layer3[0]``, ``[2]``,
``[4]``); "+2 Res3 +3 Res4" adds units after blocks 1 and 3 of Res3 (``layer2[0]``,
``[2]``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Final

from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from dgserve.models.glore.unit import GloReUnit, GloReUnit2d
from dgserve.models.widths import set_widths
from dgserve.models.registry import register_model

Placement = Mapping[str, Sequence[int]]
"""Stage name (``"layer1"`` … ``"layer4"``) -> 0-based indices of the blocks a unit follows."""

RES4_PLACEMENT: Final[Placement] = {"layer3": (0, 2, 4)}
RES3_RES4_PLACEMENT: Final[Placement] = {"layer2": (0, 2), "layer3": (0, 2, 4)}

_STAGES: Final = ("layer1", "layer2", "layer3", "layer4")


class GloReStage(nn.Module):
    """A ResNet stage with GloRe units between (or after) its blocks."""

    def __init__(self, blocks: nn.Sequential, units: Mapping[int, GloReUnit]) -> None:
        super().__init__()
        self.num_blocks = len(blocks)
        for index in units:
            if not 0 <= index < self.num_blocks:
                raise ValueError(
                    f"GloRe unit after block {index}, but the stage has {self.num_blocks} blocks"
                )
        # Re-registering the blocks under their Sequential names keeps the state-dict
        # keys ("layer3.0.conv1.weight", …) identical to torchvision's.
        for name, block in blocks.named_children():
            self.add_module(name, block)
        self.units = nn.ModuleDict({str(i): units[i] for i in sorted(units)})

    def blocks(self) -> Iterator[nn.Module]:
        for index in range(self.num_blocks):
            yield self.get_submodule(str(index))

    def __getitem__(self, index: int) -> nn.Module:
        # Sequential-style indexing, so code written for torchvision's layer[i] still works.
        if not -self.num_blocks <= index < self.num_blocks:
            raise IndexError(f"block index {index} out of range for {self.num_blocks} blocks")
        return self.get_submodule(str(index % self.num_blocks))

    def __len__(self) -> int:
        return self.num_blocks

    def __iter__(self) -> Iterator[nn.Module]:
        return self.blocks()

    def forward(self, x: Tensor) -> Tensor:
        for index, block in enumerate(self.blocks()):
            x = block(x)
            key = str(index)
            if key in self.units:
                x = self.units[key](x)
        return x


class GloReResNet(ResNet):
    """torchvision's ResNet with GloRe units placed per ``placement``.

    ``norm_layer`` is the backbone's normalisation only (e.g. ``FrozenBatchNorm2d``
    for detection); the units always use their own trainable BatchNorm. ``normalize``
    turns on the units' 1/L scaling, for inputs whose size varies. ``num_nodes`` and
    ``num_states`` map a unit's input channels C to N and S (default C/4 and C/2).
    Other keyword arguments (``groups``, ``width_per_group``,
    ``replace_stride_with_dilation``, ``zero_init_residual``) go to ``ResNet``.
    """

    def __init__(
        self,
        block: type[BasicBlock | Bottleneck],
        layers: Sequence[int],
        placement: Placement,
        *,
        num_classes: int = 1000,
        norm_layer: Callable[..., nn.Module] | None = None,
        normalize: bool = False,
        num_nodes: Callable[[int], int] | None = None,
        num_states: Callable[[int], int] | None = None,
        widths: Sequence[int] | None = None,
        **resnet_kwargs: Any,
    ) -> None:
        super().__init__(
            block, list(layers), num_classes=num_classes, norm_layer=norm_layer, **resnet_kwargs
        )
        if widths is not None:
            set_widths(self, block, layers, widths)
        self.placement: dict[str, tuple[int, ...]] = {}
        for stage_name, indices in placement.items():
            if stage_name not in _STAGES:
                raise ValueError(f"unknown stage {stage_name!r}; expected one of {_STAGES}")
            if not indices:
                continue
            blocks: nn.Sequential = getattr(self, stage_name)
            units: dict[int, GloReUnit2d] = {}
            for index in sorted(set(indices)):
                if not 0 <= index < len(blocks):
                    raise ValueError(
                        f"{stage_name} has {len(blocks)} blocks; no block {index} to follow"
                    )
                channels = _block_out_channels(blocks[index])
                units[index] = GloReUnit2d(
                    channels,
                    num_nodes(channels) if num_nodes is not None else None,
                    num_states(channels) if num_states is not None else None,
                    normalize=normalize,
                )
            setattr(self, stage_name, GloReStage(blocks, units))
            self.placement[stage_name] = tuple(sorted(units))

    def glore_units(self) -> Iterator[tuple[str, GloReUnit2d]]:
        """(qualified name, unit) for every GloRe unit, in forward order."""
        for name, module in self.named_modules():
            if isinstance(module, GloReUnit2d):
                yield name, module


def _block_out_channels(block: nn.Module) -> int:
    # The last conv of the residual branch sets the block's output width: conv3 in a
    # Bottleneck, conv2 in a BasicBlock (checked in that order: a Bottleneck has both).
    for attr in ("conv3", "conv2"):
        conv = getattr(block, attr, None)
        if isinstance(conv, nn.Conv2d):
            return conv.out_channels
    raise TypeError(f"cannot tell the output channels of a {type(block).__name__}")


# torchvision has no ResNet-200 builder; [3, 24, 36, 3] Bottlenecks is He et al.'s
# (2016, "Identity Mappings") depth-200 layout, here in torchvision's post-activation form.
_RESNET200_LAYERS: Final = (3, 24, 36, 3)


def _registered(
    name: str,
    layers: Sequence[int],
    placement: Placement,
    description: str,
    **fixed: Any,
) -> Callable[..., GloReResNet]:
    """Register one Table 2 network; ``fixed`` holds ResNet arguments such as ResNeXt's groups."""

    def builder(
        num_classes: int = 1000,
        *,
        norm_layer: Callable[..., nn.Module] | None = None,
        normalize: bool = False,
        **kw: Any,
    ) -> GloReResNet:
        return GloReResNet(
            Bottleneck, layers, placement, num_classes=num_classes, norm_layer=norm_layer, normalize=normalize,
            **fixed, **kw,
        )  # fmt: skip

    builder.__name__ = name
    builder.__doc__ = description
    return register_model(name, task="classification", family="glore", description=description)(builder)


glore_resnet50 = _registered(
    "glore_resnet50", [3, 4, 6, 3], RES4_PLACEMENT, "ResNet-50 with 3 GloRe units at Res4 (GloRe Table 2)."
)
glore_resnet50_2_3 = _registered(
    "glore_resnet50_2_3", [3, 4, 6, 3], RES3_RES4_PLACEMENT,
    "ResNet-50 with 2 GloRe units at Res3 and 3 at Res4 (GloRe Table 2).",
)  # fmt: skip
glore_resnet101 = _registered(
    "glore_resnet101", [3, 4, 23, 3], RES3_RES4_PLACEMENT, "ResNet-101 with 2 GloRe units at Res3 and 3 at Res4."
)
glore_resnext101_32x4d = _registered(
    "glore_resnext101_32x4d", [3, 4, 23, 3], RES3_RES4_PLACEMENT,
    "ResNeXt-101 (32x4d) with 2 GloRe units at Res3 and 3 at Res4 (GloRe Table 2).",
    groups=32, width_per_group=4,
)  # fmt: skip
glore_resnet200 = _registered(
    "glore_resnet200", _RESNET200_LAYERS, RES4_PLACEMENT, "ResNet-200 with 3 GloRe units at Res4 (GloRe Table 2)."
)
glore_resnet200_2_3 = _registered(
    "glore_resnet200_2_3", _RESNET200_LAYERS, RES3_RES4_PLACEMENT,
    "ResNet-200 with 2 GloRe units at Res3 and 3 at Res4 (GloRe Table 2).",
)  # fmt: skip
