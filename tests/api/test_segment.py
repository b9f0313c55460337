"""POST /v1/models/{name}/segment end to end: label maps at the upload's size, both formats, paths."""

from __future__ import annotations

import base64
import io
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import httpx
import numpy as np
import pytest
import pytest_asyncio
from PIL import Image

from dgserve.tasks.segmentation import decode_label_map

from .conftest import running

Encode = Callable[..., bytes]
LABELS = ["background", "disc", "bar"]

pytestmark = [pytest.mark.asyncio(loop_scope="session"), pytest.mark.timeout(600)]


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def client(make_settings: Callable[..., object]) -> AsyncIterator[httpx.AsyncClient]:
    async with running(make_settings(models=["seg"])) as (_, c):  # type: ignore[arg-type]
        yield c


async def segment(client: httpx.AsyncClient, data: bytes, query: str = "") -> httpx.Response:
    return await client.post(f"/v1/models/seg/segment{query}", content=data, headers={"content-type": "image/jpeg"})


async def test_the_label_map_is_a_palette_png_at_the_uploads_resolution(client: httpx.AsyncClient, image: Encode) -> None:
    response = await segment(client, image("JPEG", size=(150, 61)))
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["model"], body["task"]) == ("seg", "segmentation")
    [result] = body["results"]
    prediction = result["predictions"]
    assert (prediction["width"], prediction["height"], prediction["format"]) == (150, 61, "png")
    with Image.open(io.BytesIO(base64.b64decode(prediction["label_map"]))) as png:
        assert png.format == "PNG" and png.mode == "P" and png.size == (150, 61)
        assert png.getpalette() is not None
    label_map = decode_label_map(prediction)
    assert label_map.shape == (61, 150) and int(label_map.max()) < len(LABELS)
    counts = np.bincount(label_map.ravel(), minlength=len(LABELS))
    shares = {c["label"]: c["pixel_fraction"] for c in prediction["classes"]}
    assert shares == {LABELS[k]: pytest.approx(counts[k] / label_map.size) for k in np.flatnonzero(counts)}
    assert [c["pixel_fraction"] for c in prediction["classes"]] == sorted(shares.values(), reverse=True)
    assert all("mask" not in c for c in prediction["classes"])  # masks only with ?format=rle


async def test_rle_masks_decode_to_the_same_label_map(client: httpx.AsyncClient, image: Encode) -> None:
    data = image("JPEG", size=(90, 70), seed=3)
    png = (await segment(client, data)).json()["results"][0]["predictions"]
    rle = (await segment(client, data, "?format=rle")).json()["results"][0]["predictions"]
    assert rle["format"] == "rle" and rle["label_map"] is None
    for share in rle["classes"]:
        assert share["mask"]["size"] == [70, 90] and isinstance(share["mask"]["counts"], str)
    np.testing.assert_array_equal(decode_label_map(rle), decode_label_map(png))


async def test_several_images_of_several_sizes_in_order_with_their_paths_recorded(
    client: httpx.AsyncClient, image: Encode
) -> None:
    files = [("images", (f"{i}.jpg", image("JPEG", size=size, seed=i), "image/jpeg"))
             for i, size in enumerate([(40, 40), (128, 32), (33, 77)])]  # fmt: skip
    response = await client.post("/v1/models/seg/segment", files=files)
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert [(r["predictions"]["width"], r["predictions"]["height"]) for r in results] == [(40, 40), (128, 32), (33, 77)]
    assert [r["image"]["part"] for r in results] == ["0.jpg", "1.jpg", "2.jpg"]
    for result in results:
        [unit] = result["connectivity"]["glore_units"]
        assert unit["projection"] and unit["projection_summary"]["nodes_used"] >= 1
        record = (await client.get(f"/v1/inspections/{result['id']}")).json()
        assert record["task"] == "segmentation"
        assert record["prediction"]["predictions"] == result["predictions"]
        assert record["connectivity"] == result["connectivity"]


async def test_bad_options_and_the_wrong_task_are_clear_422s(client: httpx.AsyncClient, image: Encode) -> None:
    response = await segment(client, image(), "?format=jpeg")
    assert response.status_code == 422
    response = await client.post("/v1/models/seg/classify", content=image(), headers={"content-type": "image/jpeg"})
    assert response.status_code == 422 and "segmentation" in response.json()["error"]["message"]


async def test_openapi_documents_one_prediction_object_per_image(client: httpx.AsyncClient) -> None:
    spec = json.loads((await client.get("/openapi.json")).text)
    operation = spec["paths"]["/v1/models/{name}/segment"]["post"]
    assert {p["name"] for p in operation["parameters"]} >= {"format", "version", "connectivity", "timeout_ms"}
    schemas = spec["components"]["schemas"]
    predictions = schemas["SegmentResult"]["properties"]["predictions"]
    assert predictions["$ref"].endswith("/SegmentationPrediction")
    assert set(schemas["SegmentationPrediction"]["properties"]) >= {"width", "height", "format", "label_map", "classes"}


async def test_the_session_store_has_the_segmenter(store_root: Path) -> None:
    manifest = json.loads((store_root / "seg" / "1" / "manifest.json").read_text())
    assert manifest["task"] == "segmentation" and manifest["labels"] == LABELS
