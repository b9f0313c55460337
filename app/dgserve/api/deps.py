"""What routes depend on, as FastAPI dependencies (``Depends(get_service)``, ...).

``AppState`` is everything one app owns. Threads, files and models are started in the
app's lifespan (``ServingService.start``), never when a module is imported.

The getters are ``async def`` though they never wait: FastAPI runs a plain ``def``
dependency in its thread pool, a hand-off to another thread and back on every request.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fastapi import Request

from dgserve.api.auth import ApiKeys
from dgserve.api.drain import DrainState
from dgserve.inspection import InspectionStore
from dgserve.inspection.readers import ReaderPool
from dgserve.metrics import Metrics
from dgserve.api.siblings import Siblings
from dgserve.serving.served_models import ServedModels
from dgserve.serving.service import ServingService
from dgserve.settings import Settings

__all__ = [
    "AppState", "get_inspections", "get_models", "get_readers", "get_service", "get_settings", "get_state",
]  # fmt: skip


@dataclass(eq=False)
class AppState:
    settings: Settings
    metrics: Metrics
    service: ServingService
    grpc_port: int | None = None  # the OIP gRPC service's bound port, once started
    api_keys: ApiKeys = field(default_factory=ApiKeys)  # empty: keys are off
    drain: DrainState = field(default_factory=DrainState)  # set on SIGTERM (api/drain.py)
    readers: ReaderPool | None = None  # heavy reads' processes (DGSERVE_READ_WORKERS); None: in threads
    siblings: Siblings | None = None  # the other server processes on this port (api/processes.py); None: alone


def _state(request: Request) -> AppState:
    state: AppState = request.app.state.dgserve
    return state


async def get_state(request: Request) -> AppState:
    return _state(request)


async def get_settings(request: Request) -> Settings:
    return _state(request).settings


async def get_service(request: Request) -> ServingService:
    return _state(request).service


async def get_models(request: Request) -> ServedModels:
    return _state(request).service.models


async def get_inspections(request: Request) -> InspectionStore:
    """The open inspection store (503 ``not_ready`` before it opens)."""
    return _state(request).service.inspections


async def get_readers(request: Request) -> ReaderPool | None:
    """The heavy reads' process pool; ``None`` runs them in the server's threads."""
    return _state(request).readers
