"""Architectures by name. ``create_model`` and ``list_models`` are the only entry points the server uses."""

from dgserve.models.connectivity import ImageConnectivity, collect_connectivity
from dgserve.models.registry import create_model, get_entry, list_models, register_model

__all__ = ["ImageConnectivity", "collect_connectivity", "create_model", "get_entry", "list_models", "register_model"]
