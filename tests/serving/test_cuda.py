"""The CUDA path: workers on a GPU give the CPU's answers, through the real app too.

Skipped where no CUDA device is present (the CI machine); run them on a GPU host with
``.venv/bin/python -m pytest tests/serving/test_cuda.py``.
"""

from __future__ import annotations

import asyncio
import io
from pathlib import Path

import pytest
import torch
from PIL import Image

from dgserve.data.scenes import render_classification, render_detection_scene
from dgserve.serving.decode import decode_image
from dgserve.serving.worker import ModelWorker
from dgserve.tasks import ImageInfo, InferenceItem, get_task
from dgserve.settings import Settings, default_model_store
from dgserve.model_store import ModelStore

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.usefixtures("full_precision"),  # tests/conftest.py: no TF32
    pytest.mark.timeout(300),
]

STORE = default_model_store()
CPU, GPU = torch.device("cpu"), torch.device("cuda", 0)


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def _items(name: str, n: int) -> list[InferenceItem]:
    manifest = ModelStore(STORE).load(name).manifest
    out = []
    for i in range(n):
        if manifest.task == "classification":
            image, _ = render_classification(7, i, manifest.preprocessing.input_size[0])
        else:
            image = render_detection_scene(7, i, 128, 5).image
        img = decode_image(_png(image), max_pixels=10**8)
        task = get_task(manifest.task)
        tensor, context = task.prepare(img, manifest.preprocessing)
        out.append(InferenceItem(tensor, ImageInfo(None, img.width, img.height), task.Options(), context))
    return out


@pytest.mark.parametrize("name", ["shapes-dgnet", "shapes-glore", "shapes-detector"])
def test_gpu_worker_matches_cpu_worker(name: str) -> None:
    store = ModelStore(STORE)
    cpu = ModelWorker(store.load(name, device=CPU), CPU, name="cpu")
    gpu = ModelWorker(store.load(name, device=GPU), GPU, name="gpu")
    try:
        batch = _items(name, 4)
        on_cpu, on_gpu = cpu.infer_batch(batch), gpu.infer_batch(batch)
    finally:
        cpu.close()
        gpu.close()
    for a, b in zip(on_cpu, on_gpu, strict=True):
        if cpu.manifest.task == "classification":
            assert a.predictions[0]["index"] == b.predictions[0]["index"]
            gpu_scores = {p["index"]: p["score"] for p in b.predictions}
            for p in a.predictions:  # by class: near-tied low classes may swap places
                if p["index"] in gpu_scores:
                    assert p["score"] == pytest.approx(gpu_scores[p["index"]], abs=1e-3)
        else:
            assert a.predictions and len(a.predictions) == len(b.predictions)
            for pa, pb in zip(a.predictions, b.predictions, strict=True):
                assert pa["label"] == pb["label"]
                assert pa["box"] == pytest.approx(pb["box"], abs=1.0)
        for sa, sb in zip(a.connectivity["stages"], b.connectivity["stages"], strict=True):
            assert sa["executed"] == sb["executed"]
            assert torch.allclose(torch.tensor(sa["adjacency"]), torch.tensor(sb["adjacency"]), atol=1e-3)
        for ua, ub in zip(a.connectivity["glore_units"], b.connectivity["glore_units"], strict=True):
            assert torch.allclose(torch.tensor(ua["adjacency"]), torch.tensor(ub["adjacency"]), atol=1e-5)


def test_gpu_worker_copies_from_pinned_memory_on_its_own_stream(monkeypatch: pytest.MonkeyPatch) -> None:
    worker = ModelWorker(ModelStore(STORE).load("shapes-dgnet", device=GPU), GPU, name="gpu")
    pinned: list[bool] = []
    streams: list[bool] = []
    real_pin = torch.Tensor.pin_memory

    def spy(tensor: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        out = real_pin(tensor, *args, **kwargs)
        pinned.append(out.is_pinned())
        streams.append(torch.cuda.current_stream(GPU) == worker._stream)
        return out

    monkeypatch.setattr(torch.Tensor, "pin_memory", spy)
    try:
        assert worker._stream is not None and worker._stream != torch.cuda.default_stream(GPU)
        [result] = worker.infer_batch(_items("shapes-dgnet", 1))
        assert result.connectivity["stages"]
    finally:
        worker.close()
    assert pinned == [True] and streams == [True]  # one pinned batch, copied on the worker's stream


def test_app_serves_on_the_gpu(tmp_path: Path) -> None:
    import httpx

    from dgserve.api.app import create_app

    async def scenario() -> None:
        app = create_app(Settings(model_store=STORE, data_dir=tmp_path, devices="cuda:0", grpc_port=None))
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=120) as client:
                for _ in range(1200):  # a minute at most; a model that fails to load says why below
                    if (await client.get("/readyz")).status_code == 200:
                        break
                    await asyncio.sleep(0.05)
                else:
                    pytest.fail(f"not ready: {(await client.get('/v1/models')).text}")
                image, _ = render_classification(7, 0, 64)
                response = await client.post("/v1/models/shapes-dgnet/classify", content=_png(image),
                                             headers={"content-type": "image/png"})  # fmt: skip
                assert response.status_code == 200, response.text
                result = response.json()["results"][0]
                record = (await client.get(f"/v1/inspections/{result['id']}")).json()
                assert record["connectivity"] == result["connectivity"]
                described = (await client.get("/v1/models/shapes-dgnet")).json()
                assert [v["devices"] for v in described["versions"]] == [["cuda:0"]]

    asyncio.run(scenario())


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("name", ["shapes-dgnet", "shapes-glore"])
def test_reduced_precision_on_the_gpu_agrees_with_fp32(name: str, precision: str) -> None:
    store = ModelStore(STORE)
    loaded = store.load(name, device=GPU)
    full = ModelWorker(loaded, GPU, name="fp32")
    half = ModelWorker(loaded, GPU, name=precision, precision=precision)  # type: ignore[arg-type]
    try:
        assert half.manifest.precision == precision
        batch = _items(name, 16)
        a_results, b_results = full.infer_batch(batch), half.infer_batch(batch)
    finally:
        full.close()
        half.close()
    agree = sum(a.predictions[0]["index"] == b.predictions[0]["index"] for a, b in zip(a_results, b_results))
    assert agree >= 15, f"top-1 agreement {agree}/16 under {precision}"
    for a, b in zip(a_results, b_results, strict=True):
        scores = {p["index"]: p["score"] for p in b.predictions}
        for p in a.predictions:
            if p["index"] in scores:
                assert p["score"] == pytest.approx(scores[p["index"]], abs=0.05)
        assert all(type(p["score"]) is float for p in b.predictions)
