"""``dgserve.training``: reproducibility, resume, checkpoints, the sparsity penalty, init options."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dgserve.data import CLASSES
from dgserve.models.dgnet.stage import DGStage
from dgserve.models.registry import create_model
from dgserve.model_store import ModelStore
from dgserve.training.run import train
from dgserve.tasks import get_task
from dgserve.training.checkpoint import META, TENSORS

from .conftest import tiny_classifier, tiny_detector


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


def test_same_seed_gives_the_same_weights_and_another_seed_does_not(tmp_path: Path) -> None:
    first, _ = train(tiny_classifier(tmp_path, seed=3))
    second, _ = train(tiny_classifier(tmp_path, seed=3))
    other, _ = train(tiny_classifier(tmp_path, seed=4))
    a, b, c = _weights(first.path), _weights(second.path), _weights(other.path)
    assert first.version == 1 and second.version == 2
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


class _Interrupted(Exception):
    pass


def test_resume_continues_exactly_where_the_interrupted_run_stopped(tmp_path: Path) -> None:
    settings = {"epochs": 2, "sparsity": 0.5}
    straight, straight_history = train(tiny_classifier(tmp_path, name="straight", **settings))

    checkpoints = tmp_path / "ck"

    def stop_after_first_epoch(epoch: int, _: dict[str, object]) -> None:
        if epoch == 1:
            raise _Interrupted

    with pytest.raises(_Interrupted):
        train(tiny_classifier(tmp_path, name="resumed", checkpoint_dir=checkpoints, **settings), stop_after_first_epoch)
    assert json.loads((checkpoints / META).read_text())["epoch"] == 1
    resumed, resumed_history = train(
        tiny_classifier(tmp_path, name="resumed", checkpoint_dir=checkpoints, resume=True, **settings)
    )
    a, b = _weights(straight.path), _weights(resumed.path)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [e["top1"] for e in resumed_history.epochs] == [e["top1"] for e in straight_history.epochs]


def test_resume_refuses_changed_settings(tmp_path: Path) -> None:
    checkpoints = tmp_path / "ck"
    train(tiny_classifier(tmp_path, checkpoint_dir=checkpoints))
    with pytest.raises(ValueError, match="lr"):
        train(tiny_classifier(tmp_path, checkpoint_dir=checkpoints, resume=True, lr=0.1))


def test_checkpoint_is_safetensors_and_json_only(tmp_path: Path) -> None:
    checkpoints = tmp_path / "ck"
    train(tiny_classifier(tmp_path, checkpoint_dir=checkpoints))
    assert sorted(p.name for p in checkpoints.iterdir()) == sorted([META, TENSORS])
    raw = (checkpoints / TENSORS).read_bytes()
    # safetensors: an 8-byte little-endian length, then that many bytes of JSON header.
    # (torch.save writes a zip starting with "PK"; a bare pickle has no such header.)
    header_length = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + header_length])
    assert raw[:2] != b"PK" and all("dtype" in v for k, v in header.items() if k != "__metadata__")
    tensors = load_file(str(checkpoints / TENSORS))
    assert any(k.startswith("model.") for k in tensors) and any(k.startswith("optim.") for k in tensors)
    assert "rng.torch" in tensors
    json.loads((checkpoints / META).read_text())


def test_training_code_never_unpickles() -> None:
    source = Path(__file__).resolve().parents[2] / "app" / "training"
    for path in source.glob("*.py"):
        text = path.read_text()
        assert "import pickle" not in text and "torch.save(" not in text, path
        for line in text.splitlines():
            if "torch.load(" in line:
                assert "weights_only=True" in line, f"{path}: {line}"


def test_sparsity_penalty_lowers_edge_weights_and_closes_edges(tmp_path: Path) -> None:
    settings = {"epochs": 3, "lr": 0.02, "train_size": 64}
    _, plain = train(tiny_classifier(tmp_path, name="plain", sparsity=0.0, **settings))
    _, sparse = train(tiny_classifier(tmp_path, name="sparse", sparsity=20.0, **settings))
    assert sparse.epochs[-1]["train_edge_l1"] < plain.epochs[-1]["train_edge_l1"]
    closed_plain = plain.epochs[-1]["connectivity"]["closed_edge_fraction"]
    closed_sparse = sparse.epochs[-1]["connectivity"]["closed_edge_fraction"]
    assert closed_sparse > closed_plain and closed_sparse > 0.0


def test_router_fine_tuning_changes_only_routers_and_tau(tmp_path: Path) -> None:
    base, _ = train(tiny_classifier(tmp_path, name="base"))
    tuned, _ = train(tiny_classifier(tmp_path, name="tuned", from_store="base:1", train="routers", architecture=None, lr=0.05))
    before, after = _weights(base.path), _weights(tuned.path)
    routed = [k for k in before if ".routers." in k or k.endswith(".tau")]
    assert routed and any(not torch.equal(before[k], after[k]) for k in routed)
    # Everything else, BatchNorm running statistics included, is exactly as stored.
    assert all(torch.equal(before[k], after[k]) for k in before if k not in routed)
    card = (tuned.path / "card.md").read_text()
    assert "Initialised from store model `base` version 1" in card and "trained parameters: routers" in card


def test_router_fine_tuning_needs_a_dgnet(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="routers"):
        train(tiny_classifier(tmp_path, architecture="glore_resnet18_slim", train="routers"))


def test_detector_backbone_initialised_from_a_stored_classifier(tmp_path: Path) -> None:
    classifier, _ = train(tiny_classifier(tmp_path, name="cls", input_size=64))
    detector, history = train(tiny_detector(tmp_path, init_backbone="cls", lr=0.0, augment=False))
    source, target = _weights(classifier.path), _weights(detector.path)
    shared = [k for k in source if not k.startswith("fc.")]
    # lr 0 trains nothing, but BatchNorm statistics still update in train mode.
    stats = ("running_mean", "running_var", "num_batches_tracked")
    assert all(torch.equal(source[k], target[f"backbone.body.{k}"]) for k in shared if not k.endswith(stats))
    assert "mAP50" in history.epochs[-1]
    assert "Backbone initialised from store classifier `cls`" in (detector.path / "card.md").read_text()


def test_store_version_has_manifest_weights_and_card(tmp_path: Path) -> None:
    stored, history = train(tiny_classifier(tmp_path, sparsity=0.1, command="dgserve train ..."))
    loaded = ModelStore(tmp_path / "store").load("tiny")
    assert loaded.manifest.labels[0] == "circle" and loaded.manifest.arch_kwargs["num_classes"] == 8
    assert loaded.manifest.preprocessing.input_size == (32, 32)
    assert any(isinstance(m, DGStage) for m in loaded.model.modules())
    card = (stored.path / "card.md").read_text()
    for needle in ("## Data", "dgserve train ...", "## Held-out metrics per epoch", "Closed edges per image",
                   "Distinct active-edge patterns", f"{history.epochs[-1]['top1']:.4f}"):  # fmt: skip
        assert needle in card


def test_routers_of_an_imported_chain_are_relaxed_so_they_can_learn(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = create_model("dgnet_resnet18_slim", num_classes=8, width=8)
    for stage in (m for m in model.modules() if isinstance(m, DGStage)):
        stage.pin_chain()  # what `dgserve import-torchvision` stores
    ModelStore(tmp_path / "store").save(
        model, name="imported", architecture="dgnet_resnet18_slim", arch_kwargs={"num_classes": 8, "width": 8},
        labels=list(CLASSES), preprocessing=get_task("classification").default_preprocessing(32), dtype="float32",
    )  # fmt: skip
    tuned, _ = train(tiny_classifier(tmp_path, name="tuned", architecture=None, from_store="imported", train="routers",
                                     lr=0.02, sparsity=0.5, epochs=2))  # fmt: skip
    after = _weights(tuned.path)
    assert any(after[k].abs().max() > 1e-3 for k in after if ".routers." in k and k.endswith("fc.weight"))
    assert "pinned routers" in (tuned.path / "card.md").read_text()
