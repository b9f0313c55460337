"""A versioned model store on disk.

Layout::

    <root>/<name>/<version>/manifest.json      typed metadata, see manifest.py
    <root>/<name>/<version>/model.safetensors  weights (the file named in the manifest)
    <root>/<name>/<version>/card.md            optional model card

Versions are positive integers written as plain directory names ("1", "2", ...);
the highest is the default. A version, once written, is never changed: ``save``
builds the whole directory under a hidden temporary name next to it and renames it
into place, so readers see either nothing or a complete version.

Everything that can be wrong with a stored version surfaces as a ``ManifestError``
(naming the manifest and the field) or a ``WeightsError`` (naming the weights file).
"""

from __future__ import annotations

import hashlib
import re
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from pydantic_core import PydanticSerializationError
from torch import nn

from dgserve.errors import (
    ManifestError,
    ModelNotFoundError,
    StoreError,
    VersionNotFoundError,
    WeightsError,
)
from dgserve.models.registry import ModelEntry, UnknownArchitectureError, create_model, get_entry
from dgserve.model_store.manifest import (
    NAME_PATTERN,
    SCHEMA_VERSION,
    Batching,
    Manifest,
    Preprocessing,
    StorageDtype,
    Thresholds,
    describe_validation_error,
)
from dgserve.model_store.weights import (
    fsync_path,
    load_into,
    read_weights,
    serialize,
    sha256_file,
    storage_state,
    stored_float_dtypes,
    write_durably,
)

MANIFEST = "manifest.json"
WEIGHTS = "model.safetensors"
CARD = "card.md"

_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16"}


@dataclass(frozen=True)
class StoredVersion:
    """One version on disk with its parsed manifest; weights not yet read."""

    name: str
    version: int
    path: Path
    manifest: Manifest

    @property
    def manifest_path(self) -> Path:
        return self.path / MANIFEST

    @property
    def weights_path(self) -> Path:
        return self.path / self.manifest.weights.file

    @property
    def card_path(self) -> Path | None:
        card = self.path / CARD
        return card if card.is_file() else None


@dataclass(frozen=True)
class LoadedModel:
    manifest: Manifest
    model: nn.Module  # in eval mode, float32, on the device asked for
    path: Path

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def version(self) -> int:
        return self.manifest.version


class ModelStore:
    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)

    # --- reading -------------------------------------------------------------

    def names(self) -> list[str]:
        """Models with at least one version."""
        if not self.root.is_dir():
            return []
        return sorted(
            d.name for d in self.root.iterdir() if _valid_name(d.name) and d.is_dir() and _version_numbers(d)
        )

    def versions(self, name: str) -> list[int]:
        found = _version_numbers(self._model_dir(name))
        if not found:
            raise ModelNotFoundError(name)
        return found

    def resolve(self, name: str, version: int | None = None) -> StoredVersion:
        """Find a version (the highest when ``version`` is None) and parse its manifest."""
        available = self.versions(name)
        if version is None:
            version = available[-1]
        elif isinstance(version, bool) or version not in available:
            raise VersionNotFoundError(name, version, available)
        path = self._model_dir(name) / str(version)
        manifest = read_manifest(path / MANIFEST)
        if manifest.name != name:
            raise ManifestError(path / MANIFEST, "name", f"says {manifest.name!r} but the directory is {name!r}")
        if manifest.version != version:
            raise ManifestError(
                path / MANIFEST, "version", f"says {manifest.version} but the directory is {version}"
            )
        return StoredVersion(name, version, path, manifest)

    def load(self, name: str, version: int | None = None, device: str | torch.device = "cpu") -> LoadedModel:
        """Build the architecture, verify and load the weights, move to ``device``, eval mode."""
        stored = self.resolve(name, version)
        manifest, manifest_path, weights_path = stored.manifest, stored.manifest_path, stored.weights_path
        _check_architecture(manifest, manifest_path)

        if not weights_path.is_file():
            raise WeightsError(weights_path, "weights file is missing")
        # Checked before parsing: a file that fails its checksum is not trusted to be parsed.
        actual = sha256_file(weights_path)
        if actual != manifest.weights.sha256:
            raise WeightsError(
                weights_path, f"sha256 is {actual}, manifest weights.sha256 says {manifest.weights.sha256}"
            )
        state = read_weights(weights_path)
        found = sorted(_DTYPE_NAMES.get(d, str(d)) for d in stored_float_dtypes(state))
        if found and found != [manifest.weights.dtype]:
            raise ManifestError(
                manifest_path, "weights.dtype", f"says {manifest.weights.dtype} but the file stores {', '.join(found)}"
            )

        model = _build(manifest, manifest_path)
        load_into(model, state, weights_path)
        model.to(device).eval()
        return LoadedModel(manifest, model, stored.path)

    # --- writing -------------------------------------------------------------

    def save(
        self,
        model: nn.Module,
        *,
        name: str,
        architecture: str,
        arch_kwargs: Mapping[str, Any],
        labels: Sequence[str],
        preprocessing: Preprocessing | Mapping[str, Any],
        task: str | None = None,
        thresholds: Thresholds | Mapping[str, Any] | None = None,
        batching: Batching | Mapping[str, Any] | None = None,
        description: str = "",
        version: int | None = None,
        dtype: StorageDtype = "float32",
        card: str | None = None,
    ) -> StoredVersion:
        """Write ``model`` as a new version (the next one unless ``version`` is given).

        ``task`` defaults to the architecture's. Before anything is published the
        weights are loaded into a freshly built architecture, so ``save`` never
        writes a version that ``load`` would refuse. An existing version is never
        overwritten.
        """
        if not _valid_name(name):
            raise ManifestError(self.root / str(name), "name", f"{name!r} must match {NAME_PATTERN}")
        model_dir = self.root / name
        if version is None:
            version = (_version_numbers(model_dir) or [0])[-1] + 1
        final = model_dir / str(version)
        manifest_path, weights_path = final / MANIFEST, final / WEIGHTS
        if final.exists():
            raise StoreError(f"{final} already exists; stored versions are never overwritten")

        if task is None:
            task = _entry(architecture, manifest_path).task
        fields: dict[str, Any] = {
            "schema_version": SCHEMA_VERSION,
            "name": name,
            "version": version,
            "architecture": architecture,
            "task": task,
            "arch_kwargs": dict(arch_kwargs),
            "labels": list(labels),
            "preprocessing": preprocessing,
            "weights": {"file": WEIGHTS, "sha256": "0" * 64, "dtype": dtype},
            "description": description,
            "created_at": datetime.now(UTC),
        }
        fields.update({k: v for k, v in (("thresholds", thresholds), ("batching", batching)) if v is not None})
        # Verify against what load() will see, so the check below means something.
        manifest = _round_trip(_validate(lambda: Manifest.model_validate(fields), manifest_path), manifest_path)
        _check_architecture(manifest, manifest_path)

        state = storage_state(model, dtype, weights_path)
        load_into(_build(manifest, manifest_path), state, weights_path)
        blob = serialize(state)
        manifest = manifest.model_copy(
            update={"weights": manifest.weights.model_copy(update={"sha256": hashlib.sha256(blob).hexdigest()})}
        )
        text = manifest.model_dump_json(indent=2) + "\n"

        model_dir.mkdir(parents=True, exist_ok=True)
        # Same parent as the final directory, so the rename is atomic; the leading
        # dot keeps it out of versions() while it is being filled.
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{version}-", dir=model_dir))
        try:
            write_durably(tmp / WEIGHTS, blob)
            write_durably(tmp / MANIFEST, text.encode())
            if card is not None:
                write_durably(tmp / CARD, card.encode())
            fsync_path(tmp)
            try:
                # rename() refuses a non-empty target, so a concurrent save of the
                # same version loses here instead of replacing the winner.
                tmp.rename(final)
            except OSError as exc:
                raise StoreError(f"{final} already exists; stored versions are never overwritten") from exc
            fsync_path(model_dir)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return self.resolve(name, version)

    # --- helpers -------------------------------------------------------------

    def _model_dir(self, name: str) -> Path:
        # Names arrive from URLs; refusing anything outside the pattern means a
        # request can never walk the filesystem ("../", absolute paths).
        if not _valid_name(name):
            raise ModelNotFoundError(name)
        return self.root / name


