"""Semantic segmentation: one label per pixel, at the uploaded image's own resolution.

Models are FCNs (``dgserve.models.segmentation``) that return ``{"out": logits}`` at
their input size. Every manifest label is a class of the label map, index 0 included
(the bundled models call it ``background``); 255 is the ignore index in training data.

Per image the answer is one ``SegmentationPrediction``: the label map, as a palette
PNG (base64) by default or, with ``?format=rle``, a COCO RLE mask per class present,
and each class's share of the pixels.
"""

from __future__ import annotations

import base64
import io
import warnings
from collections.abc import Iterable, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any, ClassVar, Final, Literal

import numpy as np
import torch
from PIL import Image
from pydantic import BaseModel, Field
from torch import Tensor, nn
from torch.nn import functional as F
from torchvision.transforms.v2 import functional as TF
from tqdm import tqdm

from dgserve.data.datasets import ShapesSegmentation
from dgserve.data.sources import DataBundle, MaskFolder, generated_description, mask_folder
from dgserve.errors import InvalidRequestError
from dgserve.imaging import letterbox_geometry, preprocess
from dgserve.model_store.manifest import Manifest, Preprocessing, ResizeMode
from dgserve.tasks.base import InferenceItem, Options, Task, TensorSpec, ToDevice, register_task
from dgserve.training.augment import dihedral_batch
from dgserve.training.evaluate import ConnectivityStats, has_routing

if TYPE_CHECKING:
    from dgserve.training.config import Schedule, TrainConfig

__all__ = ["Segmentation", "SegmentationOptions", "SegmentationPrediction", "decode_label_map", "palette"]

IGNORE_INDEX: Final = MaskFolder.IGNORE_INDEX

OUTPUT_SIDE_LIMIT: Final = 1024
"""Logits are upsampled bilinearly to the original size, up to this longer side.

Beyond it the label map is enlarged with nearest-neighbour instead: full-resolution
float logits of a 12-megapixel photo would take C x 48 MB, and the model saw the image
at its input size anyway, so no detail is lost that the logits had.
"""

PADDING_LIMIT: Final = 4
"""A batch's ``label_map`` tensor may hold at most this many times its images' own pixels."""

AUX_WEIGHT: Final = 0.4  # torchvision's segmentation reference weighs the auxiliary head so


def palette() -> list[int]:
    """PASCAL VOC's colour map (class bits spread over R, G, B), 256 entries flattened for ``putpalette``."""
    colours: list[int] = []
    for index in range(256):
        r = g = b = 0
        c = index
        for bit in range(8):
            r |= ((c >> 0) & 1) << (7 - bit)
            g |= ((c >> 1) & 1) << (7 - bit)
            b |= ((c >> 2) & 1) << (7 - bit)
            c >>= 3
        colours += [r, g, b]
    return colours


_PALETTE: Final = palette()


class SegmentationOptions(Options):
    format: Literal["png", "rle"] = Field(
        "png", description="png: the label map as a base64 palette PNG; rle: a COCO RLE mask per class present"
    )


class RleMask(BaseModel):
    size: list[int] = Field(description="[height, width]", min_length=2, max_length=2)
    counts: str = Field(description="COCO compressed RLE (pycocotools.mask.decode reads it)")


class ClassShare(BaseModel):
    label: str
    index: int = Field(description="the class index: its value in the label map")
    pixel_fraction: float = Field(description="share of the image's pixels with this label")
    mask: RleMask | None = Field(None, description="with ?format=rle: this class's pixels")


class SegmentationPrediction(BaseModel):
    width: int = Field(description="of the label map: the uploaded image's width")
    height: int
    format: Literal["png", "rle"]
    label_map: str | None = Field(
        None, description="format=png: base64 PNG with a palette; each pixel's value is its class index"
    )
    classes: list[ClassShare] = Field(description="every class present, largest share first")


