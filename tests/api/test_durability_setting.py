"""``DGSERVE_INSPECTION_DURABILITY``: ``sync`` (the default) answers once the records are
committed; ``async`` answers at once and says so (``X-Inspection-Committed: false``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from dgserve.settings import Settings

pytestmark = [pytest.mark.asyncio(loop_scope="session"), pytest.mark.timeout(600)]


@pytest.mark.parametrize(("durability", "committed"), [("sync", "true"), ("async", "false")])
async def test_answers_say_whether_their_records_are_committed(
    run_app: Any, make_settings: Callable[..., Settings], image: Callable[..., bytes], durability: str, committed: str
) -> None:
    settings = make_settings(inspection_durability=durability)
    assert Settings().inspection_durability == "sync"
    async with run_app(settings) as (_, client):
        response = await client.post("/v1/models/clf/classify", content=image(), headers={"content-type": "image/jpeg"})
        assert response.status_code == 200
        assert response.headers["x-inspection-committed"] == committed
        record_id = response.json()["results"][0]["id"]
        # Either way the id reads back at once (queued records are readable).
        assert (await client.get(f"/v1/inspections/{record_id}")).status_code == 200
