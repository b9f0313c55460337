"""ServingService: the one way through for every front-end, on the bundled classifier.

What it promises: admission before any body is read, preparation in the decode pool,
immutable results whose ids are readable at once, and records handed to the store
after the batch, outside the worker, so store time never counts as compute time.
"""

from __future__ import annotations

import asyncio
import gc
import io
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import torch
from PIL import Image

from dgserve.data.scenes import render_classification
from dgserve.errors import InvalidImageError, InvalidRequestError, ModelNotFoundError
from dgserve.metrics import Metrics
from dgserve.serving.service import ServingService, Upload
from dgserve.serving.worker import ModelWorker
from dgserve.settings import Settings
from dgserve.tasks import get_task
from dgserve.tasks.classification import ClassificationOptions

pytestmark = [pytest.mark.asyncio(loop_scope="function"), pytest.mark.timeout(120)]

CLASSIFY = get_task("classification")


def png(index: int) -> bytes:
    image, _ = render_classification(7, index, 64)
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


@pytest_asyncio.fixture
async def service(tmp_path: Path) -> AsyncIterator[ServingService]:
    # A commit wait far past any stall of a loaded machine: an answer that waits on storage
    # that is down would wait all of it.
    settings = Settings(models=["shapes-dgnet", "shapes-detector"], data_dir=tmp_path, torch_threads=1,
                        replica="replica-a", inspection_commit_timeout_s=COMMIT_WAIT_S)  # fmt: skip
    svc = ServingService(settings, Metrics())
    await svc.start()
    try:
        await asyncio.wait_for(svc.loaded(), 100)
        assert svc.models.not_ready() == []
        yield svc
    finally:
        await svc.close()


STORE_S = 1.0  # how far behind test_store_time_is_not_compute_time's store is
COMMIT_WAIT_S = 30.0


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


async def test_infer_returns_immutable_results_with_ids_readable_at_once(service: ServingService) -> None:
    served, _ = service.admit("shapes-dgnet", None, CLASSIFY)
    uploads = [Upload("a.png", png(0), "image/png"), Upload("b.png", png(1), "image/png")]
    items = await service.prepare(served, uploads, ClassificationOptions(top_k=2))
    answers = await service.infer(served, items, service.deadline(None))
    assert [a.image.part for a in answers] == ["a.png", "b.png"] and len({a.id for a in answers}) == 2
    for answer in answers:
        record = await service.inspections.get(answer.id)
        assert record.connectivity == answer.result.connectivity and record.task == "classification"
        assert record.prediction["predictions"] == answer.result.predictions and len(answer.result.predictions) == 2
        assert record.prediction["replica"] == service.settings.replica  # which replica wrote it
        with pytest.raises(AttributeError):
            answer.id = "x"  # type: ignore[misc]


async def test_store_time_is_not_compute_time(service: ServingService) -> None:
    store = service.inspections
    original = store.put

    async def slow_put(record: Any) -> bool:  # a store that has fallen behind
        await asyncio.sleep(STORE_S)
        return await original(record)

    store.put = slow_put  # type: ignore[method-assign]
    served, _ = service.admit("shapes-dgnet", None, CLASSIFY)
    [item] = await service.prepare(served, [Upload(None, png(2), "image/png")], ClassificationOptions())
    metrics, labels = service.metrics, {"model": "shapes-dgnet", "version": "1"}
    computed = sample(metrics, "dgserve_compute_seconds_sum", **labels)  # earlier batches, the warm-up's among them
    [answer] = await service.infer(served, [item], service.deadline(None))
    assert sample(metrics, "dgserve_inspection_record_seconds_sum", **labels) >= STORE_S
    # This one image's forward, timed apart from the store's second (a few ms unloaded).
    assert sample(metrics, "dgserve_compute_seconds_sum", **labels) - computed < STORE_S
    assert (await store.get(answer.id)).id == answer.id


async def test_an_answer_waits_until_its_records_are_durable(service: ServingService) -> None:
    served, _ = service.admit("shapes-dgnet", None, CLASSIFY)
    [item] = await service.prepare(served, [Upload(None, png(4), "image/png")], ClassificationOptions())
    [answer] = await service.infer(served, [item], service.deadline(None))
    assert answer.committed and answer.id is not None
    # Already in the file, not only in the queue: a crash now would not lose it.
    assert service.inspections.backend.get(answer.id) is not None