@register_task
class Segmentation(Task):
    name: ClassVar[str] = "segmentation"
    endpoint: ClassVar[str] = "segment"
    summary: ClassVar[str] = (
        "Label every pixel; each result carries the label map at the uploaded image's resolution, "
        "each class's share, and the image's path through the network."
    )
    Options = SegmentationOptions
    Prediction = SegmentationPrediction
    many: ClassVar[bool] = False
    default_input_size: ClassVar[int] = 96
    default_resize: ClassVar[ResizeMode] = "letterbox"
    data_sources: ClassVar[tuple[str, ...]] = ("generated", "masks")
    metric: ClassVar[tuple[str, str]] = ("mIoU", "mIoU")
    schedule: ClassVar[Schedule] = "poly"
    routing_groups: ClassVar[str] = "class of the scene's largest object"

    # --- manifest -----------------------------------------------------------------

    def check_labels(self, labels: Sequence[str], num_classes: int) -> None:
        super().check_labels(labels, num_classes)
        if num_classes > IGNORE_INDEX:
            raise ValueError(f"at most {IGNORE_INDEX} classes: label maps are 8-bit and {IGNORE_INDEX} means ignore")

    def check_preprocessing(self, pre: Preprocessing) -> None:
        if pre.resize == "center_crop":
            raise ValueError("resize 'center_crop' cuts off pixels that still need a label; use letterbox or stretch")

    # --- serving --------------------------------------------------------------------

    def prepare(self, img: Image.Image, pre: Preprocessing) -> tuple[Tensor, Any]:
        return preprocess(img, pre), None

    def predict(
        self, model: nn.Module, items: Sequence[InferenceItem], manifest: Manifest, to_device: ToDevice
    ) -> list[Any]:
        logits = model(to_device(torch.stack([item.tensor for item in items])))["out"]
        out = []
        for item, image_logits in zip(items, logits, strict=True):
            label_map = label_map_at(image_logits, (item.image.height, item.image.width), manifest.preprocessing)
            out.append(_prediction(label_map, manifest.labels, _options(item).format))
        return out

    # --- tensor protocols -------------------------------------------------------------

    def tensor_outputs(self, manifest: Manifest) -> list[TensorSpec]:
        return [
            TensorSpec("label_map", "INT32", (-1, -1, -1),
                       "class index per pixel at each input image's size; rows padded with -1 to the batch's largest"),
            TensorSpec("class_fractions", "FP32", (-1, len(manifest.labels)), "share of the pixels per class"),
        ]  # fmt: skip

    def to_tensors(self, predictions: Sequence[Any], manifest: Manifest) -> dict[str, np.ndarray]:
        maps = [decode_label_map(p) for p in predictions]
        height = max((m.shape[0] for m in maps), default=0)
        width = max((m.shape[1] for m in maps), default=0)
        padded, real = len(maps) * height * width, sum(m.size for m in maps)
        if padded > PADDING_LIMIT * real + 2**20:
            # A tall and a wide image would pad to a square of both their long sides: a
            # 40000x1000 and a 1000x40000 image to 2 x 40000 x 40000 int32s, 12.8 GB.
            raise InvalidRequestError(
                f"the batch's label maps ({', '.join(f'{m.shape[1]}x{m.shape[0]}' for m in maps)}) would pad to "
                f"{padded:,} values; send images of such different shapes in separate requests"
            )
        label_map = np.full((len(maps), height, width), -1, dtype=np.int32)
        fractions = np.zeros((len(maps), len(manifest.labels)), dtype=np.float32)
        for row, (m, p) in enumerate(zip(maps, predictions, strict=True)):
            label_map[row, : m.shape[0], : m.shape[1]] = m
            for share in p["classes"]:
                fractions[row, share["index"]] = share["pixel_fraction"]
        return {"label_map": label_map, "class_fractions": fractions}

    # --- training -------------------------------------------------------------------

    def datasets(self, config: TrainConfig, pre: Preprocessing) -> DataBundle:
        if config.data == "masks":
            return mask_folder(config, partial(image_and_mask, pre=pre))
        if config.data != "generated":
            raise self.unsupported_source(config.data)
        size = pre.input_size[0]
        transform = partial(preprocess, pre=pre)
        objects = min(config.max_objects, 3)
        return DataBundle(
            ShapesSegmentation(config.train_size, config.data_seed, size, objects, transform=transform),
            ShapesSegmentation(config.val_size, config.val_seed, size, objects, transform=transform),
            list(ShapesSegmentation.classes),
            generated_description(config, f"{size}x{size} scenes of 1-{objects} shapes with exact label maps"),
        )

    def loss(self, model: nn.Module, batch: Any, config: TrainConfig, gen: torch.Generator) -> tuple[Tensor, int]:
        images, masks = batch
        if config.augment:
            # One symmetry per image for the image and its mask alike: the mask rides
            # along as an extra channel (its integer values survive flips exactly).
            both = dihedral_batch(torch.cat([images, masks.unsqueeze(1).to(images.dtype)], 1), gen)
            images, masks = both[:, :-1].contiguous(), both[:, -1].round().long()
        outputs = model(images)
        loss = F.cross_entropy(outputs["out"], masks, ignore_index=IGNORE_INDEX)
        if outputs.get("aux") is not None:
            loss = loss + AUX_WEIGHT * F.cross_entropy(outputs["aux"], masks, ignore_index=IGNORE_INDEX)
        return loss, len(images)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batches: Iterable[Any], num_classes: int, progress: bool) -> dict[str, Any]:
        from dgserve.models.connectivity import collect_connectivity

        model.eval()
        routed = has_routing(model)
        stats = ConnectivityStats()
        confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)
        images = 0
        for inputs, masks in tqdm(batches, desc="  eval", leave=False, disable=not progress):
            predicted = model(inputs)["out"].argmax(1)
            confusion += confusion_matrix(predicted, masks, num_classes)
            images += len(inputs)
            if routed:
                for record, mask in zip(collect_connectivity(model, len(inputs)), masks, strict=True):
                    stats.add(record, _largest_class(mask, num_classes))
        out = iou_figures(confusion)
        out["images"] = images
        if routed:
            out["connectivity"] = stats.summary()
        return out

    def card_results(self, final: dict[str, Any], labels: Sequence[str]) -> list[str]:
        rows = [f"| {label} | {iou:.4f} |" for label, iou in zip(labels, final["per_class_iou"], strict=True)]
        return [
            f"- mIoU: **{final['mIoU']:.4f}** over {len(labels)} classes; pixel accuracy {final['pixel_accuracy']:.4f}; "
            f"{final['images']} held-out images.",
            "",
            "| class | IoU |",
            "|---|---|",
            *rows,
        ]


