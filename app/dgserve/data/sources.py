"""Where ``dgserve train`` reads its data: generated scenes, an ImageFolder, COCO JSON, image/mask folders.

Each task picks the sources it supports and the transform that makes its inputs
(``dgserve.tasks``); this module only reads. Every transform a task passes is the
server's own preprocessing, so a model is trained on exactly the tensors it will see
in production. Items are pure functions of their index, so DataLoader workers change
nothing.
"""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image
from torch.utils.data import Dataset, Subset

from dgserve.data.shapes import CLASSES
from dgserve.imaging import to_rgb

if TYPE_CHECKING:
    from dgserve.training.config import TrainConfig


__all__ = [
    "CocoDetection", "DataBundle", "MaskFolder", "coco", "generated_description", "image_folder", "load_rgb",
    "mask_folder", "quiet", "split",
]

@dataclass
class DataBundle:
    train: Dataset[Any]
    val: Dataset[Any]
    labels: list[str]
    """Class names; for detection without background (label k is ``labels[k - 1]``)."""
    description: str
    """One paragraph for the model card."""


def generated_description(config: TrainConfig, what: str) -> str:
    """The model card's paragraph for a run on the shapes generator."""
    return (
        f"Procedurally generated ({what}; `dgserve.data`, {len(CLASSES)} classes: {', '.join(CLASSES)}). "
        f"Training: {config.train_size} images, seed {config.data_seed}. "
        f"Held-out: {config.val_size} images, seed {config.val_seed}."
    )


# --- folders and files ----------------------------------------------------------------


def image_folder(config: TrainConfig, transform: Callable[[Image.Image], Any]) -> DataBundle:
    """An ImageFolder (one folder per class) at ``config.data_path``."""
    from torchvision.datasets import ImageFolder

    def open_set(path: Path) -> tuple[Dataset[Any], list[str]]:
        dataset = ImageFolder(str(path), transform=transform, loader=load_rgb)
        return dataset, list(dataset.classes)

    return _bundle(config, open_set, "ImageFolder", "classes")


def coco(config: TrainConfig, transform: Callable[[Image.Image], tuple[torch.Tensor, float]]) -> DataBundle:
    """A COCO instances JSON at ``config.data_path``, images beside it."""

    def open_set(path: Path) -> tuple[Dataset[Any], list[str]]:
        dataset = CocoDetection(path, transform)
        return dataset, dataset.labels

    return _bundle(config, open_set, "COCO", "categories")


def mask_folder(config: TrainConfig, transform: Callable[[Image.Image, Image.Image], Any]) -> DataBundle:
    """Images with PNG label maps at ``config.data_path`` (see ``MaskFolder``)."""

    def open_set(path: Path) -> tuple[Dataset[Any], list[str]]:
        dataset = MaskFolder(path, transform)
        return dataset, dataset.labels

    return _bundle(config, open_set, "Image and mask folders", "classes")


def _bundle(
    config: TrainConfig, open_set: Callable[[Path], tuple[Dataset[Any], list[str]]], what: str, noun: str
) -> DataBundle:
    """Training set from ``data_path``; held out from ``val_path``, else a seeded split of it."""
    assert config.data_path is not None
    train: Dataset[Any]
    val: Dataset[Any]
    train, labels = open_set(config.data_path)
    if config.val_path is not None:
        val, val_labels = open_set(config.val_path)
        if val_labels != labels:
            raise ValueError(f"{config.val_path} has {noun} {val_labels}, {config.data_path} has {labels}")
        held_out = f"held-out: {len(val)} images from `{config.val_path}`"  # type: ignore[arg-type]
    else:
        train, val = split(train, config.val_fraction, config.seed)
        held_out = f"held-out: a seeded {config.val_fraction:.0%} split ({len(val)} images)"  # type: ignore[arg-type]
    description = (
        f"{what} `{config.data_path}`: {len(train)} training images, {len(labels)} {noun}; {held_out}."  # type: ignore[arg-type]
    )
    return DataBundle(train, val, labels, description)


def load_rgb(path: str) -> Image.Image:
    with Image.open(path) as img:
        return to_rgb(img.copy())


