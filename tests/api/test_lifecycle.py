"""Readiness, broken store entries, overload, deadlines and clients that go away."""

from __future__ import annotations

import asyncio
import json
import struct
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
import pytest_asyncio
from fastapi import FastAPI
from tritonclient.grpc import service_pb2, service_pb2_grpc

from dgserve.model_store import ModelStore

pytestmark = [pytest.mark.asyncio(loop_scope="session"), pytest.mark.timeout(300)]

Encode = Callable[..., bytes]
WAIT_S = 30.0


async def eventually(cond: Callable[[], bool], timeout: float = WAIT_S) -> None:
    async def poll() -> None:
        while not cond():
            await asyncio.sleep(0.005)

    await asyncio.wait_for(poll(), timeout)


def jpeg_post(client: httpx.AsyncClient, data: bytes, query: str = "") -> Any:
    return client.post(f"/v1/models/clf/classify{query}", content=data, headers={"content-type": "image/jpeg"})


async def test_healthz_at_once_readyz_after_load(
    run_app: Any, make_settings: Callable[..., Any], image: Encode, monkeypatch: pytest.MonkeyPatch
) -> None:
    release = threading.Event()
    load = ModelStore.load

    def gated_load(self: ModelStore, *args: Any, **kwargs: Any) -> Any:
        release.wait(WAIT_S)
        return load(self, *args, **kwargs)

    monkeypatch.setattr(ModelStore, "load", gated_load)
    try:
        async with run_app(make_settings(), wait_ready=False) as (_, client):
            assert (await client.get("/healthz")).json() == {"status": "ok"}
            ready = await client.get("/readyz")
            assert ready.status_code == 503 and ready.headers["retry-after"] == "5"
            assert ready.json()["error"]["code"] == "not_ready" and "clf v1:" in ready.json()["error"]["message"]
            response = await jpeg_post(client, image())
            assert response.status_code == 503 and "retry-after" in response.headers
            assert response.json()["error"]["code"] == "not_ready"
            [version] = (await client.get("/v1/models/clf")).json()["versions"]
            assert version["state"] in ("pending", "loading") and (version["ready"], version["graph"]) == (False, None)
            release.set()
            for _ in range(600):
                if (ready := await client.get("/readyz")).status_code == 200:
                    break
                await asyncio.sleep(0.05)
            assert ready.json() == {"status": "ready", "models": ["clf:1"]}
            assert (await jpeg_post(client, image())).status_code == 200
            metrics = (await client.get("/metrics")).text
            assert 'dgserve_model_ready{model="clf",version="1"} 1.0' in metrics
            assert 'dgserve_model_load_seconds{model="clf",version="1"}' in metrics
            # The refused inference counts as a rejection; the /readyz probes do not.
            assert 'dgserve_rejections_total{model="clf",reason="not_ready",version="1"} 1.0' in metrics
            assert 'model="",reason="not_ready"' not in metrics
    finally:
        release.set()


async def test_broken_store_entries_do_not_crash_the_server(
    run_app: Any, make_settings: Callable[..., Any], broken_store: Path, image: Encode
) -> None:
    settings = make_settings(model_store=broken_store, models=["clf", "broken", "badweights", "ghost"])
    async with run_app(settings, wait_ready=False) as (app, client):
        assert (await client.get("/healthz")).status_code == 200
        await asyncio.wait_for(app.state.dgserve.service.loaded(), 120)
        models = {m["name"]: m for m in (await client.get("/v1/models")).json()["models"]}
        assert models["clf"]["ready"] is True
        broken = models["broken"]["versions"][0]
        assert (broken["state"], broken["error"]["code"]) == ("failed", "invalid_manifest")
        bad = models["badweights"]["versions"][0]
        assert (bad["state"], bad["error"]["code"]) == ("failed", "invalid_weights")
        assert "sha256" in bad["error"]["message"]
        assert models["ghost"]["error"] and models["ghost"]["versions"] == []
        ready = await client.get("/readyz")
        assert ready.status_code == 503
        message = ready.json()["error"]["message"]
        assert "broken v1: failed" in message and "badweights v1: failed" in message and "ghost" in message
        assert (await jpeg_post(client, image())).status_code == 200
        response = await client.post("/v1/models/broken/classify", content=image(), headers={"content-type": "image/jpeg"})
        assert response.status_code == 503 and "failed to load" in response.json()["error"]["message"]
        response = await client.post("/v1/models/ghost/classify", content=image(), headers={"content-type": "image/jpeg"})
        assert response.status_code == 404


