"""DG-Net backbones: torchvision's own networks with every stage turned into a DGStage.

Each builder asks torchvision for the plain network, then replaces each stage's
``nn.Sequential`` by a ``DGStage`` holding the very same block modules under the
same names. The blocks, stem and head are torchvision's, unchanged; DG-Net adds
only routers and thresholds. Importing ImageNet weights is therefore a plain
``load_state_dict`` on the torchvision model before wrapping (see ``convert.py``).

Every builder also takes the paper's baselines as options: ``routing="static"``
(Table 6's α rows) and ``wiring="er" | "ba" | "ws"`` with ``wiring_seed`` (Table 4's
random DAGs), and ``execution="auto" | "skip" | "masked"`` (how skipped blocks run;
see ``stage.py``). They land in the manifest's arch_kwargs like any builder keyword, so
a stored model rebuilds the same graph.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torchvision
from torch import nn
from torchvision.models.mobilenetv2 import MobileNetV2
from torchvision.models.regnet import BlockParams, RegNet
from torchvision.models.resnet import ResNet
from torchvision.ops.misc import FrozenBatchNorm2d

from dgserve.models.dgnet.execution import ExecutionKind, check_execution
from dgserve.models.dgnet.routing import ROUTING_KINDS, RoutingKind
from dgserve.models.dgnet.stage import DEFAULT_TAU, DGStage
from dgserve.models.dgnet.wiring import WIRING_KINDS, WiringKind, stage_wiring
from dgserve.models.registry import register_model

RESNET_STAGES = ("layer1", "layer2", "layer3", "layer4")
REGNET_STAGES = ("block1", "block2", "block3", "block4")
# torchvision's MobileNetV2 keeps its 17 inverted-residual blocks in one flat
# `features`; the paper's stages are its (t, c, n, s) groups: 1, 2, 3, 4, 3, 3, 1 blocks.
MOBILENET_V2_GROUPS = (1, 2, 3, 4, 3, 3, 1)


def block_channels(block: nn.Module) -> int:
    """Output channels of a block: those of its last normalisation layer."""
    norms = [m for m in block.modules() if isinstance(m, nn.BatchNorm2d | FrozenBatchNorm2d)]
    if not norms:
        raise ValueError(f"cannot infer the output channels of {type(block).__name__}")
    return int(norms[-1].weight.shape[0])


@dataclass(frozen=True)
class StageOptions:
    """How every stage of one DG-Net is built: τ's start, the routing and the wiring."""

    tau_init: float = DEFAULT_TAU
    routing: RoutingKind = "dynamic"
    wiring: WiringKind = "complete"
    wiring_seed: int = 0
    execution: ExecutionKind = "auto"

    def __post_init__(self) -> None:
        # Checked here, at build time, so a bad manifest fails as it loads, not at first request.
        if self.routing not in ROUTING_KINDS:
            raise ValueError(f"routing must be one of {', '.join(ROUTING_KINDS)}, got {self.routing!r}")
        if self.wiring not in WIRING_KINDS:
            raise ValueError(f"wiring must be one of {', '.join(WIRING_KINDS)}, got {self.wiring!r}")
        if not isinstance(self.wiring_seed, int) or isinstance(self.wiring_seed, bool):
            raise ValueError(f"wiring_seed must be an integer, got {self.wiring_seed!r}")
        check_execution(self.execution)

    def stage(self, name: str, blocks: list[tuple[str, nn.Module]]) -> DGStage:
        # Each stage draws its own graph: the seed string names the stage too.
        wiring = stage_wiring(self.wiring, len(blocks), f"{self.wiring_seed}/{name}")
        return DGStage(
            blocks,
            block_channels(blocks[-1][1]),
            tau_init=self.tau_init,
            routing=self.routing,
            wiring=wiring,
            execution=self.execution,
        )


def make_stage(sequential: nn.Module, name: str, options: StageOptions) -> DGStage:
    return options.stage(name, list(sequential.named_children()))


def dgnet_from_torchvision(
    model: nn.Module, tau_init: float = DEFAULT_TAU, options: StageOptions | None = None
) -> nn.Module:
    """Turn a torchvision ResNet/ResNeXt, RegNet or MobileNetV2 into its DG-Net, in place.

    ``options`` (routing, wiring) default to the paper's DG-Net; ``tau_init`` is used
    only without them.
    """
    opts = options if options is not None else StageOptions(tau_init=tau_init)
    if isinstance(model, ResNet):
        for name in RESNET_STAGES:
            setattr(model, name, make_stage(getattr(model, name), name, opts))
    elif isinstance(model, RegNet):
        for name in REGNET_STAGES:
            setattr(model.trunk_output, name, make_stage(getattr(model.trunk_output, name), name, opts))
    elif isinstance(model, MobileNetV2):
        model.features = _group_mobilenet_features(model.features, opts)
    else:
        raise TypeError(f"no DG-Net adapter for {type(model).__name__}")
    return model


