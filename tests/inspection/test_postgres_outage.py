"""A PostgreSQL inspection store that goes away: at start-up, and while serving.

Each test runs its own real PostgreSQL (``postgres_server``, conftest) and stops and
starts it with ``pg_ctl``, under the real app (httpx over ASGI, the lifespan driven as
``tests/api`` does) serving the bundled ``shapes-dgnet``:

* down at start-up: the app comes up not ready, ``/readyz`` names the store and the
  error, inference and the inspection routes answer 503, and once the database is back
  the store opens in the background and the server becomes ready;
* down while serving: predictions still answer 200, their records wait in the
  write-behind queue (readable there) and are written when the database returns;
* with a tiny queue, records past it are dropped: counted, logged with the first id.
"""

from __future__ import annotations

import asyncio
import io
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from postgres_server import PostgresServer

from dgserve.api.app import create_app
from dgserve.data.scenes import render_classification
from dgserve.errors import NotReadyError
from dgserve.inspection import PostgreSQLBackend
from dgserve.inspection.backend import StoredRecord
from dgserve.metrics import INSPECTION_DROPPED_RECORDS, INSPECTION_WRITE_ERRORS
from dgserve.serving import service as service_module
from dgserve.serving.service import ServingService
from dgserve.settings import Settings

pytestmark = pytest.mark.timeout(180)

# Long enough for the pool to find a database that came back (it backs off 1, 2, 4... s).
BACK_S = 60.0


def png(index: int) -> bytes:
    image, _ = render_classification(7, index, 64)
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


async def classify(client: httpx.AsyncClient, index: int = 0) -> httpx.Response:
    files = {"image": (f"{index}.png", png(index), "image/png")}
    return await client.post("/v1/models/shapes-dgnet/classify", files=files)


