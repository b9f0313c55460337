"""The app factory: ``create_app(settings)`` wires settings, metrics, the serving service and routes.

Nothing is started here: the serving service starts in the lifespan. Startup scans the
store's manifests (milliseconds), then loads the models in a background task, so
``/healthz`` answers at once and ``/readyz`` turns 200 once every model is loaded and
warmed up.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

from fastapi import Depends, FastAPI
from starlette.types import Scope

from dgserve import __version__
from dgserve.api.auth import ApiKeys, authorize, document_security
from dgserve.api.deps import AppState
from dgserve.api.drain import DrainGuard
from dgserve.api.errors import RequestContextMiddleware, endpoint_of, install_error_handlers
from dgserve.api.routes import analysis, health, inference, inspections, inspector, metrics, models
from dgserve.inspection.readers import ReaderPool
from dgserve.metrics import Metrics
from dgserve.api.siblings import Siblings
from dgserve.oip import http as oip_http
from dgserve.oip.frontend import OipFrontend
from dgserve.serving.service import ServingService
from dgserve.settings import Settings

__all__ = ["create_app"]

log = logging.getLogger(__name__)

# Refusals that happen before the batcher (which counts queue_full, deadline, cancelled
# and shutting_down itself): a body or an image the server will not take.
_INPUT_REJECTIONS = frozenset(
    {"payload_too_large", "unsupported_media_type", "invalid_image", "image_too_large", "not_ready"}
)

DESCRIPTION = """\
Serves DG-Net and GloRe models and returns, with every prediction, the path the image
took: per DG-Net stage the thresholded edge weights and the blocks that ran, per GloRe
unit the interaction graph and the image's projection. Every result is stored and can
be fetched again from `/v1/inspections/{id}`.
"""


def create_app(settings: Settings, siblings: Siblings | None = None) -> FastAPI:
    """The app; ``siblings`` when it is one of several server processes (``api/processes.py``)."""
    metrics_ = Metrics()
    keys = ApiKeys.from_settings(settings)  # a malformed key or file fails here, at start
    state = AppState(settings=settings, metrics=metrics_, service=ServingService(settings, metrics_), api_keys=keys,
                     siblings=siblings)  # fmt: skip
    if settings.read_workers:  # its processes start at the first heavy read
        state.readers = ReaderPool(settings.inspection_location, workers=settings.read_workers,
                                   niceness=settings.read_nice, idle_s=state.service.models.idle_s,
                                   yield_s=settings.read_yield_ms / 1000)  # fmt: skip
    # authorize runs before every API route (the probes, /metrics and docs pass freely).
    app = FastAPI(title="dgserve", version=__version__, description=DESCRIPTION, lifespan=_lifespan,
                  dependencies=[Depends(authorize)])  # fmt: skip
    app.state.dgserve = state
    install_error_handlers(app)
    # Inside RequestContextMiddleware, so a drain's 503 has a request id and is counted.
    app.add_middleware(DrainGuard, drain=state.drain)
    app.add_middleware(RequestContextMiddleware, on_response=partial(_observe_request, metrics_))
    inference.install(app)
    oip_http.install(app, OipFrontend(state.service))
    for module in (analysis, inspections, models, health, metrics, inspector):  # analysis first: /v1/inspections/export
        app.include_router(module.router)
    _document_settings(app, settings, keys)
    return app


def _document_settings(app: FastAPI, settings: Settings, keys: ApiKeys) -> None:
    """What the OpenAPI document says that depends on settings, so it matches what the server does."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = generate()
            # The listing's ?limit= cap is a setting (DGSERVE_INSPECTION_LIST_MAX).
            for operation in schema["paths"].get("/v1/inspections", {}).values():
                for parameter in operation.get("parameters", []):
                    if parameter["name"] == "limit":
                        parameter["schema"]["maximum"] = settings.inspection_list_max
            app.openapi_schema = document_security(schema) if keys.enabled else schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    state: AppState = app.state.dgserve
    grpc_server = None
    metrics_server = None
    try:
        if state.siblings is not None:  # the siblings' scrapes read this process's metrics here
            metrics_server = await state.siblings.serve(lambda: state.metrics.render()[0])
        await state.service.start()
        if state.siblings is not None:  # one of several: listen once it serves (api/siblings.py)
            await state.service.loaded()  # uvicorn starts listening when this returns
            state.siblings.mark_serving()
        grpc_server = await _start_grpc(state)
        yield
    finally:
        if grpc_server is not None:
            # New calls are refused at once; calls in flight get a moment to finish.
            await grpc_server.stop(grace=5.0)
        if state.readers is not None:
            await state.readers.close()
        await state.service.close()
        if metrics_server is not None:
            metrics_server.close()


async def _start_grpc(state: AppState) -> Any:
    settings = state.settings
    if settings.grpc_port is None:
        return None
    try:
        from dgserve.oip.grpc import start_grpc_server
    except ImportError as exc:
        log.warning("the OIP gRPC service is off: it needs pip install 'dgserve[grpc]' (%s)", exc)
        return None
    server, state.grpc_port = await start_grpc_server(state.service, settings.host, settings.grpc_port, state.api_keys)
    return server


def _observe_request(metrics_: Metrics, scope: Scope, status: int, seconds: float) -> None:
    scope_state = scope.get("state", {})
    model, version = scope_state.get("model", ("", ""))
    metrics_.observe_request(model, version, endpoint_of(scope), status, seconds)
    code = scope_state.get("error_code")
    if model and code in _INPUT_REJECTIONS:  # inference requests only, not /readyz probes
        metrics_.observe_rejection(model, version, code)