def read_manifest(path: Path) -> Manifest:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ManifestError(path, None, "manifest is missing") from None
    except OSError as exc:
        raise ManifestError(path, None, f"cannot read manifest ({exc})") from exc
    return _validate(lambda: Manifest.model_validate_json(raw), path)


def _validate(parse: Callable[[], Manifest], path: Path) -> Manifest:
    try:
        manifest = parse()
    except ValidationError as exc:
        field, message = describe_validation_error(exc)
        raise ManifestError(path, field, message) from exc
    return manifest


def _round_trip(manifest: Manifest, path: Path) -> Manifest:
    """The manifest exactly as load() will read it back (tuples come back as lists, ...)."""
    try:
        text = manifest.model_dump_json()
    except PydanticSerializationError as exc:
        # arch_kwargs is the one free-form field; everything else is typed.
        raise ManifestError(path, "arch_kwargs", f"not JSON-serialisable ({exc})") from exc
    return _validate(lambda: Manifest.model_validate_json(text), path)


def _entry(architecture: str, manifest_path: Path) -> ModelEntry:
    try:
        return get_entry(architecture)
    except UnknownArchitectureError as exc:
        raise ManifestError(manifest_path, "architecture", str(exc)) from exc


def _check_architecture(manifest: Manifest, manifest_path: Path) -> None:
    entry = _entry(manifest.architecture, manifest_path)
    if entry.task != manifest.task:
        raise ManifestError(
            manifest_path,
            "task",
            f"is {manifest.task!r} but architecture {manifest.architecture!r} is a {entry.task} model",
        )


def _build(manifest: Manifest, manifest_path: Path) -> nn.Module:
    try:
        return create_model(manifest.architecture, **manifest.arch_kwargs)
    except Exception as exc:
        # The builder only sees arch_kwargs, so whatever it raises (an unknown
        # keyword, a bad width, a failed assert) is a problem in this manifest.
        raise ManifestError(
            manifest_path,
            "arch_kwargs",
            f"{manifest.architecture} cannot be built from {manifest.arch_kwargs}: {type(exc).__name__}: {exc}",
        ) from exc


def _valid_name(name: object) -> bool:
    return isinstance(name, str) and re.fullmatch(NAME_PATTERN, name) is not None


def _version_numbers(model_dir: Path) -> list[int]:
    if not model_dir.is_dir():
        return []
    # Only canonical numerals: "01" next to "1" would make two names for one version.
    return sorted(
        int(d.name) for d in model_dir.iterdir() if re.fullmatch(r"[1-9][0-9]*", d.name) and d.is_dir()
    )
