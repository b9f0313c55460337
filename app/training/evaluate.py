"""Held-out evaluation: top-1, COCOeval mAP, and how sparse and instance-aware routing is.

Evaluation runs under ``torch.no_grad()`` in eval mode, i.e. exactly the inference path
the server takes (closed edges pruned, skipped blocks not run), so the edge figures
are those a user of the served model gets.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from tqdm import tqdm

from dgserve.models.connectivity import ImageConnectivity, collect_connectivity
from dgserve.models.dgnet.stage import DGStage
from dgserve.training.data import quiet


def has_routing(model: nn.Module) -> bool:
    return any(isinstance(m, DGStage) for m in model.modules())


@dataclass
class ConnectivityStats:
    """Accumulates per-image routing records; ``summary`` gives the card's edge figures."""

    closed_fractions: list[float] = field(default_factory=list)
    patterns: set[tuple[bool, ...]] = field(default_factory=set)
    per_stage_open: dict[str, list[int]] = field(default_factory=lambda: defaultdict(list))
    possible: dict[str, int] = field(default_factory=dict)
    class_sums: dict[int, Tensor] = field(default_factory=dict)
    class_counts: dict[int, int] = field(default_factory=lambda: defaultdict(int))

    def add(self, record: ImageConnectivity, label: int | None = None) -> None:
        opened = sum(s.open_edges for s in record.stages)
        possible = sum(s.possible_edges for s in record.stages)
        self.closed_fractions.append(1.0 - opened / possible if possible else 0.0)
        weights = torch.cat([_routed(s.adjacency) for s in record.stages])
        self.patterns.add(tuple((weights > 0).tolist()))
        for s in record.stages:
            self.per_stage_open[s.stage].append(s.open_edges)
            self.possible[s.stage] = s.possible_edges
        if label is not None:
            self.class_sums[label] = self.class_sums.get(label, torch.zeros_like(weights)) + weights
            self.class_counts[label] += 1

    def summary(self) -> dict[str, Any]:
        n = len(self.closed_fractions)
        out: dict[str, Any] = {
            "images": n,
            "closed_edge_fraction": sum(self.closed_fractions) / n if n else 0.0,
            "distinct_patterns": len(self.patterns),
            "per_stage_mean_open_edges": {
                stage: [sum(v) / len(v), self.possible[stage]] for stage, v in self.per_stage_open.items()
            },
        }
        if self.class_sums:
            means = {c: (s / self.class_counts[c]) for c, s in sorted(self.class_sums.items())}
            stacked = torch.stack(list(means.values()))
            # Largest mean absolute difference between two classes' mean adjacencies:
            # 0 would mean every class is routed identically on average.
            diffs = (stacked[:, None] - stacked[None]).abs().mean(-1)
            out["class_adjacency_max_difference"] = float(diffs.max())
            out["class_mean_edge_weight"] = {int(c): float(m.mean()) for c, m in means.items()}
        return out


def _routed(adjacency: list[list[float]]) -> Tensor:
    """The routed edges of one stage: block i -> later blocks and the output (rows 2.., cols 1..)."""
    adj = torch.tensor(adjacency)
    rows, cols = torch.tril_indices(adj.shape[0] - 2, adj.shape[1] - 2)
    return adj[rows + 2, cols + 1]


@torch.no_grad()
def evaluate_classification(
    model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]], num_classes: int, progress: bool = True
) -> dict[str, Any]:
    model.eval()
    routed = has_routing(model)
    stats = ConnectivityStats()
    correct = torch.zeros(num_classes)
    total = torch.zeros(num_classes)
    for images, labels in tqdm(batches, desc="  eval", leave=False, disable=not progress):
        predicted = model(images).argmax(1)
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


def _largest_label(target: dict[str, Tensor]) -> int | None:
    boxes = target["boxes"]
    if len(boxes) == 0:
        return None
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return int(target["labels"][int(areas.argmax())])


@torch.no_grad()
def evaluate_detection(
    model: nn.Module, batches: Iterable[tuple[list[Tensor], list[dict[str, Tensor]]]], num_classes: int, progress: bool = True
) -> dict[str, Any]:
    """mAP by pycocotools' COCOeval over ground truth built from the targets themselves."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

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
