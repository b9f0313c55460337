"""POST /v1/models/{name}/classify-video against the bundled shapes-video, over the real app.

A generated motion clip, encoded as the MP4 a client would send, must come back with
its motion; bad files must get a clear 4xx and leave the server serving. The Open
Inference Protocol front-end takes the same files as BYTES, and clips as tensors.
"""

from __future__ import annotations

import json
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import pytest_asyncio
from fastapi import FastAPI

from dgserve.data.clips import MOTIONS, render_clip
from dgserve.oip.tensors import bytes_to_raw
from dgserve.settings import Settings

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from video_files import encode_audio, encode_video, noise  # noqa: E402

STORE = Path(__file__).resolve().parents[2] / "model_store"
MODEL = "shapes-video"
HELD_OUT_SEED = 20251  # no training run drew it
URL = f"/v1/models/{MODEL}/classify-video"
MP4 = {"content-type": "video/mp4"}


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def video_app(tmp_path_factory: pytest.TempPathFactory, run_app: Any) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    settings = Settings(
        model_store=STORE, data_dir=tmp_path_factory.mktemp("data"), models=[MODEL], grpc_port=None,
        decode_threads=2, torch_threads=1, max_body_bytes=2_000_000,
    )  # fmt: skip
    async with run_app(settings) as pair:
        yield pair


@pytest.fixture
def client(video_app: tuple[FastAPI, httpx.AsyncClient]) -> httpx.AsyncClient:
    return video_app[1]


def clip_mp4(index: int) -> tuple[bytes, str]:
    frames, label = render_clip(HELD_OUT_SEED, index, 32, 24)
    return encode_video(frames, crf="12"), MOTIONS[label]


@pytest.mark.asyncio(loop_scope="module")
async def test_a_generated_mp4_gets_its_motion_and_per_frame_connectivity(client: httpx.AsyncClient) -> None:
    data, motion = clip_mp4(5)  # a rotation: no single frame shows it
    response = await client.post(f"{URL}?top_k=3", content=data, headers=MP4)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["task"] == "video_classification"
    [result] = body["results"]
    assert result["predictions"][0]["label"] == motion == "rotate"
    assert len(result["predictions"]) == 3
    assert result["image"] == {"part": None, "width": 32, "height": 32, "frames": 24, "seconds": pytest.approx(0.96)}
    units = result["connectivity"]["glore_units"]
    assert [u["unit"] for u in units] == ["layer2.units.0", "layer3.units.0"]
    # 8 frames of 32 px, after the stem (space / 4): layer2 sees 4 frames of 4x4, layer3 2 frames of 2x2.
    for unit, (frames, side) in zip(units, [(4, 4), (2, 2)], strict=True):
        assert unit["frames"] == frames and len(unit["projection"]) == frames * side
        assert len(unit["projection"][0]) == side and unit["projection_summary"]["height"] == side
    record = (await client.get(f"/v1/inspections/{result['id']}")).json()
    assert record["connectivity"] == result["connectivity"] and record["prediction"]["image"]["frames"] == 24


@pytest.mark.asyncio(loop_scope="module")
async def test_several_videos_in_one_multipart_request_each_get_their_label(client: httpx.AsyncClient) -> None:
    clips = [clip_mp4(i) for i in range(7)]  # one of each motion
    files = [("videos", (f"{i}.mp4", data, "video/mp4")) for i, (data, _) in enumerate(clips)]
    response = await client.post(URL, files=files)
    assert response.status_code == 200, response.text
    got = [r["predictions"][0]["label"] for r in response.json()["results"]]
    assert sum(g == m for g, (_, m) in zip(got, clips, strict=True)) >= 6, got


def _truncated() -> bytes:
    return encode_video(noise(24))[:3000]


@pytest.mark.parametrize(
    ("make", "content_type", "status", "code"),
    [
        (_truncated, "video/mp4", 422, "invalid_video"),
        (lambda: encode_audio(container="mp4"), "video/mp4", 422, "invalid_video"),
        (lambda: encode_audio(container="matroska"), "video/x-matroska", 422, "invalid_video"),
        (lambda: encode_video(np.zeros((10_000, 16, 16, 3), np.uint8), fps=250), "video/mp4", 413, "video_too_long"),
        (lambda: encode_video(noise(4), "avi", "mpeg4"), "video/x-msvideo", 415, "unsupported_media_type"),
        (lambda: encode_video(noise(4), "avi", "mpeg4"), "video/mp4", 422, "invalid_video"),
        (lambda: b"\x89PNG\r\n\x1a\n" + bytes(32), "image/png", 415, "unsupported_media_type"),
    ],
    ids=["truncated-mp4", "audio-only-mp4", "no-video-stream-mkv", "10000-frames", "avi", "avi-as-mp4", "png"],
)
@pytest.mark.asyncio(loop_scope="module")
async def test_bad_files_get_a_clear_4xx_and_the_server_keeps_serving(
    client: httpx.AsyncClient, make: Any, content_type: str, status: int, code: str
) -> None:
    response = await client.post(URL, content=make(), headers={"content-type": content_type})
    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == code
    assert (await client.get("/readyz")).status_code == 200
    data, motion = clip_mp4(1)
    after = await client.post(URL, content=data, headers=MP4)
    assert after.status_code == 200 and after.json()["results"][0]["predictions"][0]["label"] == motion


@pytest.mark.asyncio(loop_scope="module")
async def test_open_inference_protocol_takes_video_files_and_clip_tensors(client: httpx.AsyncClient) -> None:
    meta = (await client.get(f"/v2/models/{MODEL}")).json()
    assert {i["name"]: i["shape"] for i in meta["inputs"]} == {"image": [-1], "input": [-1, 3, 8, 32, 32]}
    data, motion = clip_mp4(3)
    raw = bytes_to_raw([data])
    head = json.dumps({
        "inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": len(raw)}}],
        "outputs": [{"name": "labels"}],
    }).encode()  # fmt: skip
    response = await client.post(
        f"/v2/models/{MODEL}/infer", content=head + raw,
        headers={"Inference-Header-Content-Length": str(len(head)), "content-type": "application/octet-stream"},
    )  # fmt: skip
    assert response.status_code == 200, response.text
    assert response.json()["outputs"][0]["data"][0] == motion
    # A preprocessed clip per video; an image-shaped tensor is refused with the shape wanted.
    clip = {"name": "input", "datatype": "FP32", "shape": [1, 3, 8, 32, 32], "data": [0.0] * (3 * 8 * 32 * 32)}
    ok = await client.post(f"/v2/models/{MODEL}/infer", json={"inputs": [clip]})
    assert ok.status_code == 200, ok.text
    image = {"name": "input", "datatype": "FP32", "shape": [1, 3, 32, 32], "data": [0.0] * (3 * 32 * 32)}
    refused = await client.post(f"/v2/models/{MODEL}/infer", json={"inputs": [image]})
    assert refused.status_code == 400 and "[N, 3, 8, 32, 32]" in refused.text
