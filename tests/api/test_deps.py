"""Routes take what they need as FastAPI dependencies, so a test (or an embedder) can swap one."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pytest

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
