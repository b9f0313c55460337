"""torch Datasets over the procedural scenes, rendered lazily per index.

Rendering is a pure function of ``(seed, index)``, so these datasets hold no data, are
cheap to pickle into DataLoader workers and give the same sample whichever worker asks.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from .scenes import (
    CLASSIFICATION_CONFIG, DETECTION_CONFIG, SEGMENTATION_CONFIG, SceneConfig, render_classification,
    render_detection_scene, render_segmentation,
)
from .shapes import CLASSES

DetectionTarget = dict[str, torch.Tensor]


def _check_index(index: int, n: int) -> int:
    if index < 0:
        index += n
    if not 0 <= index < n:
        raise IndexError(f"index {index} out of range for a dataset of {n}")
    return index


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """float32 CHW in [0, 1], what torchvision detection models take."""
    # Transposing in numpy is single-threaded and far quicker than torch's parallel
    # permute-copy on a tensor this small, which would dominate loading otherwise.
    chw = np.ascontiguousarray(np.asarray(image).transpose(2, 0, 1), dtype=np.float32)
    return torch.from_numpy(chw / 255.0)


class ShapesClassification(Dataset[tuple[Any, int]]):
    """``n`` single-object images; item ``i`` is ``(image, label)``, label in
    ``0..len(CLASSES)-1``.

    Like torchvision's ImageFolder, the image is a PIL RGB image unless ``transform``
    maps it, so one transform pipeline serves this and an ImageFolder export alike.
    """

    classes: tuple[str, ...] = CLASSES

    def __init__(
        self,
        n: int,
        seed: int,
        size: int = 64,
        transform: Callable[[Image.Image], Any] | None = None,
        target_transform: Callable[[int], Any] | None = None,
        config: SceneConfig = CLASSIFICATION_CONFIG,
    ) -> None:
        if n < 0 or seed < 0:
            raise ValueError(f"n and seed must be non-negative, got n={n}, seed={seed}")
        self.n, self.seed, self.size = n, seed, size
        self.transform, self.target_transform, self.config = transform, target_transform, config

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        index = _check_index(index, self.n)
        image, label = render_classification(self.seed, index, self.size, self.config)
        sample: Any = self.transform(image) if self.transform is not None else image
        target: Any = self.target_transform(label) if self.target_transform is not None else label
        return sample, target


class ShapesDetection(Dataset[tuple[torch.Tensor, DetectionTarget]]):
    """``n`` scenes of 1..``max_objects`` objects in torchvision detection format.

    Item ``i`` is ``(image, target)``: image float32 [3, H, W] in [0, 1]; target has
    ``boxes`` float32 [K, 4] xyxy, ``labels`` int64 [K] in ``1..len(CLASSES)`` (0 is
    the background class of torchvision detectors, so label ``l`` is
    ``CLASSES[l - 1]``), ``image_id`` (= i, the id ``export_coco`` gives the same
    scene), ``area`` (mask pixels), ``iscrowd`` zeros, and ``masks`` uint8 [K, H, W]
    when ``with_masks``. ``transforms`` maps ``(image, target)`` jointly.
    """

    classes: tuple[str, ...] = CLASSES

    def __init__(
        self,
        n: int,
        seed: int,
        size: int = 128,
        max_objects: int = 5,
        transforms: Callable[[torch.Tensor, DetectionTarget], tuple[Any, Any]] | None = None,
        with_masks: bool = False,
        config: SceneConfig = DETECTION_CONFIG,
    ) -> None:
        if n < 0 or seed < 0:
            raise ValueError(f"n and seed must be non-negative, got n={n}, seed={seed}")
        self.n, self.seed, self.size, self.max_objects = n, seed, size, max_objects
        self.transforms, self.with_masks, self.config = transforms, with_masks, config

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        index = _check_index(index, self.n)
        scene = render_detection_scene(self.seed, index, self.size, self.max_objects, self.config)
        target: DetectionTarget = {
            "boxes": torch.from_numpy(scene.boxes),
            "labels": torch.from_numpy(scene.labels + 1),
            "image_id": torch.tensor(index, dtype=torch.int64),
            "area": torch.from_numpy(scene.masks.sum(axis=(1, 2)).astype(np.float32)),
            "iscrowd": torch.zeros(len(scene.labels), dtype=torch.int64),
        }
        if self.with_masks:
            target["masks"] = torch.from_numpy(scene.masks.astype(np.uint8))
        image = pil_to_tensor(scene.image)
        if self.transforms is not None:
            return self.transforms(image, target)
        return image, target


class ShapesSegmentation(Dataset[tuple[Any, torch.Tensor]]):
    """``n`` scenes of 1..``max_objects`` objects; item ``i`` is ``(image, label map)``.

    The label map is int64 [H, W]: 0 background, ``k + 1`` for ``CLASSES[k]`` (so the
    model's labels are ``("background", *CLASSES)``). The image is a PIL RGB image
    unless ``transform`` maps it, as for ``ShapesClassification``.
    """

    classes: tuple[str, ...] = ("background", *CLASSES)

    def __init__(
        self,
        n: int,
        seed: int,
        size: int = 96,
        max_objects: int = 3,
        transform: Callable[[Image.Image], Any] | None = None,
        config: SceneConfig = SEGMENTATION_CONFIG,
    ) -> None:
        if n < 0 or seed < 0:
            raise ValueError(f"n and seed must be non-negative, got n={n}, seed={seed}")
        self.n, self.seed, self.size, self.max_objects = n, seed, size, max_objects
        self.transform, self.config = transform, config

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> tuple[Any, torch.Tensor]:
        index = _check_index(index, self.n)
        image, label_map = render_segmentation(self.seed, index, self.size, self.max_objects, self.config)
        sample: Any = self.transform(image) if self.transform is not None else image
        return sample, torch.from_numpy(label_map.astype(np.int64))
