"""The three data sources of ``dgserve train``: generated scenes, an ImageFolder, COCO JSON.

Every source yields what the *server* will feed the model, produced by the server's own
preprocessing functions (``dgserve.serving.images``), so a model is trained on exactly
the tensors it will see in production:

* classification: a normalised float32 [3, H, W] tensor and a class index;
* detection: a float32 [3, H, W] tensor in [0, 1] and a torchvision target dict
  (``boxes`` xyxy in that tensor's pixels, ``labels`` 1..K, 0 being background).

Items are pure functions of their index, so DataLoader workers change nothing.
"""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset, Subset

from dgserve.data.datasets import ShapesClassification, ShapesDetection
from dgserve.data.shapes import CLASSES
from dgserve.models.registry import Task
from dgserve.serving.images import preprocess_classification, preprocess_detection, to_rgb
from dgserve.store.manifest import Preprocessing
from dgserve.training.config import TrainConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class DataBundle:
    train: Dataset[Any]
    val: Dataset[Any]
    labels: list[str]
    """Class names; for detection without background (label k is ``labels[k - 1]``)."""
    description: str
    """One paragraph for the model card."""


def default_preprocessing(task: Task, size: int) -> Preprocessing:
    # Classification: center_crop at crop_fraction 1.0 leaves a square image of the
    # input size untouched (what training sees) and centre-crops anything else.
    # Detection: the detector resizes and normalises by itself; input_size only bounds
    # how large an upload is kept.
    return Preprocessing(
        input_size=(size, size),
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        interpolation="bilinear",
        resize="center_crop" if task == "classification" else "letterbox",
        crop_fraction=1.0,
    )


def build_data(config: TrainConfig, task: Task, pre: Preprocessing) -> DataBundle:
    if config.data == "generated":
        return _generated(config, task, pre)
    if config.data == "imagefolder":
        if task != "classification":
            raise ValueError("--data imagefolder is for classification; use --data coco for detection")
        return _image_folder(config, pre)
    if task != "detection":
        raise ValueError("--data coco is for detection; use --data imagefolder for classification")
    return _coco(config, pre)


# --- generated -----------------------------------------------------------------


def _generated(config: TrainConfig, task: Task, pre: Preprocessing) -> DataBundle:
    size = pre.input_size[0]
    if task == "classification":
        transform = partial(preprocess_classification, pre=pre)
        train: Dataset[Any] = ShapesClassification(config.train_size, config.data_seed, size, transform=transform)
        val: Dataset[Any] = ShapesClassification(config.val_size, config.val_seed, size, transform=transform)
        what = f"{size}x{size} single-shape images"
    else:
        train = ShapesDetection(config.train_size, config.data_seed, size, config.max_objects)
        val = ShapesDetection(config.val_size, config.val_seed, size, config.max_objects)
        what = f"{size}x{size} scenes of 1-{config.max_objects} shapes"
    description = (
        f"Procedurally generated ({what}; `dgserve.data`, {len(CLASSES)} classes: {', '.join(CLASSES)}). "
        f"Training: {config.train_size} images, seed {config.data_seed}. "
        f"Held-out: {config.val_size} images, seed {config.val_seed}."
    )
    return DataBundle(train, val, list(CLASSES), description)


# --- ImageFolder -----------------------------------------------------------------


def _image_folder(config: TrainConfig, pre: Preprocessing) -> DataBundle:
    from torchvision.datasets import ImageFolder

    assert config.data_path is not None
    transform = partial(preprocess_classification, pre=pre)
    train_full = ImageFolder(str(config.data_path), transform=transform, loader=_load_rgb)
    labels = list(train_full.classes)
    if config.val_path is not None:
        val_full = ImageFolder(str(config.val_path), transform=transform, loader=_load_rgb)
        if list(val_full.classes) != labels:
            raise ValueError(f"{config.val_path} has classes {val_full.classes}, {config.data_path} has {labels}")
        train, val = train_full, val_full
        held_out = f"held-out: {len(val_full)} images from `{config.val_path}`"
    else:
        train, val = _split(train_full, config.val_fraction, config.seed)
        held_out = f"held-out: a seeded {config.val_fraction:.0%} split ({len(val)} images)"
    description = (
        f"ImageFolder `{config.data_path}`: {len(train)} training images, {len(labels)} classes; {held_out}."
    )
    return DataBundle(train, val, labels, description)


def _load_rgb(path: str) -> Image.Image:
    with Image.open(path) as img:
        return to_rgb(img.copy())


# --- COCO ------------------------------------------------------------------------


class CocoDetection(Dataset[tuple[torch.Tensor, dict[str, torch.Tensor]]]):
    """A COCO instances file read into torchvision detection targets.

    Images are looked up as ``<annotation dir>/images/<file_name>``, then
    ``<annotation dir>/<file_name>`` (the layout ``dgserve.data.export_coco`` writes,
    and COCO's own with ``file_name`` relative to the JSON). Category ids map to
    contiguous labels 1..K in ascending id order; crowd annotations are skipped.
    """

    def __init__(self, annotation_file: Path, pre: Preprocessing) -> None:
        self.root = annotation_file.parent
        self.pre = pre
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
        with Image.open(self._path(info["file_name"])) as img:
            image, scale = preprocess_detection(to_rgb(img.copy()), self.pre)
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


def _coco(config: TrainConfig, pre: Preprocessing) -> DataBundle:
    assert config.data_path is not None
    train_full = CocoDetection(config.data_path, pre)
    if config.val_path is not None:
        val: Dataset[Any] = CocoDetection(config.val_path, pre)
        if val.labels != train_full.labels:  # type: ignore[attr-defined]
            raise ValueError(f"{config.val_path} and {config.data_path} have different categories")
        train: Dataset[Any] = train_full
        held_out = f"held-out: {len(val)} images from `{config.val_path}`"  # type: ignore[arg-type]
    else:
        train, val = _split(train_full, config.val_fraction, config.seed)
        held_out = f"held-out: a seeded {config.val_fraction:.0%} split ({len(val)} images)"  # type: ignore[arg-type]
    description = (
        f"COCO `{config.data_path}`: {len(train)} training images, "  # type: ignore[arg-type]
        f"{len(train_full.labels)} categories; {held_out}."
    )
    return DataBundle(train, val, train_full.labels, description)


def _split(dataset: Dataset[Any], fraction: float, seed: int) -> tuple[Subset[Any], Subset[Any]]:
    n = len(dataset)  # type: ignore[arg-type]
    n_val = max(1, round(n * fraction))
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return Subset(dataset, sorted(order[n_val:])), Subset(dataset, sorted(order[:n_val]))


# --- batches ---------------------------------------------------------------------


def collate_detection(batch: Sequence[tuple[Any, Any]]) -> tuple[list[Any], list[Any]]:
    images, targets = zip(*batch, strict=True)
    return list(images), list(targets)


def quiet() -> contextlib.redirect_stdout[io.StringIO]:
    """pycocotools prints progress to stdout; keep it out of the progress bars."""
    return contextlib.redirect_stdout(io.StringIO())
