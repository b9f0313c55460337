"""Write procedural datasets to disk in the layouts the other data sources read.

* ``export_image_folder``: torchvision ImageFolder, ``root/<class name>/<index>.png``.
  Class folders sort into ``CLASSES`` order, so ImageFolder's indices are ours.
* ``export_coco``: ``root/images/<index>.png`` plus ``root/annotations.json``, COCO
  instances with category ids ``1..len(CLASSES)`` (the labels ``ShapesDetection``
  emits), image id = scene index, bbox in xywh, area = mask pixels, and the mask as
  compressed RLE so segmentation-aware loaders work too.

* ``export_segmentation_folder``: ``root/images/<index>.png``, ``root/masks/<index>.png``
  (8-bit label maps: 0 background, ``k + 1`` for ``CLASSES[k]``, the layout of VOC's
  ``SegmentationClass`` and Cityscapes' ``labelIds``) and ``root/labels.txt``, one
  class name per line in index order.

Files are PNG, so the exported pixels are exactly the rendered ones.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from PIL import Image

from .scenes import (
    CLASSIFICATION_CONFIG, DETECTION_CONFIG, SEGMENTATION_CONFIG, SceneConfig, render_classification,
    render_detection_scene, render_segmentation,
)
from .shapes import CLASSES

COCO_ANNOTATIONS = "annotations.json"
COCO_IMAGES = "images"
SEGMENTATION_IMAGES = "images"
SEGMENTATION_MASKS = "masks"
SEGMENTATION_LABELS = "labels.txt"


def _file_name(index: int, n: int) -> str:
    return f"{index:0{max(6, len(str(n - 1)))}d}.png"


def export_image_folder(
    root: str | Path, n: int, seed: int, size: int = 64, config: SceneConfig = CLASSIFICATION_CONFIG
) -> Path:
    """Render ``ShapesClassification(n, seed, size)`` into an ImageFolder tree; returns root.

    ``n`` must be at least ``len(CLASSES)``: labels cycle through the classes, and
    ImageFolder refuses a class folder with no images.
    """
    if n < len(CLASSES):
        raise ValueError(f"n must be >= {len(CLASSES)} so every class folder gets an image, got {n}")
    root = Path(root)
    for name in CLASSES:
        (root / name).mkdir(parents=True, exist_ok=True)
    for index in range(n):
        image, label = render_classification(seed, index, size, config)
        image.save(root / CLASSES[label] / _file_name(index, n))
    return root


def export_coco(
    root: str | Path,
    n: int,
    seed: int,
    size: int = 128,
    max_objects: int = 5,
    config: SceneConfig = DETECTION_CONFIG,
) -> Path:
    """Render ``ShapesDetection(n, seed, size, max_objects)`` as a COCO dataset under
    ``root``; returns the annotation file's path."""
    from pycocotools import mask as mask_utils  # only this exporter needs the C extension

    root = Path(root)
    (root / COCO_IMAGES).mkdir(parents=True, exist_ok=True)
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for index in range(n):
        scene = render_detection_scene(seed, index, size, max_objects, config)
        file_name = _file_name(index, n)
        scene.image.save(root / COCO_IMAGES / file_name)
        images.append({"id": index, "file_name": file_name, "width": size, "height": size})
        for box, label, mask in zip(scene.boxes, scene.labels, scene.masks, strict=True):
            rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
            rle["counts"] = rle["counts"].decode("ascii")
            x0, y0, x1, y1 = (float(v) for v in box)
            annotations.append(
                {
                    # COCOeval reads annotation id 0 as "unmatched", so ids start at 1.
                    "id": len(annotations) + 1,
                    "image_id": index,
                    "category_id": int(label) + 1,
                    "bbox": [x0, y0, x1 - x0, y1 - y0],
                    "area": float(mask.sum()),
                    "iscrowd": 0,
                    "segmentation": rle,
                }
            )
    dataset = {
        "info": {"description": f"dgserve procedural shapes, seed {seed}, {n} scenes at {size}px"},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": k + 1, "name": name, "supercategory": "shape"} for k, name in enumerate(CLASSES)],
    }
    path = root / COCO_ANNOTATIONS
    path.write_text(json.dumps(dataset))
    return path


def export_segmentation_folder(
    root: str | Path,
    n: int,
    seed: int,
    size: int = 96,
    max_objects: int = 3,
    config: SceneConfig = SEGMENTATION_CONFIG,
) -> Path:
    """Render ``ShapesSegmentation(n, seed, size, max_objects)`` as images and PNG masks; returns root."""
    root = Path(root)
    (root / SEGMENTATION_IMAGES).mkdir(parents=True, exist_ok=True)
    (root / SEGMENTATION_MASKS).mkdir(parents=True, exist_ok=True)
    for index in range(n):
        image, label_map = render_segmentation(seed, index, size, max_objects, config)
        image.save(root / SEGMENTATION_IMAGES / _file_name(index, n))
        Image.fromarray(label_map).save(root / SEGMENTATION_MASKS / _file_name(index, n))
    (root / SEGMENTATION_LABELS).write_text("\n".join(("background", *CLASSES)) + "\n")
    return root
