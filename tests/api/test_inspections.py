"""GET /v1/inspections/{id} and the listing, as JSON and as NDJSON."""

from __future__ import annotations

import json
import socket
from collections.abc import Callable
from typing import Any

import httpx
import pytest

pytestmark = [pytest.mark.asyncio(loop_scope="session"), pytest.mark.timeout(600)]

Encode = Callable[..., bytes]


async def post_two(client: httpx.AsyncClient, image: Encode) -> list[dict[str, Any]]:
    files = [("images", (f"{i}.jpg", image(seed=10 + i), "image/jpeg")) for i in range(2)]
    response = await client.post("/v1/models/clf/classify", files=files)
    assert response.status_code == 200
    results: list[dict[str, Any]] = response.json()["results"]
    return results


async def test_ndjson_listing(main_client: httpx.AsyncClient, image: Encode) -> None:
    ids = {r["id"] for r in await post_two(main_client, image)}
    for kwargs in ({"params": {"model": "clf", "format": "ndjson", "limit": 1000}},
                   {"params": {"model": "clf", "limit": 1000}, "headers": {"accept": "application/x-ndjson"}}):
        response = await main_client.get("/v1/inspections", **kwargs)
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("application/x-ndjson")
        records = [json.loads(line) for line in response.text.splitlines()]
        assert ids <= {r["id"] for r in records}
        assert all(r["model"] == "clf" and r["connectivity"]["stages"] for r in records)
        created = [(r["created_at"], r["id"]) for r in records]
        assert created == sorted(created)


async def test_json_listing_filters(main_client: httpx.AsyncClient, image: Encode) -> None:
    results = await post_two(main_client, image)
    await main_client.post("/v1/models/glore/classify?connectivity=false", content=image(), headers={"content-type": "image/jpeg"})
    body = (await main_client.get("/v1/inspections", params={"model": "clf", "limit": 1000, "connectivity": "false"})).json()
    assert body["count"] == len(body["records"]) > 0
    assert all(r["model"] == "clf" and r["connectivity"] == {} for r in body["records"])
    newest = (await main_client.get(f"/v1/inspections/{results[1]['id']}")).json()
    since = (await main_client.get("/v1/inspections", params={"since": newest["created_at"], "limit": 1000})).json()
    assert newest["id"] in {r["id"] for r in since["records"]}
    assert all(r["created_at"] >= newest["created_at"] for r in since["records"])
    one = (await main_client.get("/v1/inspections", params={"limit": 1})).json()
    assert one["count"] == 1
    too_many = await main_client.get("/v1/inspections", params={"limit": 10**9})
    assert too_many.status_code == 422 and too_many.json()["error"]["code"] == "invalid_request"


async def test_record_holds_everything(main_client: httpx.AsyncClient, image: Encode) -> None:
    [result, _] = await post_two(main_client, image)
    record = (await main_client.get(f"/v1/inspections/{result['id']}")).json()
    assert set(record) == {"id", "model", "version", "task", "created_at", "tags", "prediction", "connectivity"}
    assert record["prediction"] == {"image": result["image"], "predictions": result["predictions"],
                                    "replica": socket.gethostname()}  # fmt: skip
    assert record["connectivity"] == result["connectivity"]