class CocoDetection(Dataset[tuple[torch.Tensor, dict[str, torch.Tensor]]]):
    """A COCO instances file read into torchvision detection targets.

    Images are looked up as ``<annotation dir>/images/<file_name>``, then
    ``<annotation dir>/<file_name>`` (the layout ``dgserve.data.export_coco`` writes,
    and COCO's own with ``file_name`` relative to the JSON). Category ids map to
    contiguous labels 1..K in ascending id order; crowd annotations are skipped.
    ``transform`` maps an RGB image to ``(tensor, scale)``; boxes are scaled alike.
    """

    def __init__(
        self, annotation_file: Path, transform: Callable[[Image.Image], tuple[torch.Tensor, float]]
    ) -> None:
        self.root = annotation_file.parent
        self.transform = transform
        data = json.loads(annotation_file.read_text())
        categories = sorted(data["categories"], key=lambda c: c["id"])
        self.labels = [str(c["name"]) for c in categories]
        self._label_of = {c["id"]: k + 1 for k, c in enumerate(categories)}
        self.images = sorted(data["images"], key=lambda im: im["id"])
        self._annotations: dict[int, list[dict[str, Any]]] = {im["id"]: [] for im in self.images}
        for ann in data["annotations"]:
            if not ann.get("iscrowd", 0):
                self._annotations[ann["image_id"]].append(ann)

    def __len__(self) -> int:
        return len(self.images)

    def _path(self, file_name: str) -> Path:
        nested = self.root / "images" / file_name
        return nested if nested.is_file() else self.root / file_name

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        info = self.images[index]
        image, scale = self.transform(load_rgb(str(self._path(info["file_name"]))))
        anns = self._annotations[info["id"]]
        boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]  # xywh -> xyxy
        target = {
            "boxes": boxes * scale,
            "labels": torch.tensor([self._label_of[a["category_id"]] for a in anns], dtype=torch.int64),
            "image_id": torch.tensor(int(info["id"]), dtype=torch.int64),
            "area": torch.tensor([float(a.get("area", 0.0)) for a in anns], dtype=torch.float32) * scale**2,
            "iscrowd": torch.zeros(len(anns), dtype=torch.int64),
        }
        return image, target


class MaskFolder(Dataset[Any]):
    """Semantic segmentation data as VOC and Cityscapes lay it out.

    ``root/images/<stem>.<ext>`` beside ``root/masks/<stem>.png``: an 8-bit label map
    whose pixel values are class indices (a palette PNG's indices, as VOC's
    ``SegmentationClass``, or a greyscale PNG, as Cityscapes' ``labelIds``); 255 marks
    pixels to ignore. Class names are ``root/labels.txt``, one per line, line k naming
    index k. ``transform`` maps ``(image, mask)`` jointly, since both must be resized alike.
    """

    IGNORE_INDEX = 255

    def __init__(self, root: Path, transform: Callable[[Image.Image, Image.Image], Any]) -> None:
        self.root, self.transform = Path(root), transform
        labels_file = self.root / "labels.txt"
        if not labels_file.is_file():
            raise ValueError(f"{labels_file} is missing: one class name per line, line k naming index k")
        self.labels = [line.strip() for line in labels_file.read_text().splitlines() if line.strip()]
        masks = {p.stem: p for p in sorted((self.root / "masks").glob("*.png"))}
        images = sorted(p for p in (self.root / "images").glob("*") if p.suffix.lower() in _IMAGE_SUFFIXES)
        self.pairs = [(image, masks[image.stem]) for image in images if image.stem in masks]
        if not self.pairs:
            raise ValueError(f"no image in {self.root / 'images'} has a mask of the same name in {self.root / 'masks'}")

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> Any:
        image_path, mask_path = self.pairs[index]
        with Image.open(mask_path) as mask:
            if mask.mode not in ("L", "P"):
                raise ValueError(f"{mask_path}: a label map must be an 8-bit greyscale or palette PNG, not {mask.mode}")
            # Never .convert(): that would map palette indices to colours.
            label_map = mask.copy()
        return self.transform(load_rgb(str(image_path)), label_map)


_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"}


def split(dataset: Dataset[Any], fraction: float, seed: int) -> tuple[Subset[Any], Subset[Any]]:
    """A seeded ``(train, held-out)`` split, ``fraction`` held out (at least one item)."""
    n = len(dataset)  # type: ignore[arg-type]
    n_val = max(1, round(n * fraction))
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return Subset(dataset, sorted(order[n_val:])), Subset(dataset, sorted(order[:n_val]))


def quiet() -> contextlib.redirect_stdout[io.StringIO]:
    """pycocotools prints progress to stdout; keep it out of the progress bars."""
    return contextlib.redirect_stdout(io.StringIO())
