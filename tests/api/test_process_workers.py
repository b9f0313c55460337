"""DGSERVE_MODEL_WORKERS=process through the whole app: the same answer as a thread
worker for the same image, the model's metadata, and no child left after shutdown."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from dgserve.serving.process_worker import ProcessModelWorker

from .conftest import Running, served

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from processes import pid_running  # noqa: E402

pytestmark = pytest.mark.timeout(300)


@pytest.mark.asyncio
async def test_process_workers_answer_as_thread_workers_and_leave_nothing_behind(
    run_app: Running, make_settings: Any, image: Any
) -> None:
    body, headers = image(), {"content-type": "image/jpeg"}
    answers: dict[str, httpx.Response] = {}
    pids: list[int] = []
    graphs: dict[str, Any] = {}
    for mode in ("thread", "process"):
        async with run_app(make_settings(model_workers=mode, instances_per_device=2)) as (app, client):
            answers[mode] = await client.post("/v1/models/clf/classify", content=body, headers=headers)
            model = served(app)
            assert len(model.workers) == 2
            if mode == "process":
                assert all(isinstance(w, ProcessModelWorker) for w in model.workers)
                pids = [w.pid for w in model.workers if isinstance(w, ProcessModelWorker) and w.pid]
                assert len(set(pids)) == 2 and all(pid_running(p) for p in pids)
            [version] = (await client.get("/v1/models/clf")).json()["versions"]
            graphs[mode] = version["graph"]  # from the child's replica in process mode
            assert version["state"] == "ready" and version["devices"] == ["cpu", "cpu"]
    for mode, answer in answers.items():
        assert answer.status_code == 200, (mode, answer.text)
    thread, process = (answers[m].json()["results"][0] for m in ("thread", "process"))
    assert [p["index"] for p in thread["predictions"]] == [p["index"] for p in process["predictions"]]
    for a, b in zip(thread["predictions"], process["predictions"], strict=True):
        assert a["score"] == pytest.approx(b["score"], abs=1e-4)
    assert thread["connectivity"].keys() == process["connectivity"].keys()
    assert graphs["thread"] == graphs["process"] and graphs["thread"]["stages"]
    for pid in pids:
        for _ in range(200):
            if not pid_running(pid):
                break
            time.sleep(0.05)
        assert not pid_running(pid), f"model worker process {pid} outlived the app"

