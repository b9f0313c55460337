"""The task seam: every task is looked up by name, and a new one needs only its module.

Parametrized over every registered task, so the next task is checked by these tests
the day it is registered.
"""

from __future__ import annotations

import io
from typing import Any, ClassVar

import pytest
import torch
from PIL import Image
from pydantic import BaseModel, Field, ValidationError

from dgserve.api.app import create_app
from dgserve.data.scenes import render_classification
from dgserve.model_store.manifest import Manifest
from dgserve.models.registry import get_entry, list_models
from dgserve.settings import Settings
from dgserve.tasks import Options, Task, get_task, register_task, tasks
from dgserve.tasks import base as task_base
from dgserve.tasks.classification import Classification
from dgserve.training.config import TrainConfig

TASKS = [t.name for t in tasks()]


@pytest.mark.parametrize("arch", list_models())
def test_every_architecture_names_a_registered_task(arch: str) -> None:
    assert get_entry(arch).task in TASKS


@pytest.mark.parametrize("name", TASKS)
def test_each_task_is_complete(name: str) -> None:
    task = get_task(name)
    assert task.name == name and task.endpoint and task.summary
    assert set(task.data_sources) >= {"generated"}
    pre = task.default_preprocessing(task.default_input_size)
    task.check_preprocessing(pre)  # its own default must pass its own rules
    assert isinstance(task.Options(), Options)
    labels = ["a", "b", "c"]
    task.check_labels(labels, task.head_size(labels))
    with pytest.raises(ValueError):
        task.check_labels(labels, task.head_size(labels) + 1)


@pytest.mark.parametrize("name", TASKS)
def test_each_task_reads_the_generated_data_and_refuses_a_source_it_lacks(name: str) -> None:
    task = get_task(name)
    config = TrainConfig(name="t", train_size=2, val_size=1, max_objects=2)
    data = task.datasets(config, task.default_preprocessing(32))
    assert len(data.train) == 2 and len(data.val) == 1 and data.labels  # type: ignore[arg-type]
    batch = task.collate([data.train[0], data.train[1]]) if task.collate else None
    assert batch is None or len(batch[0]) == 2
    with pytest.raises(ValueError, match="not a source for"):
        task.datasets(TrainConfig(name="t", data="nowhere"), task.default_preprocessing(32))  # type: ignore[arg-type]


def photo_jpeg(width: int, height: int) -> bytes:
    """A generated scene (textured background, one shape) at a camera's size, as a JPEG."""
    scene, _ = render_classification(3, 1, max(width, height))
    buf = io.BytesIO()
    scene.resize((width, height), Image.Resampling.BICUBIC).save(buf, "JPEG", quality=90)
    return buf.getvalue()


@pytest.mark.parametrize("name", [t.name for t in tasks() if "image/jpeg" in t.content_types])
@pytest.mark.parametrize("size", [(640, 480), (333, 500)])
def test_a_reduced_jpeg_decode_changes_the_input_only_where_a_task_resizes_the_whole_image(
    name: str, size: tuple[int, int]
) -> None:
    task = get_task(name)
    pre = task.default_preprocessing(task.default_input_size)
    data = photo_jpeg(*size)
    full, full_info, _ = task.prepare_upload(data, "p", pre, Settings(jpeg_draft=False))
    draft, draft_info, _ = task.prepare_upload(data, "p", pre, Settings(jpeg_draft=True))
    assert (full_info.width, full_info.height) == (draft_info.width, draft_info.height) == size
    assert draft.shape == full.shape
    if not task.whole_image_resized:  # boxes or masks map back onto the full-size upload
        assert torch.equal(draft, full)
    else:  # the same picture through libjpeg's scaled IDCT: close, not equal
        assert not torch.equal(draft, full)
        assert (draft - full).abs().mean() < 0.02  # normalised units (about 1/200 of the range)


def test_a_manifest_with_an_unknown_task_names_the_known_ones() -> None:
    with pytest.raises(ValidationError, match="unknown task 'counting'; known: classification, detection"):
        Manifest.model_validate({
            "schema_version": 1, "name": "x", "version": 1, "architecture": "a", "task": "counting",
            "arch_kwargs": {"num_classes": 2}, "labels": ["a", "b"],
            "preprocessing": {"input_size": [8, 8], "mean": [0.5] * 3, "std": [0.5] * 3},
            "weights": {"sha256": "0" * 64}, "created_at": "2026-01-01T00:00:00Z",
        })  # fmt: skip


def test_an_endpoint_belongs_to_one_task(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(task_base, "_TASKS", dict(task_base._TASKS))

    class Impostor(Classification):
        name: ClassVar[str] = "impostor"

    with pytest.raises(ValueError, match="endpoint 'classify' is taken by task 'classification'"):
        register_task(Impostor)


class CountOptions(Options):
    min_area: int | None = Field(None, ge=0, description="smallest blob counted")


class Count(BaseModel):
    label: str
    count: int


def test_a_new_task_gets_its_route_parameters_and_schema(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    monkeypatch.setattr(task_base, "_TASKS", dict(task_base._TASKS))

    @register_task
    class Counting(Classification):  # a stand-in: only what the API derives is under test
        name: ClassVar[str] = "counting"
        endpoint: ClassVar[str] = "count"
        summary: ClassVar[str] = "Count objects per class."
        Options = CountOptions
        Prediction = Count

    assert isinstance(get_task("counting"), Task)
    spec = create_app(Settings(model_store=tmp_path, data_dir=tmp_path)).openapi()
    operation = spec["paths"]["/v1/models/{name}/count"]["post"]
    params = {p["name"] for p in operation["parameters"]}
    assert params == {"name", "version", "connectivity", "timeout_ms", "tag", "min_area"}
    response = operation["responses"]["200"]["content"]["application/json"]["schema"]["$ref"]
    assert response.endswith("/CountResponse")
    assert spec["components"]["schemas"]["CountResult"]["properties"]["predictions"]["items"]["$ref"].endswith("/Count")