def _group_mobilenet_features(features: nn.Sequential, options: StageOptions) -> nn.Sequential:
    children = list(features.named_children())
    stem, blocks, last = children[0], children[1:-1], children[-1]
    if len(blocks) != sum(MOBILENET_V2_GROUPS):
        raise ValueError(f"expected {sum(MOBILENET_V2_GROUPS)} inverted-residual blocks, got {len(blocks)}")
    layers: OrderedDict[str, nn.Module] = OrderedDict([stem])
    start = 0
    for i, size in enumerate(MOBILENET_V2_GROUPS, start=1):
        layers[f"stage{i}"] = options.stage(f"stage{i}", blocks[start : start + size])
        start += size
    layers[last[0]] = last[1]
    return nn.Sequential(layers)


def dg_stages(model: nn.Module) -> list[tuple[str, DGStage]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, DGStage)]


def pin_chain(model: nn.Module) -> None:
    """Pin every stage's routers to the backbone's own chain wiring."""
    for _, stage in dg_stages(model):
        stage.pin_chain()


# --- plain torchvision networks that DG-Net wraps ------------------------------


def regnet_x_600mf(**kwargs: Any) -> RegNet:
    """RegNetX-600MF from pycls's published design (torchvision ships 400MF and 800MF only)."""
    params = BlockParams.from_init_params(depth=16, w_0=48, w_a=36.97, w_m=2.24, group_width=24)
    return RegNet(params, **kwargs)


def regnet_y_600mf(**kwargs: Any) -> RegNet:
    """RegNetY-600MF (SE ratio 0.25) from pycls's published design; torchvision ships 400MF and 800MF only."""
    params = BlockParams.from_init_params(depth=15, w_0=48, w_a=32.54, w_m=2.32, group_width=16, se_ratio=0.25)
    return RegNet(params, **kwargs)


TORCHVISION_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "dgnet_resnet18": torchvision.models.resnet18,
    "dgnet_resnet50": torchvision.models.resnet50,
    "dgnet_resnet101": torchvision.models.resnet101,
    "dgnet_resnext50_32x4d": torchvision.models.resnext50_32x4d,
    "dgnet_mobilenet_v2": torchvision.models.mobilenet_v2,
    "dgnet_regnet_x_600mf": regnet_x_600mf,
    "dgnet_regnet_x_1_6gf": torchvision.models.regnet_x_1_6gf,
    "dgnet_regnet_y_600mf": regnet_y_600mf,
}


def build_plain(arch: str, **kwargs: Any) -> nn.Module:
    """The static torchvision network under a DG-Net architecture name."""
    return TORCHVISION_BUILDERS[arch](**kwargs)


def _register(arch: str, description: str) -> None:
    def builder(
        num_classes: int = 1000,
        *,
        tau_init: float = DEFAULT_TAU,
        routing: RoutingKind = "dynamic",
        wiring: WiringKind = "complete",
        wiring_seed: int = 0,
        execution: ExecutionKind = "auto",
        **kwargs: Any,
    ) -> nn.Module:
        options = StageOptions(tau_init, routing, wiring, wiring_seed, execution)
        return dgnet_from_torchvision(build_plain(arch, num_classes=num_classes, **kwargs), options=options)

    builder.__name__ = arch
    builder.__doc__ = description
    register_model(arch, task="classification", family="dgnet", description=description)(builder)


for _arch, _desc in {
    "dgnet_resnet18": "DG-Net on ResNet-18 (BasicBlock nodes).",
    "dgnet_resnet50": "DG-Net on ResNet-50 (Bottleneck nodes).",
    "dgnet_resnet101": "DG-Net on ResNet-101 (Bottleneck nodes).",
    "dgnet_resnext50_32x4d": "DG-Net on ResNeXt-50 32x4d (aggregated Bottleneck nodes).",
    "dgnet_mobilenet_v2": "DG-Net on MobileNetV2 1.0 (inverted-residual nodes, one stage per (t,c,n,s) group).",
    "dgnet_regnet_x_600mf": "DG-Net on RegNetX-600MF (regular bottleneck nodes).",
    "dgnet_regnet_x_1_6gf": "DG-Net on RegNetX-1.6GF (regular bottleneck nodes).",
    "dgnet_regnet_y_600mf": "DG-Net-B: DG-Net on RegNetY-600MF (regular bottleneck nodes with SE).",
}.items():
    _register(_arch, _desc)
