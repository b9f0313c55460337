from __future__ import annotations

import json
import pickle
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from dgserve.errors import (
    ManifestError,
    ModelNotFoundError,
    StoreError,
    VersionNotFoundError,
    WeightsError,
)
from dgserve.model_store import LoadedModel, Manifest, ModelStore, StoredVersion

EditManifest = Callable[[StoredVersion, Callable[[dict[str, Any]], None]], None]
RewriteWeights = Callable[[StoredVersion, dict[str, Tensor] | bytes], None]
SaveTiny = Callable[..., StoredVersion]
MakeModel = Callable[..., nn.Module]

X = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))


def manifest_error(store: ModelStore, stored: StoredVersion, field: str | None) -> ManifestError:
    with pytest.raises(ManifestError) as info:
        store.load(stored.name, stored.version)
    err = info.value
    assert err.path == str(stored.manifest_path)
    assert str(stored.manifest_path) in err.message
    assert err.field == field
    if field is not None:
        assert f"[{field}]" in err.message
    return err


def weights_error(store: ModelStore, stored: StoredVersion) -> WeightsError:
    with pytest.raises(WeightsError) as info:
        store.load(stored.name, stored.version)
    assert info.value.path == str(stored.weights_path)
    assert str(stored.weights_path) in info.value.message
    return info.value


# --- round trips ---------------------------------------------------------------


def test_round_trip_gives_identical_outputs(store: ModelStore, save_tiny: SaveTiny, make_model: MakeModel) -> None:
    model = make_model()
    stored = save_tiny(model, description="tiny test net", card="# Tiny\n\nA test model.\n")
    loaded = store.load("tiny")

    assert isinstance(loaded, LoadedModel)
    assert (loaded.name, loaded.version, loaded.path) == ("tiny", 1, stored.path)
    assert not loaded.model.training
    with torch.no_grad():
        assert torch.equal(loaded.model(X), model(X))
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[key], value), key
    assert loaded.manifest.labels == ["cat", "dog", "bird"]
    assert loaded.manifest.description == "tiny test net"
    assert stored.card_path is not None and stored.card_path.read_text().startswith("# Tiny")


def test_float16_storage_round_trip(store: ModelStore, save_tiny: SaveTiny, make_model: MakeModel) -> None:
    model = make_model()
    stored = save_tiny(model, dtype="float16")
    on_disk = load_file(str(stored.weights_path))
    assert on_disk["conv.weight"].dtype == torch.float16
    assert on_disk["bn.num_batches_tracked"].dtype == torch.int64

    loaded = store.load("tiny")
    assert loaded.manifest.weights.dtype == "float16"
    assert all(p.dtype == torch.float32 for p in loaded.model.parameters())
    state = loaded.model.state_dict()
    # Non-float buffers are stored as they are, whatever the storage dtype.
    assert state["bn.num_batches_tracked"].dtype == torch.int64
    assert int(state["bn.num_batches_tracked"]) == int(model.state_dict()["bn.num_batches_tracked"]) == 3
    with torch.no_grad():
        assert torch.allclose(loaded.model(X), model(X), atol=1e-2, rtol=1e-2)


def test_float16_overflow_is_refused(store: ModelStore, save_tiny: SaveTiny, make_model: MakeModel) -> None:
    model = make_model()
    with torch.no_grad():
        model.head.bias[0] = 1e6
    with pytest.raises(WeightsError, match="outside the float16 range"):
        save_tiny(model, dtype="float16")
    assert store.names() == []


def test_tied_weights_save_and_load(store: ModelStore, save_tiny: SaveTiny, make_model: MakeModel) -> None:
    model = make_model(tied=True)
    save_tiny(model, arch_kwargs={"num_classes": 3, "width": 4, "tied": True})
    loaded = store.load("tiny").model
    assert loaded.aux.weight is loaded.head.weight
    with torch.no_grad():
        assert torch.equal(loaded(X), model(X))


def test_detection_round_trip(store: ModelStore, make_model: MakeModel) -> None:
    model = make_model(num_classes=4)
    store.save(
        model,
        name="det",
        architecture="tiny-detector",
        arch_kwargs={"num_classes": 4},
        labels=["cat", "dog", "bird"],
        preprocessing={"input_size": (8, 8), "mean": (0.5,) * 3, "std": (0.25,) * 3, "resize": "letterbox"},
        thresholds={"score_threshold": 0.3},
    )
    loaded = store.load("det")
    assert loaded.manifest.task == "detection"  # taken from the registry entry
    assert loaded.manifest.thresholds.score_threshold == 0.3
    assert loaded.manifest.class_name(1) == "cat"


