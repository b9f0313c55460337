"""The versioned model store: ``<root>/<name>/<version>/{manifest.json, model.safetensors, card.md}``."""

from dgserve.model_store.manifest import Batching, Manifest, Preprocessing, Thresholds, WeightsInfo
from dgserve.model_store.store import LoadedModel, ModelStore, StoredVersion

__all__ = [
    "Batching",
    "LoadedModel",
    "Manifest",
    "ModelStore",
    "Preprocessing",
    "StoredVersion",
    "Thresholds",
    "WeightsInfo",
]
