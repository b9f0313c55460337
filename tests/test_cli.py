"""The dgserve command line."""

from __future__ import annotations

from pathlib import Path

import torch
from typer.testing import CliRunner

from dgserve.cli import app
from dgserve.models.connectivity import describe_graph
from dgserve.models.dgnet.backbones import build_plain
from dgserve.models.registry import create_model
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


def test_train_keeps_a_random_wiring_in_the_manifest(tmp_path: Path) -> None:
    """``-k wiring=... -k wiring_seed=...`` reach the builder and the manifest, and rebuild the same graph."""
    store = tmp_path / "store"
    args = ["train", "dgnet_mobilenet_v2", "--name", "rw", "--store", str(store), "--train-size", "32",
            "--val-size", "8", "--input-size", "32", "--epochs", "1", "--batch-size", "16", "--threads", "1",
            "--no-progress", "-k", "wiring=er", "-k", "wiring_seed=3", "-k", "routing=static"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    loaded = ModelStore(store).load("rw")
    kwargs = loaded.manifest.arch_kwargs
    assert (kwargs["wiring"], kwargs["wiring_seed"], kwargs["routing"]) == ("er", 3, "static")
    stages = describe_graph(loaded.model)["stages"]
    assert stages == describe_graph(create_model("dgnet_mobilenet_v2", **kwargs))["stages"]
    assert stages != describe_graph(create_model("dgnet_mobilenet_v2", **{**kwargs, "wiring_seed": 4}))["stages"]