async def until(check: Callable[[], Awaitable[bool]], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not await check():
        assert time.monotonic() < deadline, f"{what} did not happen within {timeout_s}s"
        await asyncio.sleep(0.1)


def stored_ids(url: str) -> set[str]:
    with psycopg.connect(url) as conn:
        return {i for (i,) in conn.execute("SELECT id FROM inspections")}


@asynccontextmanager
async def serving(
    server: PostgresServer, data_dir: Path, **settings: Any
) -> AsyncIterator[tuple[ServingService, httpx.AsyncClient]]:
    """The app, serving shapes-dgnet with its records in ``server``; models loaded."""
    config = Settings(
        models=["shapes-dgnet"], data_dir=data_dir, inspection_url=server.url, torch_threads=1, decode_threads=1,
        grpc_port=None, **settings,
    )
    app = create_app(config)
    async with app.router.lifespan_context(app):
        service: ServingService = app.state.dgserve.service
        await asyncio.wait_for(service.loaded(), 120)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as client:
            yield service, client


def sample(service: ServingService, name: str, **labels: str) -> float:
    return service.metrics.registry.get_sample_value(name, labels) or 0.0


@pytest.mark.asyncio
async def test_a_database_down_at_start_up_leaves_the_server_alive_and_not_ready_until_it_returns(
    postgres_server: PostgresServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(service_module, "_STORE_RETRY_MAX_S", 0.5)  # so the test need not wait out the back-off
    postgres_server.stop()
    async with serving(postgres_server, tmp_path) as (service, client):
        assert (await client.get("/healthz")).status_code == 200
        ready = await client.get("/readyz")
        assert ready.status_code == 503 and ready.headers["retry-after"]
        message = ready.json()["error"]["message"]
        where = f"inspection store postgresql://postgres@127.0.0.1:{postgres_server.port}/postgres: "
        assert where in message and "connection refused" in message.lower(), message
        assert service.models.not_ready() == []  # the model is fine: only the store is missing

        answer = await classify(client)
        assert answer.status_code == 503 and answer.json()["error"]["code"] == "not_ready"
        assert where in answer.json()["error"]["message"]
        for path in ("/v1/inspections/01ARZ3NDEKTSV4RRFFQ69G5FAV", "/v1/inspections"):
            refused = await client.get(path)
            assert refused.status_code == 503 and where in refused.json()["error"]["message"], path

        postgres_server.start()

        async def is_ready() -> bool:
            return (await client.get("/readyz")).status_code == 200

        await until(is_ready, BACK_S, "readiness after the database came back")
        answer = await classify(client)
        assert answer.status_code == 200
        record_id = answer.json()["results"][0]["id"]
        assert (await client.get(f"/v1/inspections/{record_id}")).status_code == 200
        await service.inspections.flush()
        assert record_id in stored_ids(postgres_server.url)


@pytest.mark.asyncio
async def test_a_database_down_while_serving_keeps_answering_and_writes_the_records_when_it_returns(
    postgres_server: PostgresServer, tmp_path: Path
) -> None:
    async with serving(postgres_server, tmp_path) as (service, client):
        assert (await client.get("/readyz")).status_code == 200
        before = (await classify(client)).json()["results"][0]["id"]
        await service.inspections.flush()

        postgres_server.stop()
        answers = [await classify(client, i) for i in range(1, 4)]
        assert [a.status_code for a in answers] == [200, 200, 200]
        # Answered, but told that the records are not durable yet (they wait in the queue).
        assert [a.headers["x-inspection-committed"] for a in answers] == ["false"] * 3
        ids = [a.json()["results"][0]["id"] for a in answers]
        assert (await client.get("/readyz")).status_code == 200  # predictions answer: still ready
        for record_id in ids:  # queued, and readable there
            assert (await client.get(f"/v1/inspections/{record_id}")).json()["id"] == record_id

        async def write_failed() -> bool:
            return sample(service, INSPECTION_WRITE_ERRORS) > 0

        await until(write_failed, 30, "a failed write")
        assert service.inspections.pending == 3
        metrics = (await client.get("/metrics")).text
        assert "dgserve_inspection_pending_records 3.0" in metrics

        postgres_server.start()
        await asyncio.wait_for(service.inspections.flush(), BACK_S)
        assert service.inspections.pending == 0
        assert {before, *ids} <= stored_ids(postgres_server.url)
        assert sample(service, INSPECTION_DROPPED_RECORDS, reason="queue_full") == 0


@pytest.mark.asyncio
async def test_a_full_queue_drops_new_records_counts_them_and_logs_the_first_id(
    postgres_server: PostgresServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="dgserve.inspection")
    async with serving(postgres_server, tmp_path, inspection_max_pending=2) as (service, client):
        postgres_server.stop()
        answers = [await classify(client, i) for i in range(5)]
        assert [a.status_code for a in answers] == [200] * 5  # no answer waits for the database
        ids = [a.json()["results"][0]["id"] for a in answers]
        assert service.inspections.pending == 2
        assert sample(service, INSPECTION_DROPPED_RECORDS, reason="queue_full") == 3
        # A dropped record's id is never handed out: every id a client holds is durable.
        assert all(isinstance(i, str) for i in ids[:2]) and ids[2:] == [None, None, None]
        assert "dropping new records until it has room, starting with" in caplog.text
        assert (await client.get(f"/v1/inspections/{ids[1]}")).status_code == 200  # queued

        postgres_server.start()
        await asyncio.wait_for(service.inspections.flush(), BACK_S)
        after = (await classify(client, 5)).json()["results"][0]["id"]
        assert "3 records were dropped while it was full, the first" in caplog.text
        await service.inspections.flush()
        assert stored_ids(postgres_server.url) == {ids[0], ids[1], after}


def test_reads_fail_as_not_ready_while_the_database_is_down_and_work_once_it_is_back(
    postgres_server: PostgresServer,
) -> None:
    backend = PostgreSQLBackend(postgres_server.url)
    backend.open()
    try:
        backend.write_batch([StoredRecord("r1", "m", 1, "t", 1, "{}", "{}")], {})
        postgres_server.stop()
        with pytest.raises(NotReadyError, match=f"inspection store {backend.location} is unavailable"):
            backend.get("r1")
        postgres_server.start()
        deadline = time.monotonic() + BACK_S
        while True:  # the pool replaces the connections the restart broke
            try:
                assert backend.get("r1") is not None
                break
            except NotReadyError:
                assert time.monotonic() < deadline
    finally:
        backend.close()
