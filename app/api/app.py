"""The app factory: ``create_app(settings)`` wires settings, metrics, models and routes.

Nothing is started here: the decode pool, the inspection store and model loading
start in the lifespan. Startup scans the store's manifests (milliseconds), then loads
the models in a background task, so ``/healthz`` answers at once and ``/readyz``
turns 200 once every model is loaded and warmed up.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from functools import partial

from fastapi import FastAPI
from starlette.types import Scope

from dgserve import __version__
from dgserve.api import AppState
from dgserve.api.errors import RequestContextMiddleware, endpoint_of, install_error_handlers
from dgserve.api.routes import health, inference, inspections, metrics, models
from dgserve.inspection import InspectionRecord, open_inspection_store
from dgserve.metrics import Metrics
from dgserve.serving.images import new_decode_pool
from dgserve.serving.registry import ModelRegistry, ServedModel
from dgserve.serving.runner import BatchSink, ImageResult, InferenceItem
from dgserve.settings import Settings
from dgserve.store import ModelStore

__all__ = ["create_app"]

log = logging.getLogger(__name__)

# Refusals the batcher does not count itself (it counts queue_full, deadline, cancelled).
_INPUT_REJECTIONS = frozenset(
    {"payload_too_large", "unsupported_media_type", "invalid_image", "image_too_large", "not_ready"}
)

DESCRIPTION = """\
Serves DG-Net and GloRe models and returns, with every prediction, the path the image
took: per DG-Net stage the thresholded edge weights and the blocks that ran, per GloRe
unit the interaction graph and the image's projection. Every result is stored and can
be fetched again from `/v1/inspections/{id}`.
"""


def create_app(settings: Settings) -> FastAPI:
    metrics_ = Metrics()
    registry = ModelRegistry(
        settings, ModelStore(settings.model_store), metrics_, sink_factory=lambda served: _record_sink(state, served)
    )
    state = AppState(settings=settings, metrics=metrics_, registry=registry)
    app = FastAPI(title="dgserve", version=__version__, description=DESCRIPTION, lifespan=_lifespan)
    app.state.dgserve = state
    install_error_handlers(app)
    app.add_middleware(RequestContextMiddleware, on_response=partial(_observe_request, metrics_))
    for module in (inference, inspections, models, health, metrics):
        app.include_router(module.router)
    return app


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    state: AppState = app.state.dgserve
    settings = state.settings
    state.decode_pool = new_decode_pool(settings.decode_threads)
    store = None
    try:
        await asyncio.to_thread(settings.data_dir.mkdir, parents=True, exist_ok=True)
        store = open_inspection_store(
            settings.inspection_db,
            max_age_s=settings.inspection_max_age_s,
            max_records=settings.inspection_max_records,
        )
        await store.start()
        state.inspections = store
        await asyncio.to_thread(state.registry.discover)
        state.load_task = asyncio.create_task(_load_models(state), name="dgserve-load-models")
        yield
    finally:
        if state.load_task is not None:
            state.load_task.cancel()
            await asyncio.gather(state.load_task, return_exceptions=True)
        await state.registry.close()
        if store is not None:
            state.inspections = None
            await store.close()
        state.decode_pool.shutdown(wait=False, cancel_futures=True)
        state.decode_pool = None


async def _load_models(state: AppState) -> None:
    try:
        await state.registry.load_all()
    except Exception:
        # load_all records each model's failure itself; this is the store itself failing.
        log.exception("loading models failed")


def _record_sink(state: AppState, served: ServedModel) -> BatchSink:
    """After each batch: one inspection record per image, queued in the store."""

    async def sink(items: Sequence[InferenceItem], results: list[ImageResult]) -> None:
        store = state.require_inspections()
        assert served.manifest is not None  # a worker exists only for a loaded manifest
        task = served.manifest.task
        for item, result in zip(items, results, strict=True):
            height, width = item.image_size
            record = InspectionRecord.new(
                model=served.name,
                version=served.version,
                task=task,
                prediction={
                    "image": {"part": item.part, "width": width, "height": height},
                    "predictions": result.predictions,
                },
                connectivity=result.connectivity,
                connectivity_json=result.connectivity_json,
            )
            result.inspection_id = record.id
            await store.put(record)
        state.metrics.observe_connectivity(served.name, served.version, [r.record for r in results])

    return sink


def _observe_request(metrics_: Metrics, scope: Scope, status: int, seconds: float) -> None:
    scope_state = scope.get("state", {})
    model, version = scope_state.get("model", ("", ""))
    metrics_.observe_request(model, version, endpoint_of(scope), status, seconds)
    code = scope_state.get("error_code")
    if model and code in _INPUT_REJECTIONS:  # inference requests only, not /readyz probes
        metrics_.observe_rejection(model, version, code)
