"""Per-image connectivity: the path each image took, one record kind per sort of module.

``base`` says what a kind is; each kind is one module. Registering a kind is the one
import line below; the API schema, ``?connectivity=false`` and the inspection store's
de-duplication follow from the kind's own declarations.
"""

from dgserve.connectivity.base import (
    Aggregate,
    ConnectivityRecord,
    ConnectivitySource,
    GraphDescription,
    ImageConnectivity,
    TensorField,
    describe,
    kind_of,
    kinds,
    register_kind,
    strip_matrices,
)

# The registered kinds, in the order their keys appear in the JSON.
from dgserve.connectivity import dgnet, glore  # noqa: E402,F401  (registration)
from dgserve.connectivity.dgnet import StageConnectivity, StageGraph  # noqa: E402
from dgserve.connectivity.glore import GloReUnitConnectivity, GloReUnitGraph  # noqa: E402

__all__ = [
    "Aggregate",
    "ConnectivityRecord",
    "ConnectivitySource",
    "GloReUnitConnectivity",
    "GloReUnitGraph",
    "GraphDescription",
    "ImageConnectivity",
    "StageConnectivity",
    "StageGraph",
    "TensorField",
    "describe",
    "kind_of",
    "kinds",
    "register_kind",
    "strip_matrices",
]
