"""DG-Net: every stage of a CNN as a complete DAG of its blocks, routed per image."""

from dgserve.models.dgnet.backbones import dg_stages, dgnet_from_torchvision, pin_chain
from dgserve.models.dgnet.routing import Router, threshold_edges
from dgserve.models.dgnet.stage import DGStage, edge_l1

__all__ = ["DGStage", "Router", "dg_stages", "dgnet_from_torchvision", "edge_l1", "pin_chain", "threshold_edges"]
