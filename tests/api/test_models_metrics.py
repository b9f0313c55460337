"""GET /v1/models, /healthz, /readyz, /metrics, and the settings that shape them."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from dgserve.model_store import ModelStore
from dgserve.models.connectivity import describe_graph
from dgserve.models.registry import create_model

pytestmark = [pytest.mark.asyncio(loop_scope="session"), pytest.mark.timeout(600)]

Encode = Callable[..., bytes]


async def test_models_listing_describes_graphs(main_client: httpx.AsyncClient) -> None:
    models = {m["name"]: m for m in (await main_client.get("/v1/models")).json()["models"]}
    assert set(models) == {"clf", "glore", "det"}
    assert all(m["ready"] and m["default_version"] == 1 for m in models.values())
    [clf] = models["clf"]["versions"]
    assert (clf["task"], clf["architecture"], clf["family"], clf["labels"]) == (
        "classification", "dgnet_resnet18", "dgnet", ["cat", "dog", "bird"])
    assert clf["batching"] == {"max_batch_size": 4, "max_delay_ms": 20.0, "max_queue_size": 256}
    assert clf["devices"] == ["cpu"] and clf["load_seconds"] > 0
    stages = clf["graph"]["stages"]
    assert [s["name"] for s in stages] == ["layer1", "layer2", "layer3", "layer4"]
    assert stages[0] == {"name": "layer1", "nodes": ["input", "0", "1", "output"], "possible_edges": 3,
                         "routing": "dynamic", "wiring": "complete", "edges": [[1, 2], [1, 3], [2, 3]]}
    units = models["glore"]["versions"][0]["graph"]["glore_units"]
    assert len(units) == 3 and units[0]["num_nodes"] == 256
    det = models["det"]["versions"][0]
    assert det["task"] == "detection" and det["graph"]["stages"][0]["name"].endswith("layer1")
    one = (await main_client.get("/v1/models/clf")).json()
    assert one == models["clf"]


async def test_health_and_ready(main_client: httpx.AsyncClient) -> None:
    assert (await main_client.get("/healthz")).json() == {"status": "ok"}
    ready = await main_client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json() == {"status": "ready", "models": ["clf:1", "det:1", "glore:1"]}


def sample(text: str, name: str, **labels: str) -> float:
    """The value of the one series of ``name`` whose labels include ``labels``."""
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', line.rsplit(" ", 1)[0]))
        if all(found.get(k) == v for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no {name} with {labels}")


async def test_metrics_after_traffic(main_client: httpx.AsyncClient, image: Encode) -> None:
    files = [("images", (f"{i}.jpg", image(seed=i), "image/jpeg")) for i in range(3)]
    assert (await main_client.post("/v1/models/clf/classify", files=files)).status_code == 200
    await main_client.post("/v1/models/clf/classify", content=b"x", headers={"content-type": "text/plain"})
    response = await main_client.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    text = response.text
    clf = {"model": "clf", "version": "1"}
    assert sample(text, "dgserve_requests_total", endpoint="/v1/models/{name}/classify", status="200", **clf) >= 1
    assert sample(text, "dgserve_requests_total", endpoint="/v1/models/{name}/classify", status="415", **clf) >= 1
    assert sample(text, "dgserve_request_duration_seconds_count", endpoint="/v1/models/{name}/classify", **clf) >= 2
    assert sample(text, "dgserve_batch_size_count", **clf) >= 1
    assert sample(text, "dgserve_batch_size_sum", **clf) >= 3
    assert sample(text, "dgserve_queue_wait_seconds_count", **clf) >= 3
    assert sample(text, "dgserve_compute_seconds_count", **clf) >= 1
    assert sample(text, "dgserve_active_edge_fraction_count", stage="layer1", **clf) >= 3
    assert sample(text, "dgserve_skipped_nodes_total", stage="layer4", **clf) >= 0
    assert sample(text, "dgserve_queue_depth", **clf) == 0
    assert sample(text, "dgserve_in_flight_requests", **clf) == 0
    assert sample(text, "dgserve_rejections_total", reason="unsupported_media_type", **clf) >= 1
    assert sample(text, "dgserve_model_load_seconds", **clf) > 0


async def test_batching_overrides_reach_the_batcher(run_app: Any, make_settings: Callable[..., Any]) -> None:
    settings = make_settings(warmup=False, max_queue_size=8, max_delay_ms=1,
                             batching={"clf": {"max_batch_size": 2}})
    async with run_app(settings) as (app, client):
        [version] = (await client.get("/v1/models/clf")).json()["versions"]
        assert version["batching"] == {"max_batch_size": 2, "max_delay_ms": 1.0, "max_queue_size": 8}
        batcher = app.state.dgserve.service.models.lookup("clf").batcher
        assert (batcher.max_batch_size, batcher.max_delay_s, batcher.max_queue_size) == (2, 0.001, 8)


async def test_graph_shows_a_random_wiring(
    run_app: Any, make_settings: Callable[..., Any], tmp_path: Path
) -> None:
    """A client tells a static, randomly wired DG-Net from the complete, routed one."""
    kwargs = {"num_classes": 3, "width": 8, "routing": "static", "wiring": "er", "wiring_seed": 4}
    model = create_model("dgnet_resnet18_slim", **kwargs)
    ModelStore(tmp_path).save(
        model, name="rw", architecture="dgnet_resnet18_slim", arch_kwargs=kwargs, labels=["a", "b", "c"],
        preprocessing={"input_size": [32, 32], "mean": [0.5] * 3, "std": [0.25] * 3},
    )
    async with run_app(make_settings(model_store=tmp_path, models=["rw"], warmup=False)) as (_, client):
        [version] = (await client.get("/v1/models/rw")).json()["versions"]
    stages = version["graph"]["stages"]
    assert stages == describe_graph(model)["stages"]
    assert {(s["routing"], s["wiring"]) for s in stages} == {("static", "er")}
    assert all(len(s["edges"]) == s["possible_edges"] for s in stages)