# --- label maps ---------------------------------------------------------------------------


def label_map_at(logits: Tensor, size: tuple[int, int], pre: Preprocessing) -> np.ndarray:
    """``(C, h, w)`` logits at the model's input to a uint8 label map of the original ``size``.

    Undoes the preprocessing's geometry: a letterbox's padding is cut off first, then
    the logits are resized (bilinearly, up to ``OUTPUT_SIDE_LIMIT``) and argmaxed.
    """
    height, width = size
    if pre.resize == "letterbox":
        (new_h, new_w), (left, top, _, _) = letterbox_geometry(height, width, *pre.input_size)
        logits = logits[:, top : top + new_h, left : left + new_w]
    scale = min(1.0, OUTPUT_SIDE_LIMIT / max(height, width))
    target = (max(1, round(height * scale)), max(1, round(width * scale)))
    if tuple(logits.shape[-2:]) != target:
        logits = F.interpolate(logits[None].float(), size=target, mode="bilinear", align_corners=False)[0]
    label_map = logits.argmax(0).to(torch.uint8)
    if target != (height, width):
        label_map = TF.resize(label_map[None], [height, width], interpolation=TF.InterpolationMode.NEAREST_EXACT)[0]
    return label_map.cpu().numpy()


def _prediction(label_map: np.ndarray, labels: Sequence[str], fmt: str) -> dict[str, Any]:
    counts = np.bincount(label_map.ravel(), minlength=len(labels))
    total = label_map.size
    present = sorted(np.flatnonzero(counts).tolist(), key=lambda k: -counts[k])
    classes: list[dict[str, Any]] = []
    for k in present:
        share: dict[str, Any] = {"label": labels[k], "index": k, "pixel_fraction": float(counts[k] / total)}
        if fmt == "rle":
            share["mask"] = _rle(label_map == k)
        classes.append(share)
    height, width = label_map.shape
    encoded = _png(label_map) if fmt == "png" else None
    return {"width": width, "height": height, "format": fmt, "label_map": encoded, "classes": classes}


