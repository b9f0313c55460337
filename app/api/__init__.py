"""The HTTP API: ``create_app(settings)`` builds it, ``server.run(settings)`` serves it.

``AppState`` is everything one app owns; routes reach it through ``get_state``. The
parts that start threads or touch disk (decode pool, inspection store, model loading)
are created in the app's lifespan, never when a module is imported.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fastapi import Request

from dgserve.errors import NotReadyError

if TYPE_CHECKING:
    import asyncio

    from dgserve.metrics import Metrics
    from dgserve.serving.registry import ModelRegistry
    from dgserve.settings import Settings

__all__ = ["AppState", "get_state"]


@dataclass(eq=False)
class AppState:
    settings: Settings
    metrics: Metrics
    registry: ModelRegistry
    inspections: Any = None  # the InspectionStore, opened in the lifespan
    decode_pool: ThreadPoolExecutor | None = None
    load_task: asyncio.Task[None] | None = None

    def require_decode_pool(self) -> ThreadPoolExecutor:
        if self.decode_pool is None:
            raise NotReadyError("the server is starting")
        return self.decode_pool

    def require_inspections(self) -> Any:
        if self.inspections is None:
            raise NotReadyError("the inspection store is not open")
        return self.inspections


def get_state(request: Request) -> AppState:
    state: AppState = request.app.state.dgserve
    return state
