"""Architectures by name. ``create_model`` and ``list_models`` are the only entry points the server uses."""

from dgserve.models.connectivity import collect_connectivity, describe_graph
from dgserve.models.registry import create_model, get_entry, list_models, register_model

__all__ = ["collect_connectivity", "describe_graph", "create_model", "get_entry", "list_models", "register_model"]
