"""The classification task: per-request top-k, the manifest's default, and label rules."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
import torch
from torch import Tensor, nn

from dgserve.model_store.manifest import Manifest
from dgserve.tasks import ImageInfo, InferenceItem
from dgserve.tasks.classification import Classification, ClassificationOptions

TASK = Classification()


class Fixed(nn.Module):
    """Logits that rank class 2, then 0, then 1, for every image."""

    def forward(self, x: Tensor) -> Tensor:
        return torch.tensor([[1.0, 0.0, 3.0]]).expand(x.shape[0], 3)


def manifest(top_k: int) -> Manifest:
    return Manifest.model_validate({
        "schema_version": 1, "name": "c", "version": 1, "architecture": "dgnet_resnet18_slim",
        "task": "classification", "arch_kwargs": {"num_classes": 3}, "labels": ["cat", "dog", "eel"],
        "preprocessing": {"input_size": [4, 4], "mean": [0.5] * 3, "std": [0.5] * 3},
        "thresholds": {"top_k": top_k}, "weights": {"sha256": "0" * 64}, "created_at": datetime.now(UTC),
    })  # fmt: skip


def item(top_k: int | None) -> InferenceItem:
    return InferenceItem(torch.zeros(3, 4, 4), ImageInfo(None, 4, 4), ClassificationOptions(top_k=top_k))


def test_top_k_is_per_item_defaults_to_the_manifest_and_is_clamped() -> None:
    out = TASK.predict(Fixed(), [item(1), item(None), item(9)], manifest(top_k=2), lambda t: t)
    assert [[p["label"] for p in preds] for preds in out] == [["eel"], ["eel", "cat"], ["eel", "cat", "dog"]]
    assert out[2][0] == {"label": "eel", "index": 2, "score": pytest.approx(torch.softmax(torch.tensor([1.0, 0, 3]), 0)[2].item())}


def test_labels_must_fit_the_head() -> None:
    with pytest.raises(ValueError, match="2 labels but arch_kwargs.num_classes=3"):
        TASK.check_labels(["a", "b"], 3)
    assert TASK.class_name(["a", "b"], 1) == "b" and TASK.head_size(["a", "b"]) == 2