async def test_with_storage_failing_answers_go_out_at_once_marked_uncommitted(service: ServingService) -> None:
    store = service.inspections
    failures: list[int] = []

    def refuse(*args: Any) -> None:
        failures.append(1)
        raise OSError("disk full")

    store._queue._write = store._queue._write_now = refuse  # the backend starts refusing writes, both ways
    served, _ = service.admit("shapes-dgnet", None, CLASSIFY)
    items = await service.prepare(served, [Upload(None, png(5), "image/png")], ClassificationOptions())
    # The first answer waits out its commit wait through the retries; a short one keeps the test short.
    waiting = service.settings
    service.settings = waiting.model_copy(update={"inspection_commit_timeout_s": 1.0})
    [first] = await service.infer(served, items, service.deadline(None))  # waits for the write that fails
    service.settings = waiting
    assert not first.committed and first.id is not None and failures
    started = asyncio.get_running_loop().time()
    [second] = await service.infer(served, items, service.deadline(None))
    assert not second.committed and asyncio.get_running_loop().time() - started < COMMIT_WAIT_S / 3  # no wait
    assert (await store.get(second.id)).id == second.id  # still queued, readable, written once storage is back


async def test_admission_says_why_not(service: ServingService) -> None:
    with pytest.raises(ModelNotFoundError):
        service.admit("nope", None, CLASSIFY)
    with pytest.raises(InvalidRequestError, match="use POST /v1/models/shapes-detector/detect"):
        service.admit("shapes-detector", None, CLASSIFY)


async def test_the_first_bad_upload_in_order_fails_the_request(service: ServingService) -> None:
    served, _ = service.admit("shapes-dgnet", None, CLASSIFY)
    uploads = [Upload("ok.png", png(0), "image/png"), Upload("bad.png", b"not an image", "image/png"),
               Upload("worse.png", b"", "image/png")]  # fmt: skip
    with pytest.raises(InvalidImageError, match="part 'bad.png'"):
        await service.prepare(served, uploads, ClassificationOptions())


async def test_detection_boxes_come_back_in_the_uploaded_pixels(service: ServingService) -> None:
    detect = get_task("detection")
    served, _ = service.admit("shapes-detector", None, detect)
    big = Image.new("RGB", (1000, 600), (40, 90, 160))
    buf = io.BytesIO()
    big.save(buf, "PNG")
    [item] = await service.prepare(served, [Upload(None, buf.getvalue(), "image/png")], detect.Options())
    assert item.context < 1.0 and max(item.tensor.shape[1:]) < 1000  # downscaled for the detector
    [answer] = await service.infer(served, [item], service.deadline(None))
    assert (answer.image.width, answer.image.height) == (1000, 600)
    for box in answer.result.predictions:
        x1, y1, x2, y2 = box["box"]
        assert 0 <= x1 <= x2 <= 1000 and 0 <= y1 <= y2 <= 600


@pytest.mark.parametrize("keep", [True, False])
async def test_the_service_has_glibc_keep_large_blocks_as_set(
    keep: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[None] = []
    monkeypatch.setattr("dgserve.serving.service.keep_large_blocks", lambda: calls.append(None) or True)
    svc = ServingService(Settings(models=["shapes-dgnet"], data_dir=tmp_path, malloc_keep_large_blocks=keep), Metrics())
    await svc.start()
    await svc.close()
    assert len(calls) == (1 if keep else 0)


@pytest.mark.parametrize(("memory_format", "layout"), [("channels_last", torch.channels_last),
                                                     ("contiguous", torch.contiguous_format)])  # fmt: skip
async def test_the_services_workers_lay_out_convolutions_as_set(
    memory_format: str, layout: torch.memory_format, tmp_path: Path
) -> None:
    settings = Settings(models=["shapes-dgnet"], data_dir=tmp_path, memory_format=memory_format, torch_threads=1)
    svc = ServingService(settings, Metrics())
    try:
        await svc.start()
        await asyncio.wait_for(svc.loaded(), 100)
        [worker] = svc.models.groups["shapes-dgnet"].default.workers
        assert isinstance(worker, ModelWorker)
        convolutions = [m for m in worker.loaded.model.modules() if isinstance(m, torch.nn.Conv2d)]
        assert convolutions and all(c.weight.is_contiguous(memory_format=layout) for c in convolutions)
        assert any(not c.weight.is_contiguous() for c in convolutions) == (memory_format == "channels_last")
    finally:
        await svc.close()


async def test_a_server_process_freezes_its_loaded_models_out_of_the_cyclic_gc(tmp_path: Path) -> None:
    svc = ServingService(Settings(models=["shapes-dgnet"], data_dir=tmp_path, torch_threads=1), Metrics())
    svc.freeze_after_load = True  # as api/server.py does
    try:
        await svc.start()
        await asyncio.wait_for(svc.loaded(), 100)
        assert svc.models.not_ready() == []
        frozen = gc.get_freeze_count()
        stages = [o for o in gc.get_objects() if type(o).__name__ == "DGStage"]
        assert frozen > 10_000
        assert stages == []  # the model's modules are past the collections' reach
    finally:
        gc.unfreeze()  # this test process outlives the service: its objects go back to the collector
        await svc.close()


async def test_a_library_service_leaves_the_gc_alone(service: ServingService) -> None:
    assert service.freeze_after_load is False
    assert any(type(o).__name__ == "DGStage" for o in gc.get_objects())  # its model is still collectable
