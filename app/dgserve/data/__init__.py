"""Procedural training and test data: shape scenes with labels exact by construction.

dgserve ships only models it trained itself, and no dataset download is reachable, so
the data comes from a generator: ``scenes`` composes images (numpy + Pillow only),
``datasets`` wraps them as torch Datasets, ``export`` writes ImageFolder and COCO copies.

The torch-backed names are imported lazily so ``dgserve.data.scenes`` stays usable (and
quick to import) without torch.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from .export import export_coco, export_image_folder, export_segmentation_folder
from .scenes import (
    BACKGROUNDS,
    CLASSIFICATION_CONFIG,
    DETECTION_CONFIG,
    NUM_CLASSES,
    SEGMENTATION_CONFIG,
    DetectionScene,
    SceneConfig,
    render_classification,
    render_detection,
    render_detection_scene,
    render_segmentation,
)
from .shapes import CLASSES

_LAZY = {
    "ShapesClassification": "datasets",
    "ShapesDetection": "datasets",
    "ShapesSegmentation": "datasets",
    "pil_to_tensor": "datasets",
}

__all__ = [
    "BACKGROUNDS",
    "CLASSES",
    "CLASSIFICATION_CONFIG",
    "DETECTION_CONFIG",
    "NUM_CLASSES",
    "SEGMENTATION_CONFIG",
    "DetectionScene",
    "SceneConfig",
    "ShapesClassification",
    "ShapesDetection",
    "ShapesSegmentation",
    "export_coco",
    "export_image_folder",
    "export_segmentation_folder",
    "pil_to_tensor",
    "render_classification",
    "render_detection",
    "render_detection_scene",
    "render_segmentation",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
