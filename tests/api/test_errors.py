"""Every error the API gives, each in the one body format: 404, 405, 413, 415, 422, 500."""

from __future__ import annotations

import io
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from PIL import Image

pytestmark = [pytest.mark.asyncio(loop_scope="session"), pytest.mark.timeout(600)]

Encode = Callable[..., bytes]
MAX_BODY = 300_000


def error_of(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error: dict[str, Any] = response.json()["error"]
    assert error["code"] == code
    assert error["request_id"] == response.headers["x-request-id"]
    assert error["message"]
    return error


async def test_unknown_model_version_and_inspection(main_client: httpx.AsyncClient, image: Encode) -> None:
    jpeg = {"content": image(), "headers": {"content-type": "image/jpeg"}}
    error_of(await main_client.post("/v1/models/nope/classify", **jpeg), 404, "model_not_found")
    error = error_of(await main_client.post("/v1/models/clf/classify?version=7", **jpeg), 404, "version_not_found")
    assert "available: 1" in error["message"]
    error_of(await main_client.get("/v1/models/nope"), 404, "model_not_found")
    error_of(await main_client.get("/v1/inspections/01NOSUCHRECORD0000000000000"), 404, "inspection_not_found")


async def test_framework_errors_use_the_same_body(main_client: httpx.AsyncClient) -> None:
    error_of(await main_client.get("/no/such/route"), 404, "not_found")
    response = await main_client.get("/v1/models/clf/classify")
    error_of(response, 405, "method_not_allowed")
    assert "POST" in response.headers["allow"]
    error = error_of(await main_client.post("/v1/models/clf/classify?top_k=0"), 422, "invalid_request")
    assert "top_k" in error["message"]
    error_of(await main_client.get("/v1/inspections?limit=nan"), 422, "invalid_request")


async def test_unsupported_media_type(main_client: httpx.AsyncClient, image: Encode) -> None:
    error = error_of(
        await main_client.post("/v1/models/clf/classify", content=b"hello", headers={"content-type": "text/plain"}),
        415, "unsupported_media_type",
    )
    assert "text/plain" in error["message"]
    error_of(await main_client.post("/v1/models/clf/classify", content=image()), 415, "unsupported_media_type")
    files = [("images", ("a.txt", b"hello", "text/plain"))]
    error = error_of(await main_client.post("/v1/models/clf/classify", files=files), 415, "unsupported_media_type")
    assert "a.txt" in error["message"]


async def test_body_over_the_limit(main_client: httpx.AsyncClient) -> None:
    big = b"\0" * (MAX_BODY + 1)
    error_of(
        await main_client.post("/v1/models/clf/classify", content=big, headers={"content-type": "image/png"}),
        413, "payload_too_large",
    )

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: counted while streaming
        for _ in range(MAX_BODY // 10_000 + 2):
            yield b"\0" * 10_000

    error_of(
        await main_client.post("/v1/models/clf/classify", content=chunks(), headers={"content-type": "image/png"}),
        413, "payload_too_large",
    )
    files = [("images", ("a.png", big, "image/png"))]
    error_of(await main_client.post("/v1/models/clf/classify", files=files), 413, "payload_too_large")
    assert (await main_client.get("/healthz")).status_code == 200


async def test_a_broken_multipart_body_is_a_400(main_app: tuple[FastAPI, httpx.AsyncClient], image: Encode) -> None:
    app, main_client = main_app
    no_boundary = {"content-type": "multipart/form-data"}
    error = error_of(await main_client.post("/v1/models/clf/classify", content=b"x", headers=no_boundary),
                     400, "bad_request")  # fmt: skip
    assert "boundary" in error["message"]
    garbage = {"content-type": "multipart/form-data; boundary=b0"}
    error_of(await main_client.post("/v1/models/clf/classify", content=b"not multipart", headers=garbage),
             400, "bad_request")  # fmt: skip
    jpeg = image(size=(8, 8))
    most = app.state.dgserve.settings.max_images_per_request
    files = [("images", (f"{n}.jpg", jpeg, "image/jpeg")) for n in range(most + 1)]
    error = error_of(await main_client.post("/v1/models/clf/classify", files=files), 400, "bad_request")
    assert "too many files" in error["message"]
    assert (await classify_ok(main_client, image())).status_code == 200


async def classify_ok(client: httpx.AsyncClient, jpeg: bytes) -> httpx.Response:
    return await client.post("/v1/models/clf/classify", files=[("images", ("ok.jpg", jpeg, "image/jpeg"))])


async def test_undecodable_and_oversized_images(main_client: httpx.AsyncClient, image: Encode) -> None:
    headers = {"content-type": "image/png"}
    error_of(await main_client.post("/v1/models/clf/classify", content=b"not a png", headers=headers), 422, "invalid_image")
    truncated = image("PNG", size=(60, 60))[:200]
    error_of(await main_client.post("/v1/models/clf/classify", content=truncated, headers=headers), 422, "invalid_image")
    buf = io.BytesIO()
    Image.new("RGB", (400, 400)).save(buf, "PNG")  # 160,000 pixels > the 100,000 configured
    bomb = buf.getvalue()
    assert len(bomb) < MAX_BODY
    error = error_of(await main_client.post("/v1/models/clf/classify", content=bomb, headers=headers), 422, "image_too_large")
    assert "160000" in error["message"]
    assert (await main_client.post("/v1/models/clf/classify", content=image(), headers={"content-type": "image/jpeg"})).status_code == 200


async def test_unexpected_error_is_a_plain_500_and_fails_only_its_batch(
    run_app: Any, make_settings: Callable[..., Any], image: Encode, caplog: pytest.LogCaptureFixture
) -> None:
    async with run_app(make_settings(warmup=False)) as (app, client):
        worker = app.state.dgserve.service.models.lookup("clf").workers[0]
        original = worker.infer_batch

        def boom(items: object) -> list[Any]:
            raise RuntimeError("boom")

        worker.infer_batch = boom
        response = await client.post(
            "/v1/models/clf/classify", content=image(), headers={"content-type": "image/jpeg", "x-request-id": "req-500"}
        )
        assert response.status_code == 500
        assert response.json() == {"error": {"code": "internal_error", "message": "internal server error", "request_id": "req-500"}}
        assert any("req-500" in r.getMessage() for r in caplog.records)
        worker.infer_batch = original
        ok = await client.post("/v1/models/clf/classify", content=image(), headers={"content-type": "image/jpeg"})
        assert ok.status_code == 200