def test_manifest_file_is_pretty_typed_json(saved: StoredVersion) -> None:
    text = saved.manifest_path.read_text()
    assert text.startswith("{\n  ")
    data = json.loads(text)
    assert data["preprocessing"]["input_size"] == [8, 8]
    assert data["weights"] == {"file": "model.safetensors", "sha256": data["weights"]["sha256"], "dtype": "float32"}
    assert Manifest.model_validate(data) == saved.manifest


# --- versions ------------------------------------------------------------------


def test_highest_version_is_default_and_explicit_versions_load(
    store: ModelStore, save_tiny: SaveTiny, make_model: MakeModel
) -> None:
    first, second = make_model(seed=1), make_model(seed=2)
    assert save_tiny(first).version == 1
    assert save_tiny(second).version == 2
    assert store.versions("tiny") == [1, 2]
    assert store.resolve("tiny").version == 2
    with torch.no_grad():
        assert torch.equal(store.load("tiny").model(X), second(X))
        assert torch.equal(store.load("tiny", 1).model(X), first(X))


def test_versions_sort_numerically_and_ignore_other_entries(store: ModelStore, save_tiny: SaveTiny) -> None:
    for v in (2, 10, 9):
        save_tiny(version=v)
    model_dir = store.root / "tiny"
    (model_dir / "01").mkdir()  # non-canonical numerals would be a second name for version 1
    (model_dir / ".tmp-11-abc").mkdir()  # an interrupted save
    (model_dir / "notes.txt").write_text("x")
    (store.root / "empty-model").mkdir()
    (store.root / ".hidden").mkdir()
    assert store.versions("tiny") == [2, 9, 10]
    assert store.resolve("tiny").version == 10
    assert store.names() == ["tiny"]
    assert save_tiny().version == 11


def test_names_on_missing_root() -> None:
    assert ModelStore(Path("/nonexistent/store")).names() == []


def test_explicit_version_is_never_overwritten(store: ModelStore, save_tiny: SaveTiny) -> None:
    save_tiny(version=3)
    before = (store.root / "tiny" / "3" / "manifest.json").read_bytes()
    with pytest.raises(StoreError, match="already exists"):
        save_tiny(version=3)
    assert (store.root / "tiny" / "3" / "manifest.json").read_bytes() == before


def test_failed_save_leaves_nothing_behind(store: ModelStore, save_tiny: SaveTiny, make_model: MakeModel) -> None:
    save_tiny()
    with pytest.raises(WeightsError, match="shape mismatches"):
        save_tiny(make_model(width=5))  # manifest says width 4
    assert sorted(p.name for p in (store.root / "tiny").iterdir()) == ["1"]


def test_save_rejects_bad_manifest_fields(store: ModelStore, save_tiny: SaveTiny) -> None:
    with pytest.raises(ManifestError) as info:
        save_tiny(preprocessing={"input_size": (8, 8), "mean": (0.5,) * 3, "std": (0.0, 0.2, 0.2)})
    assert info.value.field == "preprocessing.std[0]"
    with pytest.raises(ManifestError) as info:
        save_tiny(name="../escape")
    assert info.value.field == "name"
    with pytest.raises(ManifestError) as info:
        save_tiny(arch_kwargs={"num_classes": 3, "width": 4, "act": "relu"})  # the builder has no `act`
    assert info.value.field == "arch_kwargs" and "act" in info.value.message
    with pytest.raises(ManifestError) as info:
        save_tiny(arch_kwargs={"num_classes": 3, "width": 4, "tied": torch.tensor(False)})
    assert info.value.field == "arch_kwargs" and "not JSON-serialisable" in info.value.message
    assert not (store.root / "tiny").exists()


def test_arch_kwargs_are_stored_as_json(store: ModelStore, save_tiny: SaveTiny) -> None:
    # A tuple comes back from JSON as a list; save verifies with what load will see.
    stored = save_tiny(arch_kwargs={"num_classes": 3, "width": 4, "padding": (1, 1)}, labels=("cat", "dog", "bird"))
    assert stored.manifest.arch_kwargs["padding"] == [1, 1]
    assert stored.manifest.labels == ["cat", "dog", "bird"]
    assert store.load("tiny").manifest == stored.manifest


def test_save_rejects_a_model_of_another_architecture(save_tiny: SaveTiny) -> None:
    with pytest.raises(WeightsError, match="missing keys"):
        save_tiny(nn.Sequential(nn.Linear(2, 2)))


# --- not found -----------------------------------------------------------------


def test_unknown_model(store: ModelStore, saved: StoredVersion) -> None:
    with pytest.raises(ModelNotFoundError, match="'nope'"):
        store.load("nope")
    with pytest.raises(ModelNotFoundError):
        store.versions("nope")


@pytest.mark.parametrize("name", ["../tiny", "/etc", "tiny/1", "", "Tiny"])
def test_names_outside_the_pattern_never_touch_the_filesystem(
    store: ModelStore, saved: StoredVersion, name: str
) -> None:
    with pytest.raises(ModelNotFoundError):
        store.resolve(name)


