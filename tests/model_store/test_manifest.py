from __future__ import annotations

import copy
import json
from typing import Any

import pytest
from pydantic import ValidationError

from dgserve.model_store import Manifest
from dgserve.model_store.manifest import describe_validation_error

EXAMPLE: dict[str, Any] = {
    "schema_version": 1,
    "name": "dgnet-tiny",
    "version": 2,
    "architecture": "tiny-net",
    "task": "classification",
    "arch_kwargs": {"num_classes": 3, "width": 4},
    "labels": ["cat", "dog", "bird"],
    "preprocessing": {
        "input_size": [224, 224],
        "mean": [0.485, 0.456, 0.406],
        "std": [0.229, 0.224, 0.225],
        "interpolation": "bicubic",
        "resize": "center_crop",
        "crop_fraction": 0.875,
    },
    "thresholds": {"top_k": 5, "score_threshold": 0.5, "max_detections": 100},
    "batching": {"max_batch_size": 16, "max_delay_ms": 4.0, "max_queue_size": 128},
    "weights": {"file": "model.safetensors", "sha256": "ab" * 32, "dtype": "float16"},
    "description": "test",
    "created_at": "2025-01-01T12:00:00Z",
}


def manifest_with(**changes: Any) -> dict[str, Any]:
    data = copy.deepcopy(EXAMPLE)
    for dotted, value in changes.items():
        *parents, leaf = dotted.split("__")
        target = data
        for part in parents:
            target = target[part]
        if value is _DELETE:
            del target[leaf]
        else:
            target[leaf] = value
    return data


_DELETE = object()


def problem(data: dict[str, Any]) -> tuple[str | None, str]:
    with pytest.raises(ValidationError) as info:
        Manifest.model_validate_json(json.dumps(data))
    return describe_validation_error(info.value)


def test_example_parses_and_round_trips() -> None:
    manifest = Manifest.model_validate_json(json.dumps(EXAMPLE))
    assert manifest.preprocessing.input_size == (224, 224)
    assert manifest.weights.dtype == "float16"
    again = Manifest.model_validate_json(manifest.model_dump_json())
    assert again == manifest


def test_optional_sections_take_defaults() -> None:
    data = manifest_with(thresholds=_DELETE, batching=_DELETE, description=_DELETE)
    manifest = Manifest.model_validate(data)
    assert manifest.thresholds.top_k == 5
    assert manifest.batching.max_batch_size == 8
    assert manifest.preprocessing.interpolation == "bicubic"


def test_manifest_is_immutable() -> None:
    manifest = Manifest.model_validate(EXAMPLE)
    with pytest.raises(ValidationError):
        manifest.name = "other"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("changes", "field", "text"),
    [
        ({"preprocessing__mean": [123.7, 116.3, 103.5]}, "preprocessing.mean[0]", "less than or equal to 1"),
        ({"preprocessing__std": [0.2, 0.0, 0.2]}, "preprocessing.std[1]", "greater than 0"),
        ({"preprocessing__std": [0.2, 0.2]}, "preprocessing.std", "too few values"),
        ({"preprocessing__input_size": [224, -1]}, "preprocessing.input_size[1]", "greater than 0"),
        ({"preprocessing__interpolation": "lanczos"}, "preprocessing.interpolation", "bilinear"),
        ({"preprocessing__crop_fraction": 1.5}, "preprocessing.crop_fraction", "less than or equal to 1"),
        ({"thresholds__score_threshold": 1.5}, "thresholds.score_threshold", "less than or equal to 1"),
        ({"batching__max_batch_size": 0}, "batching.max_batch_size", "greater than 0"),
        ({"batching__max_delay_ms": -1}, "batching.max_delay_ms", "greater than or equal to 0"),
        ({"batching__max_queue_size": 4}, "batching", "a full batch could never form"),
        ({"weights__sha256": "XYZ"}, "weights.sha256", "pattern"),
        ({"weights__dtype": "bfloat16"}, "weights.dtype", "float32"),
        ({"weights__file": "../../etc/passwd.safetensors"}, "weights.file", "pattern"),
        ({"weights__file": "model.pth"}, "weights.file", "pattern"),
        ({"name": "../escape"}, "name", "pattern"),
        ({"version": 0}, "version", "greater than 0"),
        ({"version": "one"}, "version", "valid integer"),
        ({"schema_version": 2}, "schema_version", "1"),
        ({"task": "counting"}, "task", "classification"),
        ({"created_at": "2025-01-01T12:00:00"}, "created_at", "timezone"),
        ({"labels": []}, "labels", "at least 1"),
        ({"labels": ["cat", "cat", "dog"]}, "labels", "duplicate labels"),
        ({"labels": ["cat", "dog"]}, "labels", "2 labels but arch_kwargs.num_classes=3"),
        ({"arch_kwargs": {"width": 4}}, "arch_kwargs", "num_classes"),
        ({"arch_kwargs": {"num_classes": True}}, "arch_kwargs", "num_classes"),
        ({"preprocessing__interpolaton": "bilinear"}, "preprocessing.interpolaton", "did you mean 'interpolation'"),
        ({"thresold": {}}, "thresold", "unknown field 'thresold'"),
    ],
)
def test_invalid_values_name_their_field(changes: dict[str, Any], field: str, text: str) -> None:
    where, message = problem(manifest_with(**changes))
    assert where == field
    assert text in message


def test_invalid_json_has_no_field() -> None:
    with pytest.raises(ValidationError) as info:
        Manifest.model_validate_json(b"{not json")
    where, message = describe_validation_error(info.value)
    assert where is None
    assert "Invalid JSON" in message


def test_several_problems_are_all_reported() -> None:
    where, message = problem(manifest_with(version=0, preprocessing__std=[0, 0.2, 0.2]))
    assert where == "version"
    assert "version:" in message and "preprocessing.std[0]:" in message


DETECTION = {
    "task": "detection",
    "architecture": "tiny-detector",
    "arch_kwargs": {"num_classes": 4},
    "preprocessing__resize": "letterbox",
}


def test_detection_labels_exclude_background() -> None:
    manifest = Manifest.model_validate(manifest_with(**DETECTION))
    assert manifest.class_name(0) == "__background__"
    assert manifest.class_name(1) == "cat"
    assert manifest.class_name(3) == "bird"


def test_classification_class_name_is_plain_index() -> None:
    assert Manifest.model_validate(EXAMPLE).class_name(0) == "cat"


@pytest.mark.parametrize(
    ("changes", "field", "text"),
    [
        ({"labels": ["__background__", "cat", "dog"]}, "labels", "leave '__background__' out"),
        ({"labels": ["cat", "dog", "bird", "fish"]}, "labels", "needs 3"),
        ({"preprocessing__resize": "center_crop"}, "preprocessing", "use letterbox or stretch"),
    ],
)
def test_detection_rules(changes: dict[str, Any], field: str, text: str) -> None:
    where, message = problem(manifest_with(**{**DETECTION, **changes}))
    assert where == field
    assert text in message


def test_top_k_may_exceed_the_label_count() -> None:
    # The default of 5 must work for a 3-class model; the server returns at most all labels.
    assert Manifest.model_validate(manifest_with(thresholds__top_k=50)).thresholds.top_k == 50
