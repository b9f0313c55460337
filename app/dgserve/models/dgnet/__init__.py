"""DG-Net: every stage of a CNN as a DAG of its blocks (complete, or a random baseline), routed per image."""

from dgserve.models.dgnet.backbones import StageOptions, dg_stages, dgnet_from_torchvision, pin_chain
from dgserve.models.dgnet.routing import Router, StaticRouter, threshold_edges
from dgserve.models.dgnet.execution import EXECUTION_KINDS
from dgserve.models.dgnet.stage import DGStage, set_execution
from dgserve.models.dgnet.wiring import StageWiring, stage_wiring

__all__ = [
    "EXECUTION_KINDS",
    "DGStage",
    "Router",
    "StageOptions",
    "StageWiring",
    "StaticRouter",
    "dg_stages",
    "dgnet_from_torchvision",
    "pin_chain",
    "set_execution",
    "stage_wiring",
    "threshold_edges",
]