def test_unknown_version(store: ModelStore, saved: StoredVersion) -> None:
    with pytest.raises(VersionNotFoundError) as info:
        store.load("tiny", 7)
    assert "tiny" in info.value.message and "available: 1" in info.value.message


def test_bool_is_not_a_version(store: ModelStore, saved: StoredVersion) -> None:
    with pytest.raises(VersionNotFoundError):
        store.resolve("tiny", True)


# --- manifest errors -----------------------------------------------------------


def test_missing_manifest(store: ModelStore, saved: StoredVersion) -> None:
    saved.manifest_path.unlink()
    err = manifest_error(store, saved, None)
    assert "missing" in err.message


def test_invalid_json(store: ModelStore, saved: StoredVersion) -> None:
    saved.manifest_path.write_text('{"schema_version": 1, "name": ')
    err = manifest_error(store, saved, None)
    assert "Invalid JSON" in err.message


def test_manifest_not_an_object(store: ModelStore, saved: StoredVersion) -> None:
    saved.manifest_path.write_text("[1, 2]")
    manifest_error(store, saved, None)


def test_unknown_field_typo(store: ModelStore, saved: StoredVersion, manifest_editor: EditManifest) -> None:
    manifest_editor(saved, lambda m: m["preprocessing"].update(interpolaton="bicubic"))
    err = manifest_error(store, saved, "preprocessing.interpolaton")
    assert "did you mean 'interpolation'" in err.message


def test_top_level_typo(store: ModelStore, saved: StoredVersion, manifest_editor: EditManifest) -> None:
    manifest_editor(saved, lambda m: m.update(lables=m["labels"]))
    err = manifest_error(store, saved, "lables")
    assert "did you mean 'labels'" in err.message


def test_wrong_type_names_the_field(store: ModelStore, saved: StoredVersion, manifest_editor: EditManifest) -> None:
    manifest_editor(saved, lambda m: m["preprocessing"].update(mean="imagenet"))
    err = manifest_error(store, saved, "preprocessing.mean")
    assert "'imagenet'" in err.message


def test_out_of_range_names_the_item(store: ModelStore, saved: StoredVersion, manifest_editor: EditManifest) -> None:
    manifest_editor(saved, lambda m: m["preprocessing"].update(std=[0.2, -0.1, 0.2]))
    manifest_error(store, saved, "preprocessing.std[1]")


def test_unknown_architecture(store: ModelStore, saved: StoredVersion, manifest_editor: EditManifest) -> None:
    manifest_editor(saved, lambda m: m.update(architecture="dgnet-huge"))
    err = manifest_error(store, saved, "architecture")
    assert "dgnet-huge" in err.message and "tiny-net" in err.message


def test_task_mismatch(store: ModelStore, saved: StoredVersion, manifest_editor: EditManifest) -> None:
    def as_detection(m: dict[str, Any]) -> None:
        # A manifest that is valid for detection, pointing at a classification net.
        m.update(task="detection", labels=["cat", "dog"])
        m["preprocessing"]["resize"] = "letterbox"

    manifest_editor(saved, as_detection)
    err = manifest_error(store, saved, "task")
    assert "classification" in err.message


def test_labels_do_not_match_num_classes(
    store: ModelStore, saved: StoredVersion, manifest_editor: EditManifest
) -> None:
    manifest_editor(saved, lambda m: m.update(labels=["cat", "dog"]))
    err = manifest_error(store, saved, "labels")
    assert "2 labels but arch_kwargs.num_classes=3" in err.message


def test_arch_kwargs_the_builder_rejects(
    store: ModelStore, saved: StoredVersion, manifest_editor: EditManifest
) -> None:
    manifest_editor(saved, lambda m: m["arch_kwargs"].update(widht=8))
    err = manifest_error(store, saved, "arch_kwargs")
    assert "widht" in err.message


def test_dtype_in_manifest_disagrees_with_file(
    store: ModelStore, saved: StoredVersion, manifest_editor: EditManifest
) -> None:
    manifest_editor(saved, lambda m: m["weights"].update(dtype="float16"))
    err = manifest_error(store, saved, "weights.dtype")
    assert "float32" in err.message


def test_version_directory_mismatch(store: ModelStore, saved: StoredVersion) -> None:
    shutil.copytree(saved.path, saved.path.parent / "2")
    with pytest.raises(ManifestError) as info:
        store.load("tiny")
    copied = saved.path.parent / "2" / "manifest.json"
    assert info.value.field == "version"
    assert info.value.message.startswith(f"{copied} [version]")


def test_name_directory_mismatch(store: ModelStore, saved: StoredVersion) -> None:
    shutil.copytree(store.root / "tiny", store.root / "other")
    with pytest.raises(ManifestError) as info:
        store.load("other")
    assert info.value.field == "name"
    assert str(store.root / "other" / "1" / "manifest.json") in info.value.message
    assert "'tiny'" in info.value.message


