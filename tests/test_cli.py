"""The dgserve command line."""

from __future__ import annotations

from pathlib import Path

import torch
from typer.testing import CliRunner

from dgserve.cli import app
from dgserve.models.dgnet.backbones import build_plain
from dgserve.model_store import ModelStore


def test_import_torchvision_writes_a_store_version_with_identical_logits(tmp_path: Path) -> None:
    torch.manual_seed(0)
    plain = build_plain("dgnet_resnet18", num_classes=4).eval()
    weights = tmp_path / "resnet18.pth"
    torch.save(plain.state_dict(), weights)
    labels = tmp_path / "labels.txt"
    labels.write_text("a\nb\nc\nd\n")
    store = tmp_path / "store"
    args = ["import-torchvision", "dgnet_resnet18", str(weights), "--name", "r18", "--labels", str(labels)]
    result = CliRunner().invoke(app, [*args, "--store", str(store), "--input-size", "64"])
    assert result.exit_code == 0, result.output
    loaded = ModelStore(store).load("r18")
    assert loaded.manifest.architecture == "dgnet_resnet18" and loaded.manifest.labels == ["a", "b", "c", "d"]
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert (loaded.model(x) - plain(x)).abs().max().item() <= 1e-4


def test_models_lists_every_architecture() -> None:
    result = CliRunner().invoke(app, ["models"])
    assert result.exit_code == 0
    assert "dgnet_resnet50" in result.output and "fasterrcnn_glore_resnet50_fpn" in result.output
