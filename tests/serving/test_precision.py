"""Reduced precision: the manifest field, its refusal of fp16 off CUDA, and the bundled
classifiers' answers under bf16 autocast on the CPU against their fp32 answers."""

from __future__ import annotations

import json

import pytest
import torch
from pydantic import ValidationError

from dgserve.data.scenes import render_classification
from dgserve.errors import UnsupportedPrecisionError
from dgserve.model_store import LoadedModel, Manifest, ModelStore
from dgserve.serving.worker import ImageResult, ModelWorker, autocast_dtype
from dgserve.settings import default_model_store
from dgserve.tasks import ImageInfo, InferenceItem, get_task

pytestmark = pytest.mark.timeout(300)

CPU = torch.device("cpu")
STORE = default_model_store()


def _items(loaded: LoadedModel, n: int) -> list[InferenceItem]:
    manifest = loaded.manifest
    task = get_task(manifest.task)
    out = []
    for i in range(n):
        image, _ = render_classification(11, i, manifest.preprocessing.input_size[0])
        tensor, context = task.prepare(image, manifest.preprocessing)
        # Every label's score, so the probabilities can be compared class by class.
        options = task.Options(top_k=len(manifest.labels))
        out.append(InferenceItem(tensor, ImageInfo(None, image.width, image.height), options, context))
    return out


def _run(
    loaded: LoadedModel, items: list[InferenceItem], precision: str | None
) -> tuple[ModelWorker, list[ImageResult]]:
    worker = ModelWorker(loaded, CPU, name=f"w-{precision}", precision=precision)  # type: ignore[arg-type]
    try:
        return worker, worker.infer_batch(items)
    finally:
        worker.close()


def test_autocast_dtypes() -> None:
    assert autocast_dtype("fp32", CPU) is None
    assert autocast_dtype("bf16", CPU) is torch.bfloat16
    assert autocast_dtype("fp16", torch.device("cuda", 0)) is torch.float16
    with pytest.raises(UnsupportedPrecisionError, match="fp16 needs a CUDA device"):
        autocast_dtype("fp16", CPU)


def test_manifest_precision_defaults_to_fp32_and_is_left_out_of_fp32_manifests() -> None:
    manifest = ModelStore(STORE).resolve("shapes-dgnet").manifest
    assert manifest.precision == "fp32"
    assert "precision" not in manifest.model_dump()  # stored manifests read and write as before
    data = {**manifest.model_dump(mode="json"), "precision": "bf16"}
    assert Manifest.model_validate(data).model_dump()["precision"] == "bf16"
    with pytest.raises(ValidationError):
        Manifest.model_validate({**data, "precision": "int8"})


def test_fp16_is_refused_on_the_cpu_at_load() -> None:
    loaded = ModelStore(STORE).load("shapes-dgnet")
    with pytest.raises(UnsupportedPrecisionError):
        ModelWorker(loaded, CPU, name="fp16", precision="fp16")
    as_manifest = LoadedModel(loaded.manifest.model_copy(update={"precision": "fp16"}), loaded.model, loaded.path)
    with pytest.raises(UnsupportedPrecisionError):
        ModelWorker(as_manifest, CPU, name="fp16")


def test_manifest_precision_applies_and_the_setting_overrides_it() -> None:
    loaded = ModelStore(STORE).load("shapes-dgnet")
    bf16 = LoadedModel(loaded.manifest.model_copy(update={"precision": "bf16"}), loaded.model, loaded.path)
    assert _run(bf16, _items(bf16, 1), None)[0].manifest.precision == "bf16"
    assert _run(bf16, _items(bf16, 1), "fp32")[0].manifest.precision == "fp32"
    assert _run(loaded, _items(loaded, 1), None)[0].manifest.precision == "fp32"


@pytest.mark.parametrize("name", ["shapes-dgnet", "shapes-glore"])
def test_bf16_on_the_cpu_agrees_with_fp32(name: str) -> None:
    loaded = ModelStore(STORE).load(name)
    items = _items(loaded, 48)
    conv = next(m for m in loaded.model.modules() if isinstance(m, torch.nn.Conv2d))
    dtypes: list[torch.dtype] = []
    hook = conv.register_forward_hook(lambda _m, _i, out: dtypes.append(out.dtype))
    try:
        _, full = _run(loaded, items, None)
        worker, half = _run(loaded, items, "bf16")
    finally:
        hook.remove()
    assert dtypes == [torch.float32, torch.bfloat16]  # the convolutions really ran in bf16
    assert worker.manifest.precision == "bf16"
    agree = sum(a.predictions[0]["index"] == b.predictions[0]["index"] for a, b in zip(full, half, strict=True))
    worst = 0.0
    for a, b in zip(full, half, strict=True):
        scores = {p["index"]: p["score"] for p in b.predictions}
        worst = max(worst, *(abs(p["score"] - scores[p["index"]]) for p in a.predictions))
        # Still plain float32-valued JSON, whatever the forward computed in.
        assert all(type(p["score"]) is float for p in b.predictions)
        assert json.loads(b.connectivity_json) == b.connectivity
    # Measured: 48/48 and 0.0045 (DG-Net), 0.0059 (GloRe) on this machine's CPU.
    assert agree / len(items) >= 0.95, f"top-1 agreement {agree}/{len(items)}"
    assert worst <= 0.05, f"largest probability difference {worst:.4f}"