@pytest_asyncio.fixture(loop_scope="session")
async def tiny_queue(
    run_app: Any, make_settings: Callable[..., Any], gate: Any
) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    """The classifier with batches of 1, a queue of 1, and its worker blocked by ``gate``."""
    settings = make_settings(warmup=False, batching={"clf": {"max_batch_size": 1, "max_queue_size": 1}})
    async with run_app(settings) as (app, client):
        gate.install(app.state.dgserve.service.models.lookup("clf"))
        yield app, client
        gate.open()


async def occupy_worker(client: httpx.AsyncClient, gate: Any, data: bytes) -> asyncio.Task[httpx.Response]:
    task = asyncio.ensure_future(jpeg_post(client, data))
    await eventually(lambda: len(gate.batches) == 1)
    return task


async def test_full_queue_is_503_with_retry_after(
    tiny_queue: tuple[FastAPI, httpx.AsyncClient], gate: Any, image: Encode
) -> None:
    app, client = tiny_queue
    batcher = app.state.dgserve.service.models.lookup("clf").batcher
    first = await occupy_worker(client, gate, image())
    second = asyncio.ensure_future(jpeg_post(client, image(seed=1)))
    await eventually(lambda: batcher.queue_depth == 1)
    batcher.estimate.avg_batch_s = 4.0  # as if batches took 4 s: Retry-After is the batcher's estimate
    response = await jpeg_post(client, image(seed=2))
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "overloaded" and response.headers["retry-after"] == "4"
    gate.open()
    assert [(await t).status_code for t in (first, second)] == [200, 200]
    metrics = (await client.get("/metrics")).text
    assert 'dgserve_rejections_total{model="clf",reason="queue_full",version="1"} 1.0' in metrics


async def test_deadline_is_504_and_never_computed(
    tiny_queue: tuple[FastAPI, httpx.AsyncClient], gate: Any, image: Encode
) -> None:
    app, client = tiny_queue
    first = await occupy_worker(client, gate, image())
    late = await jpeg_post(client, image(seed=1), "?timeout_ms=200")
    assert late.status_code == 504 and late.json()["error"]["code"] == "deadline_exceeded"
    instant = await jpeg_post(client, image(seed=2), "?timeout_ms=1")
    assert instant.status_code == 504
    gate.open()
    assert (await first).status_code == 200
    assert len(gate.batches) == 1  # the expired requests never reached the model


def oip_request(data: bytes) -> tuple[str, bytes, list[tuple[bytes, bytes]]]:
    """An OIP infer request of one image as binary tensor data, as tritonclient sends it."""
    blob = struct.pack("<I", len(data)) + data
    head = json.dumps({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                                   "parameters": {"binary_data_size": len(blob)}}]}).encode()  # fmt: skip
    headers = [(b"content-type", b"application/octet-stream"), (b"inference-header-content-length", b"%d" % len(head))]
    return "/v2/models/clf/infer", head + blob, headers


def upload(protocol: str, data: bytes) -> tuple[str, bytes, list[tuple[bytes, bytes]]]:
    """``(path, body, headers)`` of one image's inference request over ``protocol``."""
    if protocol == "oip":
        return oip_request(data)
    return "/v1/models/clf/classify", data, [(b"content-type", b"image/jpeg")]


