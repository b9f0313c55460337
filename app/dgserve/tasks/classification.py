"""Classification: one image in, the top-k labels out."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
from PIL import Image
from pydantic import BaseModel, Field
from torch import Tensor, nn
from torch.nn import functional as F
from tqdm import tqdm

from dgserve.data.datasets import ShapesClassification
from dgserve.data.sources import DataBundle, generated_description, image_folder
from dgserve.imaging import preprocess
from dgserve.model_store.manifest import Manifest, Preprocessing, ResizeMode
from dgserve.tasks.base import InferenceItem, Options, Task, TensorSpec, ToDevice, register_task
from dgserve.training.augment import dihedral_batch
from dgserve.training.evaluate import ConnectivityStats, has_routing

if TYPE_CHECKING:
    from dgserve.training.config import TrainConfig

__all__ = ["Classification", "ClassificationOptions", "ClassPrediction"]


class ClassificationOptions(Options):
    top_k: int | None = Field(None, ge=1, description="labels per image (default: manifest; clamped)")


class ClassPrediction(BaseModel):
    label: str
    index: int
    score: float


@register_task
class Classification(Task):
    name: ClassVar[str] = "classification"
    endpoint: ClassVar[str] = "classify"
    summary: ClassVar[str] = (
        "Classify one or more images; each result carries its top-k labels and its path through the network."
    )
    Options = ClassificationOptions
    Prediction = ClassPrediction
    default_input_size: ClassVar[int] = 64
    default_resize: ClassVar[ResizeMode] = "center_crop"
    data_sources: ClassVar[tuple[str, ...]] = ("generated", "imagefolder")
    metric: ClassVar[tuple[str, str]] = ("top1", "top-1")
    routing_groups: ClassVar[str] = "image's class"
    whole_image_resized: ClassVar[bool] = True  # labels only: nothing maps back onto the upload's pixels

    # --- serving --------------------------------------------------------------------

    def prepare(self, img: Image.Image, pre: Preprocessing) -> tuple[Tensor, Any]:
        return preprocess(img, pre), None

    def predict(
        self, model: nn.Module, items: Sequence[InferenceItem], manifest: Manifest, to_device: ToDevice
    ) -> list[list[dict[str, Any]]]:
        logits = model(to_device(torch.stack([item.tensor for item in items])))
        return self.top_k(torch.softmax(logits.float(), dim=1), items, manifest)

    def top_k(self, probs: Tensor, items: Sequence[InferenceItem], manifest: Manifest) -> list[list[dict[str, Any]]]:
        """Each item's top-k labels from its row of class probabilities (``top_k`` option, else the manifest's)."""
        num_labels, default_k = probs.shape[1], manifest.thresholds.top_k
        ks = [min(num_labels, _options(item).top_k or default_k) for item in items]
        scores, indices = probs.topk(max(ks), dim=1)
        scores_l, indices_l = scores.cpu().tolist(), indices.cpu().tolist()  # one sync per batch
        labels = manifest.labels
        return [
            [{"label": labels[i], "index": i, "score": s} for s, i in zip(row_s[:k], row_i[:k], strict=True)]
            for k, row_s, row_i in zip(ks, scores_l, indices_l, strict=True)
        ]

    # --- tensor protocols -------------------------------------------------------------

    def tensor_outputs(self, manifest: Manifest) -> list[TensorSpec]:
        k = -1  # the manifest's top_k unless the request asks for another
        return [
            TensorSpec("scores", "FP32", (-1, k), "softmax scores of the top-k classes, best first"),
            TensorSpec("class_indices", "INT64", (-1, k), "their output indices"),
            TensorSpec("labels", "BYTES", (-1, k), "their labels"),
        ]

    def to_tensors(self, predictions: Sequence[list[dict[str, Any]]], manifest: Manifest) -> dict[str, np.ndarray]:
        k = max((len(p) for p in predictions), default=0)
        scores = np.zeros((len(predictions), k), dtype=np.float32)
        indices = np.full((len(predictions), k), -1, dtype=np.int64)
        labels = np.full((len(predictions), k), b"", dtype=object)
        for row, preds in enumerate(predictions):
            for col, p in enumerate(preds):
                scores[row, col], indices[row, col], labels[row, col] = p["score"], p["index"], p["label"].encode()
        return {"scores": scores, "class_indices": indices, "labels": labels}

    # --- training -------------------------------------------------------------------

    def datasets(self, config: TrainConfig, pre: Preprocessing) -> DataBundle:
        transform = partial(preprocess, pre=pre)
        if config.data == "imagefolder":
            return image_folder(config, transform)
        if config.data != "generated":
            raise self.unsupported_source(config.data)
        size = pre.input_size[0]
        return DataBundle(
            ShapesClassification(config.train_size, config.data_seed, size, transform=transform),
            ShapesClassification(config.val_size, config.val_seed, size, transform=transform),
            list(ShapesClassification.classes),
            generated_description(config, f"{size}x{size} single-shape images"),
        )

    def loss(self, model: nn.Module, batch: Any, config: TrainConfig, gen: torch.Generator) -> tuple[Tensor, int]:
        images, labels = batch
        if config.augment:
            images = dihedral_batch(images, gen)
        return F.cross_entropy(model(images), labels, label_smoothing=config.label_smoothing), len(labels)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batches: Iterable[Any], num_classes: int, progress: bool) -> dict[str, Any]:
        from dgserve.models.connectivity import collect_connectivity

        model.eval()
        routed = has_routing(model)
        stats = ConnectivityStats()
        correct = torch.zeros(num_classes)
        total = torch.zeros(num_classes)
        for images, labels in tqdm(batches, desc="  eval", leave=False, disable=not progress):
            predicted = self.scores(model, images).argmax(1)
            if routed:
                for record, label in zip(collect_connectivity(model, len(images)), labels.tolist(), strict=True):
                    stats.add(record, label)
            total += torch.bincount(labels, minlength=num_classes).float()
            correct += torch.bincount(labels[predicted == labels], minlength=num_classes).float()
        out: dict[str, Any] = {
            "top1": float(correct.sum() / total.sum()),
            "per_class_top1": (correct / total.clamp_min(1)).tolist(),
            "images": int(total.sum()),
        }
        if routed:
            out["connectivity"] = stats.summary()
        return out

    def scores(self, model: nn.Module, inputs: Tensor) -> Tensor:
        """Class scores ``(n, classes)`` of a batch of held-out inputs: the logits, for images."""
        return model(inputs)

    def card_results(self, final: dict[str, Any], labels: Sequence[str]) -> list[str]:
        per_class = ", ".join(f"{label} {acc:.3f}" for label, acc in zip(labels, final["per_class_top1"], strict=True))
        return [f"- Top-1: **{final['top1']:.4f}** on {final['images']} held-out images.", f"- Per class: {per_class}."]


def _options(item: InferenceItem) -> ClassificationOptions:
    assert isinstance(item.options, ClassificationOptions)
    return item.options
