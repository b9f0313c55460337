"""The ImageFolder and COCO sources on tiny exported sets, through the CLI."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import torch
from typer.testing import CliRunner

from dgserve.cli import app
from dgserve.data import CLASSES, export_coco, export_image_folder
from dgserve.data.datasets import ShapesDetection
from dgserve.data.sources import CocoDetection
from dgserve.model_store import ModelStore
from dgserve.tasks.detection import Detection

TINY_DETECTOR = [
    "-k", "width=8", "-k", "fpn_channels=16", "-k", "representation_size=32", "-k", "min_size=64", "-k", "max_size=64",
    "-k", "rpn_pre_nms_top_n_train=100", "-k", "rpn_post_nms_top_n_train=50", "-k", "box_batch_size_per_image=32",
]  # fmt: skip


def test_imagefolder_source_trains_and_stores_the_folder_labels(tmp_path: Path) -> None:
    root = export_image_folder(tmp_path / "folder", n=40, seed=5, size=32)
    store = tmp_path / "store"
    args = ["train", "dgnet_resnet18_slim", "--name", "folder", "--store", str(store), "--data", "imagefolder",
            "--data-path", str(root), "--epochs", "1", "--batch-size", "16", "-k", "width=8",
            "--input-size", "32", "--no-progress", "--threads", "1"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    loaded = ModelStore(store).load("folder")
    assert loaded.manifest.labels == list(CLASSES)
    card = (loaded.path / "card.md").read_text()
    assert "ImageFolder" in card and "36 training images" in card  # 10% of 40 held out


def test_coco_source_matches_the_generated_scenes(tmp_path: Path) -> None:
    annotations = export_coco(tmp_path / "coco", n=4, seed=9, size=64, max_objects=3)
    task = Detection()
    coco = CocoDetection(annotations, partial(task.prepare, pre=task.default_preprocessing(64)))
    generated = ShapesDetection(4, 9, 64, 3)
    assert coco.labels == list(CLASSES)
    for i in range(4):
        (image, target), (ref_image, ref_target) = coco[i], generated[i]
        assert torch.allclose(image, ref_image, atol=1e-6)
        assert torch.allclose(target["boxes"], ref_target["boxes"]) and torch.equal(target["labels"], ref_target["labels"])


def test_coco_source_trains_a_detector(tmp_path: Path) -> None:
    train_json = export_coco(tmp_path / "train", n=6, seed=1, size=64, max_objects=2)
    val_json = export_coco(tmp_path / "val", n=3, seed=2, size=64, max_objects=2)
    store = tmp_path / "store"
    args = ["train", "fasterrcnn_dgnet_resnet18_slim_fpn", "--name", "coco", "--store", str(store), "--data", "coco",
            "--data-path", str(train_json), "--val-path", str(val_json), "--epochs", "1", "--batch-size", "3",
            "--input-size", "64", "--no-progress", "--threads", "1", *TINY_DETECTOR]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    loaded = ModelStore(store).load("coco")
    assert loaded.manifest.task == "detection" and loaded.manifest.labels == list(CLASSES)
    assert loaded.manifest.arch_kwargs["num_classes"] == len(CLASSES) + 1
    assert "mAP@0.5 (pycocotools COCOeval" in (loaded.path / "card.md").read_text()


def test_cli_rejects_bad_settings(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["train", "dgnet_resnet18_slim", "--name", "x", "--data", "imagefolder"])
    assert result.exit_code != 0 and "--data-path" in result.output
    result = CliRunner().invoke(app, ["train", "dgnet_resnet18_slim", "--name", "x", "--data-seed", "1"])
    assert result.exit_code != 0 and "--val-seed" in result.output