# --- weights errors ------------------------------------------------------------


def test_sha256_mismatch(store: ModelStore, saved: StoredVersion) -> None:
    data = bytearray(saved.weights_path.read_bytes())
    data[-1] ^= 0xFF
    saved.weights_path.write_bytes(bytes(data))
    err = weights_error(store, saved)
    assert "sha256" in err.message and saved.manifest.weights.sha256 in err.message


def test_missing_weights_file(store: ModelStore, saved: StoredVersion) -> None:
    saved.weights_path.unlink()
    assert "missing" in weights_error(store, saved).message


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_unreadable_safetensors(
    store: ModelStore, saved: StoredVersion, weights_rewriter: RewriteWeights, damage: str
) -> None:
    blob = saved.weights_path.read_bytes()
    broken = {"truncated": blob[: len(blob) // 2], "garbage": bytes(range(256)) * 4, "empty": b""}[damage]
    weights_rewriter(saved, broken)
    assert "not a readable safetensors file" in weights_error(store, saved).message


def _state(stored: StoredVersion) -> dict[str, Tensor]:
    return load_file(str(stored.weights_path))


def test_missing_key(store: ModelStore, saved: StoredVersion, weights_rewriter: RewriteWeights) -> None:
    state = _state(saved)
    del state["head.bias"]
    weights_rewriter(saved, state)
    err = weights_error(store, saved)
    assert "1 missing keys: head.bias" in err.message


def test_many_missing_keys_are_summarised(
    store: ModelStore, saved: StoredVersion, weights_rewriter: RewriteWeights
) -> None:
    weights_rewriter(saved, {"only": torch.zeros(1)})
    err = weights_error(store, saved)
    assert "missing keys" in err.message and "more)" in err.message
    assert "1 unexpected keys: only" in err.message


def test_unexpected_key(store: ModelStore, saved: StoredVersion, weights_rewriter: RewriteWeights) -> None:
    state = _state(saved)
    state["extra.weight"] = torch.zeros(3)
    weights_rewriter(saved, state)
    assert "1 unexpected keys: extra.weight" in weights_error(store, saved).message


def test_shape_mismatch(store: ModelStore, saved: StoredVersion, weights_rewriter: RewriteWeights) -> None:
    state = _state(saved)
    state["head.weight"] = torch.zeros(5, 4)
    weights_rewriter(saved, state)
    assert "head.weight (5, 4) vs model (3, 4)" in weights_error(store, saved).message


def test_integer_buffer_stored_as_float(
    store: ModelStore, saved: StoredVersion, weights_rewriter: RewriteWeights
) -> None:
    state = _state(saved)
    state["bn.num_batches_tracked"] = state["bn.num_batches_tracked"].float()
    weights_rewriter(saved, state)
    assert "bn.num_batches_tracked stored as torch.float32" in weights_error(store, saved).message


# --- never unpickle --------------------------------------------------------------


class _Booby:
    """Unpickling this writes a marker file: proof that something ran pickle.load."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.write_text, (self.marker, "unpickled"))


@pytest.fixture
def no_unpickling(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the store must never unpickle")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)


def test_pickles_in_the_version_directory_are_ignored(
    store: ModelStore, saved: StoredVersion, tmp_path: Path, no_unpickling: None
) -> None:
    marker = tmp_path / "marker"
    (saved.path / "model.pth").write_bytes(pickle.dumps(_Booby(marker)))
    (saved.path / "model.pkl").write_bytes(pickle.dumps(_Booby(marker)))
    store.load("tiny")
    assert not marker.exists()


def test_weights_that_are_a_pickle_are_rejected(
    store: ModelStore, saved: StoredVersion, weights_rewriter: RewriteWeights, tmp_path: Path, no_unpickling: None
) -> None:
    marker = tmp_path / "marker"
    weights_rewriter(saved, pickle.dumps(_Booby(marker)))
    assert "not a readable safetensors file" in weights_error(store, saved).message
    assert not marker.exists()


def test_weights_that_are_a_torch_save_zip_are_rejected(
    store: ModelStore, saved: StoredVersion, weights_rewriter: RewriteWeights, tmp_path: Path
) -> None:
    pth = tmp_path / "w.pth"
    torch.save(_state(saved), pth)
    weights_rewriter(saved, pth.read_bytes())
    weights_error(store, saved)


def test_manifest_cannot_point_at_a_pickle(
    store: ModelStore, saved: StoredVersion, manifest_editor: EditManifest
) -> None:
    (saved.path / "model.pth").write_bytes(b"\x80\x04N.")
    manifest_editor(saved, lambda m: m["weights"].update(file="model.pth"))
    manifest_error(store, saved, "weights.file")