def leaving_client(
    app: FastAPI, protocol: str, data: bytes, sent: int | None = None
) -> tuple[asyncio.Future[None], asyncio.Event, list[dict[str, Any]]]:
    """One request straight into the ASGI app, whose client sends ``sent`` bytes of its body
    (all of it by default), then disconnects once the returned event is set: the request's
    task, that event, and the messages the app sent."""
    path, body, headers = upload(protocol, data)
    sent = len(body) if sent is None else sent
    first, gone, messages = True, asyncio.Event(), []

    async def receive() -> dict[str, Any]:
        nonlocal first
        if first:
            first = False
            return {"type": "http.request", "body": body[:sent], "more_body": sent < len(body)}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        messages.append(message)

    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
        "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
        "headers": [*headers, (b"content-length", b"%d" % len(body)), (b"host", b"test")],
        "client": ("127.0.0.1", 1234), "server": ("test", 80),
    }  # fmt: skip
    return asyncio.ensure_future(app(scope, receive, send)), gone, messages


@pytest.mark.parametrize("protocol", ["v1", "oip"])
async def test_client_disconnect_drops_the_request_before_compute(
    tiny_queue: tuple[FastAPI, httpx.AsyncClient], gate: Any, image: Encode, protocol: str
) -> None:
    app, client = tiny_queue
    batcher = app.state.dgserve.service.models.lookup("clf").batcher
    before = (await client.get("/metrics")).text
    first = await occupy_worker(client, gate, image())
    request, gone, messages = leaving_client(app, protocol, image(seed=5))
    await eventually(lambda: batcher.queue_depth == 1)
    gone.set()
    await asyncio.wait_for(request, WAIT_S)
    assert batcher.queue_depth == 0 and messages[0]["status"] == 499
    gate.open()
    assert (await first).status_code == 200
    assert len(gate.batches) == 1  # the abandoned request was never computed
    cancelled = 'dgserve_rejections_total{model="clf",reason="cancelled",version="1"} 1.0'
    assert cancelled not in before and cancelled in (await client.get("/metrics")).text


async def test_a_cancelled_grpc_call_drops_the_request_before_compute(
    run_app: Any, make_settings: Callable[..., Any], gate: Any, image: Encode
) -> None:
    """OIP over gRPC: a client that cancels its call (or whose deadline passes) takes its
    image out of the queue before compute, as an HTTP client that disconnects does."""
    settings = make_settings(warmup=False, grpc_port=0, batching={"clf": {"max_batch_size": 1, "max_queue_size": 1}})
    async with run_app(settings) as (app, client):
        gate.install(app.state.dgserve.service.models.lookup("clf"))
        batcher = app.state.dgserve.service.models.lookup("clf").batcher
        first = await occupy_worker(client, gate, image())
        data = image(seed=5)
        request = service_pb2.ModelInferRequest(model_name="clf", raw_input_contents=[struct.pack("<I", len(data)) + data])
        request.inputs.add(name="image", datatype="BYTES", shape=[1])
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.state.dgserve.grpc_port}") as channel:
            infer = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer
            cancelled = infer(request)
            await eventually(lambda: batcher.queue_depth == 1)
            cancelled.cancel()
            await eventually(lambda: batcher.queue_depth == 0)
            with pytest.raises(grpc.aio.AioRpcError) as expired:  # a deadline ends the call the same way
                await infer(request, timeout=0.5)
            assert expired.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            await eventually(lambda: batcher.queue_depth == 0)
            gate.open()
            assert (await first).status_code == 200
            assert len(gate.batches) == 1  # neither image was ever computed
            # ...and the server still answers over gRPC.
            assert len((await infer(request)).raw_output_contents) > 0
        metrics = (await client.get("/metrics")).text
        assert 'dgserve_rejections_total{model="clf",reason="cancelled",version="1"} 2.0' in metrics


@pytest.mark.parametrize("protocol", ["v1", "oip"])
async def test_a_client_gone_mid_body_is_499_and_gives_back_its_queue_place(
    tiny_queue: tuple[FastAPI, httpx.AsyncClient], image: Encode, protocol: str
) -> None:
    app, client = tiny_queue
    batcher = app.state.dgserve.service.models.lookup("clf").batcher
    data = image(seed=6)
    request, gone, messages = leaving_client(app, protocol, data, sent=len(data) // 2)
    await eventually(lambda: batcher.full)  # admitted: the queue's one place is held while the body comes
    gone.set()
    await asyncio.wait_for(request, WAIT_S)
    assert messages[0]["status"] == 499 and not batcher.full and batcher.queue_depth == 0
