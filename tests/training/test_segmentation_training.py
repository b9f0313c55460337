"""``dgserve train`` on the segmentation task: the poly schedule, mIoU each epoch, both data sources."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from dgserve.data import export_segmentation_folder
from dgserve.model_store import ModelStore
from dgserve.training.config import TrainConfig
from dgserve.training.loop import POLY_POWER, lr_at
from dgserve.training.run import train


def tiny_segmenter(tmp_path: Path, **overrides: Any) -> TrainConfig:
    settings: dict[str, Any] = {
        "name": "tiny-seg", "architecture": "fcn_glore_resnet_slim", "store": tmp_path / "store",
        "arch_kwargs": {"width": 4}, "train_size": 16, "val_size": 8, "input_size": 48, "epochs": 2,
        "batch_size": 8, "progress": False, "storage_dtype": "float32",
    }  # fmt: skip
    settings.update(overrides)
    return TrainConfig(**settings)


def test_poly_decays_as_one_minus_progress_to_the_power_0_9() -> None:
    assert lr_at(0, 100, 10, 1.0, "poly") == pytest.approx(0.1)  # the warm-up is shared with cosine
    assert lr_at(55, 100, 10, 1.0, "poly") == pytest.approx(0.5**POLY_POWER)
    assert lr_at(100, 100, 10, 1.0, "poly") == 0.0
    assert lr_at(55, 100, 10, 1.0, "poly") != pytest.approx(lr_at(55, 100, 10, 1.0, "cosine"))


def test_a_run_on_generated_scenes_reports_miou_per_epoch_and_writes_a_card_with_per_class_iou(tmp_path: Path) -> None:
    stored, history = train(tiny_segmenter(tmp_path))
    assert [e["epoch"] for e in history.epochs] == [1, 2]
    for epoch in history.epochs:
        assert 0.0 <= epoch["mIoU"] <= 1.0 and len(epoch["per_class_iou"]) == 9
    manifest = json.loads((stored.path / "manifest.json").read_text())
    assert manifest["task"] == "segmentation" and manifest["labels"][0] == "background"
    assert manifest["preprocessing"]["resize"] == "letterbox"
    card = (stored.path / "card.md").read_text()
    assert "poly decay" in card and "| class | IoU |" in card and "| triangle |" in card
    assert ModelStore(tmp_path / "store").load("tiny-seg").manifest.task == "segmentation"


def test_a_run_on_image_and_mask_folders(tmp_path: Path) -> None:
    train_root = export_segmentation_folder(tmp_path / "train", 12, seed=0, size=40)
    val_root = export_segmentation_folder(tmp_path / "val", 4, seed=1, size=40)
    stored, history = train(
        tiny_segmenter(tmp_path, data="masks", data_path=train_root, val_path=val_root, epochs=1, schedule="cosine")
    )
    assert history.epochs[0]["images"] == 4
    card = (stored.path / "card.md").read_text()
    assert "cosine decay" in card and str(train_root) in card
    with pytest.raises(ValueError, match="not a source for segmentation"):
        train(tiny_segmenter(tmp_path, data="coco", data_path=train_root))
