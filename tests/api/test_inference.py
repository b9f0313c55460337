"""Classify and detect end to end: every image format, multipart, options, connectivity."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from fastapi import HTTPException

from dgserve.api.app import create_app
from dgserve.api.auth import authorize
from dgserve.settings import Settings


LABELS = ["cat", "dog", "bird"]
Encode = Callable[..., bytes]

pytestmark = [pytest.mark.asyncio(loop_scope="session"), pytest.mark.timeout(600)]

FORMATS = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp", "BMP": "image/bmp",
           "GIF": "image/gif", "TIFF": "image/tiff"}


async def classify(client: httpx.AsyncClient, data: bytes, query: str = "", ctype: str = "image/jpeg") -> httpx.Response:
    return await client.post(f"/v1/models/clf/classify{query}", content=data, headers={"content-type": ctype})


@pytest.mark.parametrize("fmt", list(FORMATS))
async def test_classify_every_format(main_client: httpx.AsyncClient, image: Encode, fmt: str) -> None:
    response = await classify(main_client, image(fmt, size=(50, 30)), ctype=FORMATS[fmt])
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["model"], body["version"], body["task"]) == ("clf", 1, "classification")
    [result] = body["results"]
    assert result["image"] == {"part": None, "width": 50, "height": 30}
    predictions = result["predictions"]
    assert len(predictions) == 3  # manifest top_k 5, clamped to the 3 labels
    assert {p["label"] for p in predictions} == set(LABELS)
    assert [p["score"] for p in predictions] == sorted((p["score"] for p in predictions), reverse=True)
    assert all(LABELS[p["index"]] == p["label"] for p in predictions)
    stages = result["connectivity"]["stages"]
    assert [s["stage"] for s in stages] == ["layer1", "layer2", "layer3", "layer4"]
    for stage in stages:
        n = len(stage["nodes"])
        assert len(stage["adjacency"]) == n and all(len(row) == n for row in stage["adjacency"])
        assert len(stage["executed"]) == len(stage["thresholds"]) == n
        assert 0.0 <= stage["active_edge_fraction"] <= 1.0


async def test_top_k_and_request_id(main_client: httpx.AsyncClient, image: Encode) -> None:
    response = await main_client.post(
        "/v1/models/clf/classify?top_k=1", content=image(), headers={"content-type": "image/jpeg", "x-request-id": "abc-123"}
    )
    assert response.status_code == 200
    assert response.headers["x-request-id"] == "abc-123"
    assert len(response.json()["results"][0]["predictions"]) == 1
    many = await classify(main_client, image(), "?top_k=50&version=1")
    assert len(many.json()["results"][0]["predictions"]) == 3


async def test_multipart_several_images_in_order(main_client: httpx.AsyncClient, image: Encode) -> None:
    files = [("images", (f"img{i}.png", image("PNG", size=(20 + i, 30), seed=i), "image/png")) for i in range(3)]
    files.append(("extra", ("untyped", image("JPEG", seed=9), "application/octet-stream")))
    response = await main_client.post("/v1/models/clf/classify", files=files, data={"note": "ignored"})
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert [r["image"]["part"] for r in results] == ["img0.png", "img1.png", "img2.png", "untyped"]
    assert [r["image"]["width"] for r in results] == [20, 21, 22, 48]
    assert len({r["id"] for r in results}) == 4
    single = await classify(main_client, files[1][1][1], ctype="image/png")
    # Batched with its siblings or alone, an image gets the same answer.
    assert single.json()["results"][0]["predictions"][0]["label"] == results[1]["predictions"][0]["label"]
    assert single.json()["results"][0]["predictions"][0]["score"] == pytest.approx(
        results[1]["predictions"][0]["score"], abs=1e-4
    )


async def test_multipart_bad_part_is_named_and_server_stays_healthy(main_client: httpx.AsyncClient, image: Encode) -> None:
    files = [("images", ("good.jpg", image(), "image/jpeg")), ("images", ("bad.png", b"\x89PNG not really", "image/png"))]
    response = await main_client.post("/v1/models/clf/classify", files=files)
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["code"] == "invalid_image" and "bad.png" in error["message"]
    assert (await main_client.get("/healthz")).status_code == 200
    assert (await classify(main_client, image())).status_code == 200


async def test_connectivity_false_omits_matrices_but_record_has_them(main_client: httpx.AsyncClient, image: Encode) -> None:
    response = await classify(main_client, image(seed=3), "?connectivity=false")
    assert response.status_code == 200
    [result] = response.json()["results"]
    for stage in result["connectivity"]["stages"]:
        assert "adjacency" not in stage and "executed" in stage and "open_edges" in stage
    record = (await main_client.get(f"/v1/inspections/{result['id']}")).json()
    assert all("adjacency" in stage for stage in record["connectivity"]["stages"])


async def test_response_connectivity_equals_inspection_record(main_client: httpx.AsyncClient, image: Encode) -> None:
    response = await classify(main_client, image(seed=4))
    [result] = response.json()["results"]
    record = (await main_client.get(f"/v1/inspections/{result['id']}")).json()
    assert record["connectivity"] == result["connectivity"]
    assert (record["model"], record["version"], record["task"]) == ("clf", 1, "classification")
    assert record["prediction"]["predictions"] == result["predictions"]
    assert record["prediction"]["image"] == result["image"]


async def test_glore_classifier_reports_units(main_client: httpx.AsyncClient, image: Encode) -> None:
    response = await main_client.post("/v1/models/glore/classify", content=image("PNG"), headers={"content-type": "image/png"})
    assert response.status_code == 200, response.text
    [result] = response.json()["results"]
    units = result["connectivity"]["glore_units"]
    assert [u["unit"] for u in units] == ["layer3.units.0", "layer3.units.2", "layer3.units.4"]
    for unit in units:
        n = unit["num_nodes"]
        assert len(unit["adjacency"]) == n and len(unit["adjacency"][0]) == n
        summary = unit["projection_summary"]
        assert (summary["height"], summary["width"]) == (len(unit["projection"]), len(unit["projection"][0]))
        assert 1 <= summary["nodes_used"] <= n
    record = (await main_client.get(f"/v1/inspections/{result['id']}")).json()
    assert record["connectivity"] == result["connectivity"]
    light = await main_client.post(
        "/v1/models/glore/classify?connectivity=false", content=image("PNG"), headers={"content-type": "image/png"}
    )
    unit = light.json()["results"][0]["connectivity"]["glore_units"][0]
    assert "adjacency" not in unit and "projection" not in unit and "projection_summary" in unit


async def test_detect_boxes_in_original_pixels(main_client: httpx.AsyncClient, image: Encode) -> None:
    # 400 px wide: larger than the detector's headroom, so it is downscaled and mapped back.
    response = await main_client.post(
        "/v1/models/det/detect?score_threshold=0", content=image("JPEG", size=(400, 120)),
        headers={"content-type": "image/jpeg"},
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["task"] == "detection"
    [result] = body["results"]
    detections = result["predictions"]
    assert 0 < len(detections) <= 10  # manifest max_detections
    for d in detections:
        x1, y1, x2, y2 = d["box"]
        assert 0 <= x1 <= x2 <= 400 and 0 <= y1 <= y2 <= 120
        assert d["label"] in ("ball", "box") and d["index"] in (1, 2)
    assert [s["stage"] for s in result["connectivity"]["stages"]][0].endswith("layer1")
    record = (await main_client.get(f"/v1/inspections/{result['id']}")).json()
    assert record["connectivity"] == result["connectivity"] and record["task"] == "detection"
    strict = await main_client.post(
        "/v1/models/det/detect?score_threshold=1", content=image(), headers={"content-type": "image/jpeg"}
    )
    assert strict.json()["results"][0]["predictions"] == []


async def test_wrong_task_is_a_clear_422(main_client: httpx.AsyncClient, image: Encode) -> None:
    response = await main_client.post("/v1/models/det/classify", content=image(), headers={"content-type": "image/jpeg"})
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["code"] == "invalid_request" and "detection" in error["message"]
    response = await main_client.post("/v1/models/clf/detect", content=image(), headers={"content-type": "image/jpeg"})
    assert response.status_code == 422 and "classification" in response.json()["error"]["message"]


async def test_openapi_documents_the_schemas(main_client: httpx.AsyncClient, image: Encode) -> None:
    spec = json.loads((await main_client.get("/openapi.json")).text)
    schemas = spec["components"]["schemas"]
    for name in ("ClassifyResponse", "DetectResponse", "InspectionRecordResponse", "ModelInfoResponse", "ErrorResponse"):
        assert name in schemas
    body = spec["paths"]["/v1/models/{name}/classify"]["post"]["requestBody"]["content"]
    assert "image/jpeg" in body and "multipart/form-data" in body


@pytest.mark.parametrize("path", ["/v1/models/clf/classify", "/v2/models/clf/infer", "/v2/models/clf/versions/1/infer"])
async def test_an_inference_route_runs_authorize_and_honours_overrides(store_root: Any, tmp_path: Any, path: str) -> None:
    # The inference routes are direct routes (dgserve.api.direct): they run authorize themselves.
    settings = Settings(model_store=store_root, data_dir=tmp_path, models=["clf"], grpc_port=None,
                        api_keys="k" * 32 + ":infer")  # fmt: skip
    app = create_app(settings)  # not started: every answer below comes before the service is needed
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        refused = await client.post(path, content=b"x", headers={"content-type": "image/jpeg"})
        assert refused.status_code == 401 and refused.headers["www-authenticate"].startswith("Bearer")
        error = refused.json()["error"]
        assert (error["code"] == "unauthorized") if path.startswith("/v1") else isinstance(error, str)

        async def deny() -> None:
            raise HTTPException(418, "overridden")

        app.dependency_overrides[authorize] = deny
        overridden = await client.post(path, content=b"x", headers={"content-type": "image/jpeg"})
        assert overridden.status_code == 418
