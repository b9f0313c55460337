"""Tiny settings so a whole training run takes seconds on a shared 2-core CPU."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from dgserve.training.config import TrainConfig


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    # One thread: on a busy shared CPU a second thread mostly spin-waits.
    torch.set_num_threads(1)


def tiny_classifier(tmp_path: Path, **overrides: Any) -> TrainConfig:
    settings: dict[str, Any] = {
        "name": "tiny",
        "architecture": "dgnet_resnet18_slim",
        "store": tmp_path / "store",
        "arch_kwargs": {"width": 8},
        "train_size": 48,
        "val_size": 16,
        "input_size": 32,
        "epochs": 1,
        "batch_size": 16,
        "progress": False,
        "storage_dtype": "float32",
    }
    settings.update(overrides)
    return TrainConfig(**settings)


def tiny_detector(tmp_path: Path, **overrides: Any) -> TrainConfig:
    settings: dict[str, Any] = {
        "name": "tiny-det",
        "architecture": "fasterrcnn_dgnet_resnet18_slim_fpn",
        "store": tmp_path / "store",
        "arch_kwargs": {
            "width": 8, "fpn_channels": 16, "representation_size": 32, "min_size": 64, "max_size": 64,
            "anchor_sizes": [8, 16, 32, 64, 128], "rpn_pre_nms_top_n_train": 100, "rpn_post_nms_top_n_train": 50,
            "rpn_pre_nms_top_n_test": 50, "rpn_post_nms_top_n_test": 20, "box_batch_size_per_image": 32,
        },  # fmt: skip
        "train_size": 8,
        "val_size": 4,
        "input_size": 64,
        "max_objects": 2,
        "epochs": 1,
        "batch_size": 4,
        "progress": False,
        "storage_dtype": "float32",
    }
    settings.update(overrides)
    return TrainConfig(**settings)
