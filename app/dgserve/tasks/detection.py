"""Detection: boxes with labels and scores, in the uploaded image's pixels.

Models are torchvision detectors (Faster R-CNN + FPN on DG-Net or GloRe backbones).
Their label convention differs from classification's: ``num_classes`` counts the
background class, labels do not, so class id ``k >= 1`` is ``labels[k - 1]``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any, ClassVar, Final

import numpy as np
import torch
from PIL import Image
from pydantic import BaseModel, Field
from torch import Tensor, nn
from torchvision.transforms.v2 import functional as F
from tqdm import tqdm

from dgserve.data.datasets import ShapesDetection
from dgserve.data.sources import DataBundle, coco, generated_description, quiet
from dgserve.imaging import interpolation_mode, resize, to_rgb
from dgserve.model_store.manifest import Manifest, Preprocessing, ResizeMode
from dgserve.tasks.base import InferenceItem, Options, Task, TensorSpec, ToDevice, register_task
from dgserve.training.augment import dihedral_detection
from dgserve.training.evaluate import ConnectivityStats, has_routing

if TYPE_CHECKING:
    from dgserve.training.config import TrainConfig

__all__ = ["BACKGROUND", "DETECTION_HEADROOM", "Detection", "DetectionOptions", "boxes_to_original", "collate_batch"]

BACKGROUND: Final = "__background__"

DETECTION_HEADROOM: Final[float] = 2.0
"""Detection inputs keep at least this multiple of ``max(input_size)`` on their longer side.

