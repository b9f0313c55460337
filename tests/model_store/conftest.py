"""Tiny stand-in architectures and helpers for the store tests.

The real DG-Net/GloRe builders are not needed to test the store, so the tests
register their own toy architectures for the duration of each test only.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from dgserve.models import registry
from dgserve.models.registry import ModelEntry
from dgserve.model_store import ModelStore, StoredVersion
from dgserve.model_store.weights import sha256_file

LABELS = ["cat", "dog", "bird"]
PREPROCESSING: dict[str, Any] = {
    "input_size": [8, 8],
    "mean": [0.485, 0.456, 0.406],
    "std": [0.229, 0.224, 0.225],
    "interpolation": "bilinear",
    "resize": "center_crop",
}


class TinyNet(nn.Module):
    """Conv + BatchNorm (an int64 num_batches_tracked buffer) + linear head."""

    def __init__(
        self, num_classes: int = 3, width: int = 4, tied: bool = False, padding: Sequence[int] = (1, 1)
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, width, 3, padding=tuple(padding))
        self.bn = nn.BatchNorm2d(width)
        self.head = nn.Linear(width, num_classes)
        self.aux = nn.Linear(width, num_classes)
        if tied:
            self.aux.weight = self.head.weight  # shared storage: safetensors' save_file refuses it as is

    def forward(self, x: Tensor) -> Tensor:
        features = torch.relu(self.bn(self.conv(x))).mean(dim=(2, 3))
        return self.head(features) + self.aux(features)


def tiny_net(num_classes: int = 3, width: int = 4, tied: bool = False, padding: Sequence[int] = (1, 1)) -> nn.Module:
    return TinyNet(num_classes=num_classes, width=width, tied=tied, padding=padding)


def tiny_detector(num_classes: int = 4, width: int = 4) -> nn.Module:
    # Shape is all the store cares about; num_classes counts background here.
    return TinyNet(num_classes=num_classes, width=width)


@pytest.fixture(autouse=True)
def tiny_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry, "_ensure_builtin_models", lambda: None)
    monkeypatch.setitem(
        registry._REGISTRY, "tiny-net", ModelEntry("tiny-net", "classification", "dgnet", tiny_net, "test")
    )
    monkeypatch.setitem(
        registry._REGISTRY,
        "tiny-detector",
        ModelEntry("tiny-detector", "detection", "glore", tiny_detector, "test"),
    )


@pytest.fixture
def store(tmp_path: Path) -> ModelStore:
    return ModelStore(tmp_path / "model_store")


def trained_tiny(num_classes: int = 3, width: int = 4, seed: int = 0, tied: bool = False) -> nn.Module:
    """A TinyNet whose BatchNorm statistics and counter are no longer the defaults."""
    torch.manual_seed(seed)
    model = TinyNet(num_classes=num_classes, width=width, tied=tied)
    # Set as training would leave them (cheaper than running training steps).
    model.bn.running_mean.uniform_(-0.5, 0.5)
    model.bn.running_var.uniform_(0.5, 2.0)
    model.bn.num_batches_tracked.fill_(3)
    return model.eval()


SaveTiny = Callable[..., StoredVersion]


@pytest.fixture
def save_tiny(store: ModelStore) -> SaveTiny:
    def save(model: nn.Module | None = None, **overrides: Any) -> StoredVersion:
        fields: dict[str, Any] = {
            "name": "tiny",
            "architecture": "tiny-net",
            "arch_kwargs": {"num_classes": 3, "width": 4},
            "labels": LABELS,
            "preprocessing": PREPROCESSING,
        }
        fields.update(overrides)
        return store.save(model if model is not None else trained_tiny(), **fields)

    return save


@pytest.fixture
def saved(save_tiny: SaveTiny) -> StoredVersion:
    return save_tiny()


def edit_manifest(stored: StoredVersion, change: Callable[[dict[str, Any]], None]) -> None:
    data = json.loads(stored.manifest_path.read_text())
    change(data)
    stored.manifest_path.write_text(json.dumps(data, indent=2))


def rewrite_weights(stored: StoredVersion, state: dict[str, Tensor] | bytes) -> None:
    """Replace the weights and fix up the checksum, so only the content is wrong."""
    if isinstance(state, bytes):
        stored.weights_path.write_bytes(state)
    else:
        save_file(state, str(stored.weights_path))
    digest = sha256_file(stored.weights_path)
    edit_manifest(stored, lambda m: m["weights"].update(sha256=digest))


@pytest.fixture
def manifest_editor() -> Callable[[StoredVersion, Callable[[dict[str, Any]], None]], None]:
    return edit_manifest


@pytest.fixture
def weights_rewriter() -> Callable[[StoredVersion, dict[str, Tensor] | bytes], None]:
    return rewrite_weights


@pytest.fixture
def make_model() -> Callable[..., nn.Module]:
    return trained_tiny
