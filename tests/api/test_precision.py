"""DGSERVE_PRECISION through the app: GET /v1/models shows it, bf16 answers like fp32,
and fp16 on a CPU fails that model's load with a clear error instead of serving; and
DGSERVE_TORCH_COMPILE, shown the same way, compiled at load, answering like the eager forward."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from dgserve.settings import Settings

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "serving"))
from answers import assert_close  # noqa: E402

pytestmark = [pytest.mark.asyncio(loop_scope="session"), pytest.mark.timeout(600)]

Encode = Callable[..., bytes]
Running = Callable[..., Any]


async def _classify(client: httpx.AsyncClient, body: bytes) -> dict[str, Any]:
    response = await client.post("/v1/models/clf/classify?top_k=3", content=body,
                                 headers={"content-type": "image/jpeg"})  # fmt: skip
    assert response.status_code == 200, response.text
    return response.json()["results"][0]


async def test_precision_is_shown_and_bf16_answers_like_fp32(
    run_app: Running, make_settings: Callable[..., Settings], image: Encode
) -> None:
    body = image("JPEG", (64, 64), seed=3)
    async with run_app(make_settings(devices="cpu")) as (_, client):
        [version] = (await client.get("/v1/models/clf")).json()["versions"]
        assert version["precision"] == "fp32"
        full = await _classify(client, body)
    async with run_app(make_settings(devices="cpu", precision="bf16")) as (_, client):
        [version] = (await client.get("/v1/models/clf")).json()["versions"]
        assert version["precision"] == "bf16"
        half = await _classify(client, body)
    assert half["predictions"][0]["index"] == full["predictions"][0]["index"]
    scores = {p["index"]: p["score"] for p in half["predictions"]}
    for p in full["predictions"]:
        assert p["score"] == pytest.approx(scores[p["index"]], abs=0.05)
    assert [s["stage"] for s in half["connectivity"]["stages"]] == [s["stage"] for s in full["connectivity"]["stages"]]


async def test_fp16_on_the_cpu_fails_the_load_and_says_why(
    run_app: Running, make_settings: Callable[..., Settings]
) -> None:
    async with run_app(make_settings(devices="cpu", precision="fp16"), wait_ready=False) as (app, client):
        await asyncio.wait_for(app.state.dgserve.service.loaded(), 120)
        [version] = (await client.get("/v1/models/clf")).json()["versions"]
        assert version["state"] == "failed"
        assert version["error"]["code"] == "unsupported_precision"
        assert "fp16 needs a CUDA device" in version["error"]["message"]
        assert (await client.get("/readyz")).status_code == 503


async def test_torch_compile_is_shown_compiles_at_load_even_without_warm_up_and_answers_as_eager(
    run_app: Running, make_settings: Callable[..., Settings], image: Encode
) -> None:
    body = image("JPEG", (64, 64), seed=3)
    async with run_app(make_settings(devices="cpu")) as (_, client):
        [version] = (await client.get("/v1/models/clf")).json()["versions"]
        assert version["torch_compile"] is False
        eager = await _classify(client, body)
    # DGSERVE_WARMUP=false: a compiled model warms up all the same, or its first requests would compile.
    async with run_app(make_settings(devices="cpu", torch_compile=True, warmup=False, max_batch_size=1)) as (_, client):
        [version] = (await client.get("/v1/models/clf")).json()["versions"]
        assert version["torch_compile"] is True
        with torch.compiler.set_stance("fail_on_recompile"):
            compiled = await _classify(client, body)
    assert_close(compiled["predictions"], eager["predictions"])
    assert_close(compiled["connectivity"], eager["connectivity"])
