"""Routes take what they need as FastAPI dependencies, so a test (or an embedder) can swap one."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from fastapi.routing import APIRoute

from dgserve.api.app import create_app
from dgserve.api.deps import get_inspections
from dgserve.inspection import InspectionRecord

pytestmark = pytest.mark.asyncio(loop_scope="session")


class OneRecord:
    """Stands in for the inspection store: knows a single record."""

    record = InspectionRecord(id="R1", model="m", version=1, task="classification",
                              created_at=datetime(2026, 1, 1, tzinfo=UTC), prediction={}, connectivity={})  # fmt: skip

    async def get(self, inspection_id: str) -> InspectionRecord:
        return self.record


async def test_the_inspection_store_can_be_overridden(run_app: Any, make_settings: Callable[..., Any]) -> None:
    async with run_app(make_settings(), wait_ready=False) as (app, client):
        app.dependency_overrides[get_inspections] = OneRecord
        response = await client.get("/v1/inspections/anything")
        assert response.status_code == 200 and response.json()["id"] == "R1"
        app.dependency_overrides.clear()
        assert (await client.get("/v1/inspections/anything")).status_code == 404


def _api_routes(routes: Any) -> Iterator[APIRoute]:
    for route in routes:
        if isinstance(route, APIRoute):
            yield route
        # FastAPI 0.16x keeps an included router's routes behind a wrapper of its own.
        yield from _api_routes(getattr(getattr(route, "original_router", None), "routes", []))


def _calls(dependant: Any) -> list[Any]:
    calls = [dependant.call] if dependant.call is not None else []
    for sub in dependant.dependencies:
        calls += _calls(sub)
    return calls


async def test_no_route_hands_its_request_to_the_thread_pool(make_settings: Callable[..., Any]) -> None:
    """FastAPI runs a plain ``def`` endpoint or dependency, a class among them, in its thread
    pool: a hop to another thread and back, and a GIL hand-off, on every request that uses it."""
    routes = list(_api_routes(create_app(make_settings()).routes))
    assert {"/v1/models/{name}/classify", "/v1/inspections", "/readyz"} <= {route.path for route in routes}
    sync = sorted({f"{route.path}: {getattr(call, '__qualname__', call)}" for route in routes
                   for call in _calls(route.dependant)
                   if not (inspect.iscoroutinefunction(call) or inspect.isasyncgenfunction(call))})  # fmt: skip
    assert sync == []