torchvision's detector resizes every image itself and never lets the longer side
exceed its ``max_size``; anything beyond a comfortable margin over that is decoded
pixels it would throw away, so larger photos are downscaled here, where it is cheap.
"""


def collate_batch(batch: Sequence[tuple[Any, Any]]) -> tuple[list[Any], list[Any]]:
    """DataLoader collate for detection: images differ in box count, so keep lists."""
    images, targets = zip(*batch, strict=True)
    return list(images), list(targets)


class DetectionOptions(Options):
    score_threshold: float | None = Field(None, ge=0, le=1, description="default: manifest")


class DetectedBox(BaseModel):
    box: list[float] = Field(description="[x1, y1, x2, y2] in the uploaded image's pixels", min_length=4, max_length=4)
    label: str
    index: int = Field(description="class id (0 is background, never returned)")
    score: float


@register_task
class Detection(Task):
    name: ClassVar[str] = "detection"
    endpoint: ClassVar[str] = "detect"
    summary: ClassVar[str] = "Detect objects; boxes are xyxy in the uploaded image's pixels."
    Options = DetectionOptions
    Prediction = DetectedBox
    default_input_size: ClassVar[int] = 128
    # The detector resizes and normalises by itself; input_size only bounds how large
    # an upload is kept.
    default_resize: ClassVar[ResizeMode] = "letterbox"
    data_sources: ClassVar[tuple[str, ...]] = ("generated", "coco")
    collate: ClassVar[Callable[[Sequence[Any]], Any] | None] = staticmethod(collate_batch)
    metric: ClassVar[tuple[str, str]] = ("mAP50", "mAP@0.5")
    routing_groups: ClassVar[str] = "class of the scene's largest object"
    # torchvision's detectors loop over a batch's images in Python and NMS keeps a
    # data-dependent number of boxes: torch.compile recompiled for every batch size.
    compiles: ClassVar[bool] = False

    # --- manifest -----------------------------------------------------------------

    def head_size(self, labels: Sequence[str]) -> int:
        return len(labels) + 1  # torchvision's detectors count the background class

    def check_labels(self, labels: Sequence[str], num_classes: int) -> None:
        if BACKGROUND in labels:
            raise ValueError(f"leave {BACKGROUND!r} out: detection labels exclude the background class")
        if len(labels) != num_classes - 1:
            raise ValueError(
                f"{len(labels)} labels but detection num_classes={num_classes} (which counts background) "
                f"needs {num_classes - 1}"
            )

    def check_preprocessing(self, pre: Preprocessing) -> None:
        if pre.resize == "center_crop":
            raise ValueError("resize 'center_crop' cuts objects off and breaks box coordinates; use letterbox or stretch")

    def class_name(self, labels: Sequence[str], class_id: int) -> str:
        return BACKGROUND if class_id == 0 else labels[class_id - 1]

    # --- serving --------------------------------------------------------------------

    def prepare(self, img: Image.Image, pre: Preprocessing) -> tuple[Tensor, Any]:
        """A float32 ``(3, H, W)`` tensor in [0, 1], and its scale (context).

        The detector normalises and resizes by itself and reports boxes in the
        coordinates of the tensor it was given, so nothing else is done here -- except
        that an image whose longer side exceeds ``DETECTION_HEADROOM * max(input_size)``
        is first downscaled to that, keeping its aspect ratio. The scale is
        ``tensor size / original size`` (1.0 when untouched).
        """
        pixels = F.pil_to_tensor(to_rgb(img))
        src_h, src_w = pixels.shape[-2:]
        longest = max(src_h, src_w)
        limit = int(DETECTION_HEADROOM * max(pre.input_size))
        scale = 1.0
        if longest > limit:
            scale = limit / longest
            size = (max(1, round(src_h * scale)), max(1, round(src_w * scale)))
            pixels = resize(pixels, size, interpolation_mode(pre.interpolation))
        return F.to_dtype(pixels, torch.float32, scale=True), scale

    def predict(
        self, model: nn.Module, items: Sequence[InferenceItem], manifest: Manifest, to_device: ToDevice
    ) -> list[list[dict[str, Any]]]:
        outputs = model([to_device(item.tensor) for item in items])
        thresholds = manifest.thresholds
        out = []
        for item, output in zip(items, outputs, strict=True):
            chosen = _options(item).score_threshold
            threshold = thresholds.score_threshold if chosen is None else chosen
            scores = output["scores"].float().cpu()
            keep = (scores >= threshold).nonzero().squeeze(1)[: thresholds.max_detections]
            boxes = boxes_to_original(output["boxes"].cpu()[keep], item.context, (item.image.height, item.image.width))
            out.append([
                {"box": box, "label": self.class_name(manifest.labels, label), "index": label, "score": score}
                for box, label, score in zip(
                    boxes.tolist(), output["labels"].cpu()[keep].tolist(), scores[keep].tolist(), strict=True
                )
            ])  # fmt: skip
        return out

    def prepare_tensor(self, tensor: Tensor) -> tuple[Tensor, Any]:
        return tensor, 1.0  # already the detector's input: boxes need no rescaling

    # --- tensor protocols -------------------------------------------------------------

    def tensor_outputs(self, manifest: Manifest) -> list[TensorSpec]:
        # The number of boxes varies per image: rows are padded to the batch's most, and
        # num_detections says how many of each row are real.
        return [
            TensorSpec("boxes", "FP32", (-1, -1, 4), "xyxy in the input image's pixels, padded with zeros"),
            TensorSpec("scores", "FP32", (-1, -1), "box scores, padded with zeros"),
            TensorSpec("class_indices", "INT64", (-1, -1), "class ids (0 is background), padded with -1"),
            TensorSpec("labels", "BYTES", (-1, -1), "class labels, padded with empty strings"),
            TensorSpec("num_detections", "INT32", (-1,), "boxes per image"),
        ]

    def to_tensors(self, predictions: Sequence[list[dict[str, Any]]], manifest: Manifest) -> dict[str, np.ndarray]:
        n, m = len(predictions), max((len(p) for p in predictions), default=0)
        out = {
            "boxes": np.zeros((n, m, 4), dtype=np.float32),
            "scores": np.zeros((n, m), dtype=np.float32),
            "class_indices": np.full((n, m), -1, dtype=np.int64),
            "labels": np.full((n, m), b"", dtype=object),
            "num_detections": np.array([len(p) for p in predictions], dtype=np.int32),
        }
        for row, preds in enumerate(predictions):
            for col, p in enumerate(preds):
                out["boxes"][row, col] = p["box"]
                out["scores"][row, col], out["class_indices"][row, col] = p["score"], p["index"]
                out["labels"][row, col] = p["label"].encode()
        return out

    # --- training -------------------------------------------------------------------

    def datasets(self, config: TrainConfig, pre: Preprocessing) -> DataBundle:
        if config.data == "coco":
            return coco(config, partial(self.prepare, pre=pre))
        if config.data != "generated":
            raise self.unsupported_source(config.data)
        size = pre.input_size[0]
        return DataBundle(
            ShapesDetection(config.train_size, config.data_seed, size, config.max_objects),
            ShapesDetection(config.val_size, config.val_seed, size, config.max_objects),
            list(ShapesDetection.classes),
            generated_description(config, f"{size}x{size} scenes of 1-{config.max_objects} shapes"),
        )

    def loss(self, model: nn.Module, batch: Any, config: TrainConfig, gen: torch.Generator) -> tuple[Tensor, int]:
        images, targets = batch
        if config.augment:
            pairs = [dihedral_detection(image, target, gen) for image, target in zip(images, targets, strict=True)]
            images, targets = [p[0] for p in pairs], [p[1] for p in pairs]
        losses = model(list(images), list(targets))
        return sum(losses.values(), torch.zeros(())), len(images)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batches: Iterable[Any], num_classes: int, progress: bool) -> dict[str, Any]:
        """mAP by pycocotools' COCOeval over ground truth built from the targets themselves."""
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval

        from dgserve.models.connectivity import collect_connectivity

        model.eval()
        routed = has_routing(model)
        stats = ConnectivityStats()
        images_info: list[dict[str, Any]] = []
        gts: list[dict[str, Any]] = []
        dets: list[dict[str, Any]] = []
        for images, targets in tqdm(batches, desc="  eval", leave=False, disable=not progress):
            outputs = model(images)
            if routed:
                # Scenes are grouped by the class of their largest object for the per-class figures.
                for record, target in zip(collect_connectivity(model, len(images)), targets, strict=True):
                    stats.add(record, _largest_label(target))
            for image, target, output in zip(images, targets, outputs, strict=True):
                image_id = len(images_info) + 1  # our own ids: a Subset's image_ids need not be unique
                images_info.append({"id": image_id, "height": int(image.shape[-2]), "width": int(image.shape[-1])})
                for box, label in zip(target["boxes"].tolist(), target["labels"].tolist(), strict=True):
                    w, h = box[2] - box[0], box[3] - box[1]
                    gts.append({"id": len(gts) + 1, "image_id": image_id, "category_id": label,
                                "bbox": [box[0], box[1], w, h], "area": w * h, "iscrowd": 0})  # fmt: skip
                for box, label, score in zip(
                    output["boxes"].tolist(), output["labels"].tolist(), output["scores"].tolist(), strict=True
                ):
                    dets.append({"image_id": image_id, "category_id": label, "score": score,
                                 "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]]})  # fmt: skip
        categories = [{"id": k} for k in range(1, num_classes)]
        out: dict[str, Any] = {"images": len(images_info), "boxes": len(gts), "mAP50": 0.0, "mAP": 0.0}
        with quiet():
            truth = COCO()
            truth.dataset = {"images": images_info, "annotations": gts, "categories": categories}
            truth.createIndex()
            if dets:
                result = truth.loadRes(dets)
                coco_eval = COCOeval(truth, result, iouType="bbox")
                coco_eval.evaluate()
                coco_eval.accumulate()
                coco_eval.summarize()
                out["mAP"], out["mAP50"] = float(coco_eval.stats[0]), float(coco_eval.stats[1])
        if routed:
            out["connectivity"] = stats.summary()
        return out

    def card_results(self, final: dict[str, Any], labels: Sequence[str]) -> list[str]:
        return [
            f"- mAP@0.5 (pycocotools COCOeval, bbox): **{final['mAP50']:.4f}**; mAP@[0.5:0.95]: {final['mAP']:.4f}.",
            f"- {final['images']} held-out images, {final['boxes']} ground-truth boxes.",
        ]


def boxes_to_original(boxes: Tensor, scale: float, image_size: tuple[int, int] | None = None) -> Tensor:
    """Map ``(N, 4)`` xyxy boxes from the detector's input back to the original image.

    ``image_size`` is the original ``(height, width)``; given, boxes are clamped to it,
    since rounding the downscaled size can push an edge box a fraction past the border.
    """
    out = boxes.to(torch.float32) if scale == 1.0 else boxes.to(torch.float32) / scale
    if image_size is not None:
        height, width = image_size
        out = torch.stack(
            (out[..., 0].clamp(0, width), out[..., 1].clamp(0, height),
             out[..., 2].clamp(0, width), out[..., 3].clamp(0, height)),
            dim=-1,
        )  # fmt: skip
    return out


def _largest_label(target: dict[str, Tensor]) -> int | None:
    boxes = target["boxes"]
    if len(boxes) == 0:
        return None
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return int(target["labels"][int(areas.argmax())])


def _options(item: InferenceItem) -> DetectionOptions:
    assert isinstance(item.options, DetectionOptions)
    return item.options
