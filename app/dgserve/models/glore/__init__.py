"""GloRe (Chen et al., CVPR 2019): the Global Reasoning unit and GloRe ResNets.

Importing this package registers the GloRe classification and video classification models.
"""

from dgserve.models.glore import resnet, unit, video
from dgserve.models.glore.resnet import (
    RES3_RES4_PLACEMENT,
    RES4_PLACEMENT,
    GloReResNet,
    GloReStage,
)
from dgserve.models.glore.unit import GloReUnit, GloReUnit1d, GloReUnit2d, GloReUnit3d
from dgserve.models.glore.video import GloReVideoResNet

__all__ = [
    "RES3_RES4_PLACEMENT",
    "RES4_PLACEMENT",
    "GloReResNet",
    "GloReStage",
    "GloReUnit",
    "GloReUnit1d",
    "GloReUnit2d",
    "GloReUnit3d",
    "GloReVideoResNet",
    "resnet",
    "unit",
    "video",
]
