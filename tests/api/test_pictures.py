"""Pictures of paths: one record's connectivity.png/.svg and a summary's, drawn by matplotlib."""

from __future__ import annotations

import io
import re
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from PIL import Image

from dgserve.analysis import pictures

from .conftest import running, settings_for, state_of

pytestmark = [pytest.mark.asyncio(loop_scope="session"), pytest.mark.timeout(600)]

Encode = Callable[..., bytes]


async def _classify(client: httpx.AsyncClient, model: str, data: bytes, tag: str) -> str:
    response = await client.post(f"/v1/models/{model}/classify?tag={tag}", content=data,
                                 headers={"content-type": "image/jpeg"})  # fmt: skip
    assert response.status_code == 200, response.text
    return str(response.json()["results"][0]["id"])


async def test_one_records_path_as_png_and_svg(main_client: httpx.AsyncClient, image: Encode) -> None:
    for model in ("clf", "glore"):
        record_id = await _classify(main_client, model, image(seed=5), "truth:pic")
        png = await main_client.get(f"/v1/inspections/{record_id}/connectivity.png")
        assert png.status_code == 200 and png.headers["content-type"] == "image/png"
        with Image.open(io.BytesIO(png.content)) as picture:
            assert picture.format == "PNG" and picture.width >= 400 and picture.height >= 200
        svg = await main_client.get(f"/v1/inspections/{record_id}/connectivity.svg")
        assert svg.status_code == 200 and svg.headers["content-type"].startswith("image/svg+xml")
        assert b"<svg" in svg.content[:2000]
        record = (await main_client.get(f"/v1/inspections/{record_id}")).json()
        for stage in record["connectivity"]["stages"]:  # every stage is drawn and named
            assert stage["stage"].encode() in svg.content
        for unit in record["connectivity"]["glore_units"]:
            assert unit["unit"].encode() in svg.content


async def test_a_summary_as_a_picture_with_one_panel_per_group(main_client: httpx.AsyncClient, image: Encode) -> None:
    for seed, tag in ((11, "truth:a"), (12, "truth:b"), (13, "truth:a")):
        await _classify(main_client, "clf", image(seed=seed), tag)
    svg = await main_client.get("/v1/models/clf/connectivity.svg?group_by=tag:truth&tag=truth:a")
    assert svg.status_code == 200, svg.text
    # matplotlib keeps each title as a comment beside its glyphs: one panel per stage for
    # the one group the filter leaves (at least the two truth:a images sent here).
    titles = re.findall(rb"<!-- (\S+) \xc2\xb7 (\S+) \((\d+)\) -->", svg.content)
    assert {group for _, group, _ in titles} == {b"a"} and all(int(count) >= 2 for _, _, count in titles)
    assert {stage for stage, _, _ in titles} == {b"layer1", b"layer2", b"layer3", b"layer4"}
    png = await main_client.get("/v1/models/clf/connectivity.png?group_by=label")
    assert png.status_code == 200 and png.content.startswith(b"\x89PNG")


async def test_bad_picture_requests_are_clear_4xx(main_client: httpx.AsyncClient) -> None:
    assert (await main_client.get("/v1/inspections/no-such-id/connectivity.png")).status_code == 404
    assert (await main_client.get("/v1/models/clf/connectivity.jpg")).status_code == 422
    assert (await main_client.get("/v1/models/nope/connectivity.png")).status_code == 404
    bad_group = await main_client.get("/v1/models/clf/connectivity.png?group_by=colour")
    assert bad_group.status_code == 422 and bad_group.json()["error"]["code"] == "invalid_analysis"


async def test_a_glore_summary_draws_each_units_node_shares(main_client: httpx.AsyncClient, image: Encode) -> None:
    await _classify(main_client, "glore", image(seed=21), "truth:g")
    svg = await main_client.get("/v1/models/glore/connectivity.svg?group_by=label")
    assert svg.status_code == 200, svg.text
    titles = re.findall(rb"<!-- (\S+) \xc2\xb7 (\S+) \((\d+)\) -->", svg.content)
    assert {unit for unit, _, _ in titles} == {b"layer3.units.0", b"layer3.units.2", b"layer3.units.4"}


async def test_thumbnails_are_kept_only_when_opted_in_and_projections_drawn_over_them(
    store_root: Path, tmp_path: Path, image: Encode
) -> None:
    data_dir = tmp_path / "data"
    on = settings_for(store_root, data_dir, models=["glore"], inspection_thumbnails=True, inspection_thumbnail_px=48)
    async with running(on) as (app, client):
        record_id = await _classify(client, "glore", image(seed=5, size=(96, 64)), "truth:t")
        stored = await state_of(app).service.inspections.get(record_id)
        assert stored.thumbnail is not None
        with Image.open(io.BytesIO(stored.thumbnail)) as thumb:
            assert thumb.format == "JPEG" and max(thumb.size) <= 48
        answer = await client.get(f"/v1/inspections/{record_id}")
        assert answer.status_code == 200 and "thumbnail" not in answer.json()
        png = await client.get(f"/v1/inspections/{record_id}/connectivity.png")
        assert png.status_code == 200
        # The route's picture is the one drawn over the thumbnail, not the map alone.
        record = stored.to_dict()
        assert png.content == pictures.record_picture({**record, "thumbnail": stored.thumbnail}, "png")
        assert png.content != pictures.record_picture(record, "png")
        svg = await client.get(f"/v1/inspections/{record_id}/connectivity.svg")
        assert b"projection over the input" in svg.content
    # The same store with the setting off: the stored thumbnail is not used, none is made.
    async with running(settings_for(store_root, data_dir, models=["glore"])) as (app, client):
        svg = await client.get(f"/v1/inspections/{record_id}/connectivity.svg")
        assert svg.status_code == 200 and b"projection over the input" not in svg.content
        assert b"projection" in svg.content
        later = await _classify(client, "glore", image(seed=6), "truth:t")
        assert (await state_of(app).service.inspections.get(later)).thumbnail is None