def _png(label_map: np.ndarray) -> str:
    # Built as mode P from the raw bytes: converting an L image to P would re-quantise
    # the values instead of keeping them as palette indices.
    height, width = label_map.shape
    image = Image.frombytes("P", (width, height), np.ascontiguousarray(label_map).tobytes())
    image.putpalette(_PALETTE)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _rle(mask: np.ndarray) -> dict[str, Any]:
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def decode_label_map(prediction: dict[str, Any]) -> np.ndarray:
    """A response's label map back as a uint8 ``(height, width)`` array, from either format."""
    if prediction["format"] == "png":
        with Image.open(io.BytesIO(base64.b64decode(prediction["label_map"]))) as image:
            return np.asarray(image, dtype=np.uint8).copy()
    from pycocotools import mask as mask_utils

    label_map = np.zeros((prediction["height"], prediction["width"]), dtype=np.uint8)
    for share in prediction["classes"]:
        rle = {"size": share["mask"]["size"], "counts": share["mask"]["counts"].encode("ascii")}
        with warnings.catch_warnings():
            # pycocotools' compiled decode still passes copy=False to numpy 2's __array__
            # protocol; the warning is about its code, and the decoded mask is exact.
            warnings.filterwarnings("ignore", "__array__ implementation", DeprecationWarning)
            label_map[mask_utils.decode(rle).astype(bool)] = share["index"]
    return label_map


# --- training data and figures --------------------------------------------------------------


def image_and_mask(image: Image.Image, mask: Image.Image, pre: Preprocessing) -> tuple[Tensor, Tensor]:
    """An image as the server preprocesses it, and its label map moved alike (nearest; padding ignored)."""
    if image.size != mask.size:
        raise ValueError(f"image {image.size} and mask {mask.size} differ in size")
    labels = torch.from_numpy(np.asarray(mask, dtype=np.uint8).copy())[None]
    height, width = pre.input_size
    nearest = TF.InterpolationMode.NEAREST_EXACT
    if pre.resize == "letterbox":
        size, pad = letterbox_geometry(mask.height, mask.width, height, width)
        labels = TF.pad(TF.resize(labels, list(size), interpolation=nearest), pad, fill=IGNORE_INDEX)
    else:
        labels = TF.resize(labels, [height, width], interpolation=nearest)
    return preprocess(image, pre), labels[0].long()


def confusion_matrix(predicted: Tensor, truth: Tensor, num_classes: int) -> Tensor:
    """``[truth, predicted]`` pixel counts, ignored pixels left out."""
    keep = truth != IGNORE_INDEX
    flat = truth[keep] * num_classes + predicted[keep]
    return torch.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def iou_figures(confusion: Tensor) -> dict[str, Any]:
    """Per-class IoU, mean IoU over classes that occur (in truth or prediction), pixel accuracy."""
    hits = confusion.diag().double()
    union = confusion.sum(0).double() + confusion.sum(1).double() - hits
    iou = hits / union.clamp_min(1)
    seen = union > 0
    return {
        "mIoU": float(iou[seen].mean()) if bool(seen.any()) else 0.0,
        "per_class_iou": iou.tolist(),
        "pixel_accuracy": float(hits.sum() / confusion.sum().clamp_min(1)),
    }


def _largest_class(mask: Tensor, num_classes: int) -> int | None:
    # For the card's per-class routing figures only; index 0 is taken as the background
    # the scene's objects stand on, as in the generated data and VOC.
    counts = torch.bincount(mask[(mask > 0) & (mask != IGNORE_INDEX)].flatten(), minlength=num_classes)
    return int(counts.argmax()) if int(counts.sum()) else None


def _options(item: InferenceItem) -> SegmentationOptions:
    assert isinstance(item.options, SegmentationOptions)
    return item.options
