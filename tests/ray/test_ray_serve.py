"""dgserve.ray_serve without a Ray cluster: the config, the settings of a replica, and the app's
lifespan as Ray Serve itself runs it (its ``ASGIAppReplicaWrapper``, which drives uvicorn's
``LifespanOn``), on the bundled model store.

Skipped without Ray (``pip install 'dgserve[ray]'``, which ``make ray-test`` does). The cluster
test is ``test_ray_e2e.py``.
"""

from __future__ import annotations

import asyncio
import io
import shutil
import sqlite3
import threading
import warnings
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

# Ray's own modules use APIs that pydantic deprecates; warnings are errors here.
with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    pytest.importorskip("ray.serve", reason="Ray Serve is an extra: pip install 'dgserve[ray]'")
    from ray.serve._private.http_util import ASGIAppReplicaWrapper  # what a replica runs
    from ray.serve.schema import ServeDeploySchema

    from dgserve import ray_serve

from pydantic import ValidationError  # noqa: E402
from dgserve.data.scenes import render_classification  # noqa: E402
from dgserve.model_store import ModelStore  # noqa: E402
from dgserve.serving import service as service_module  # noqa: E402
from dgserve.settings import Settings, default_model_store  # noqa: E402

WAIT_S = 120.0


def png(index: int = 0) -> bytes:
    buf = io.BytesIO()
    render_classification(7, index, 64)[0].save(buf, "PNG")
    return buf.getvalue()


def example_config() -> dict[str, Any]:
    config: dict[str, Any] = yaml.safe_load(ray_serve.DEFAULT_CONFIG.read_text())
    return config


# --- the config --------------------------------------------------------------------------


def test_example_config_is_a_serve_config_that_builds() -> None:
    config = example_config()
    ServeDeploySchema.model_validate(config)
    [app] = config["applications"]
    assert app["import_path"] == "dgserve.ray_serve:build_app"
    module, _, name = app["import_path"].partition(":")
    assert module == ray_serve.__name__ and getattr(ray_serve, name) is ray_serve.build_app
    [deployment] = app["deployments"]
    assert deployment["name"] == ray_serve.DEPLOYMENT_NAME
    assert set(deployment["autoscaling_config"]) >= {"min_replicas", "max_replicas", "target_ongoing_requests"}
    assert set(deployment["ray_actor_options"]) == {"num_cpus", "num_gpus"}
    built = ray_serve.build_app(app["args"])
    assert type(built).__name__ == "Application"


def test_deployment_defaults() -> None:
    deployment = ray_serve.dgserve_deployment()
    assert deployment.name == "dgserve"
    assert deployment.max_ongoing_requests == 64
    assert deployment.ray_actor_options == {"num_cpus": 1, "num_gpus": 0}


def test_build_app_checks_its_arguments() -> None:
    with pytest.raises(ValidationError, match="not dgserve settings: no_such"):
        ray_serve.build_app({"settings": {"no_such": 1}})
    with pytest.raises(ValidationError, match="Extra inputs"):
        ray_serve.build_app({"typo": True})
    with pytest.raises(ValidationError, match="devices"):
        ray_serve.build_app({"settings": {"devices": "tpu:0"}})


def test_render_config_fixed_replicas_env_and_resources() -> None:
    config = ray_serve.render_config(
        example_config(),
        env={"DGSERVE_INSPECTION_URL": "postgresql://u@db/x", "DGSERVE_TORCH_THREADS": "1"},
        settings={"models": ["shapes-dgnet"]},
        num_replicas=3, num_cpus=0.5, num_gpus=1, http_host="127.0.0.1", http_port=8123,
    )  # fmt: skip
    [app] = config["applications"]
    assert app["runtime_env"]["env_vars"]["DGSERVE_INSPECTION_URL"] == "postgresql://u@db/x"
    assert app["runtime_env"]["env_vars"]["DGSERVE_VERSIONS"] == "latest"  # the file's, kept
    assert app["args"] == {"settings": {"models": ["shapes-dgnet"]}}
    [deployment] = app["deployments"]
    assert deployment["num_replicas"] == 3 and "autoscaling_config" not in deployment
    assert deployment["ray_actor_options"] == {"num_cpus": 0.5, "num_gpus": 1}
    assert config["http_options"]["port"] == 8123 and config["http_options"]["host"] == "127.0.0.1"


def test_render_config_autoscaling() -> None:
    config = ray_serve.render_config(example_config(), min_replicas=2, max_replicas=8, target_ongoing_requests=4)
    [deployment] = config["applications"][0]["deployments"]
    autoscaling = deployment["autoscaling_config"]
    assert [autoscaling[k] for k in ("min_replicas", "max_replicas", "target_ongoing_requests")] == [2, 8, 4]
    assert autoscaling["downscale_delay_s"] == 600  # the file's, kept
    fixed = ray_serve.render_config(example_config(), num_replicas=2)
    again = ray_serve.render_config(fixed, max_replicas=5)
    assert "num_replicas" not in again["applications"][0]["deployments"][0]


def test_render_config_refuses_what_ray_would() -> None:
    with pytest.raises(ValueError, match="not both"):
        ray_serve.render_config(example_config(), num_replicas=2, max_replicas=4)
    with pytest.raises(ValueError, match="no application named 'other'"):
        ray_serve.render_config(example_config(), app_name="other")
    with pytest.raises(ValidationError):
        ray_serve.render_config(example_config(), min_replicas=5, max_replicas=2)


def test_cli_prints_the_rendered_config(capsys: pytest.CaptureFixture[str]) -> None:
    code = ray_serve.main(["config", "--num-replicas", "2", "--num-gpus", "0.5", "--set", "models=shapes-dgnet",
                           "--env", "DGSERVE_INSPECTION_URL=postgresql://u@db/x"])  # fmt: skip
    assert code == 0
    config = yaml.safe_load(capsys.readouterr().out)
    ServeDeploySchema.model_validate(config)
    [app] = config["applications"]
    assert app["runtime_env"]["env_vars"]["DGSERVE_INSPECTION_URL"] == "postgresql://u@db/x"
    assert app["args"]["settings"] == {"models": "shapes-dgnet"}
    assert app["deployments"][0]["num_replicas"] == 2
    assert app["deployments"][0]["ray_actor_options"]["num_gpus"] == 0.5


# --- the settings of a replica -------------------------------------------------------------


def test_replica_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DGSERVE_GRPC_PORT", "9001")
    monkeypatch.setenv("DGSERVE_MODELS", "a,b")
    monkeypatch.setenv("DGSERVE_INSPECTION_URL", "postgresql://u@db/x")
    monkeypatch.delenv("DGSERVE_REPLICA", raising=False)
    monkeypatch.delenv("DGSERVE_TORCH_THREADS", raising=False)
    settings = ray_serve.replica_settings({"models": ["c"]}, replica_tag="k3x9", cpus=2.0)
    assert settings.grpc_port is None  # always off on Ray
    assert settings.models == ["c"]  # the config's settings beat the environment
    assert settings.inspection_url == "postgresql://u@db/x"
    assert settings.replica == f"{Settings().replica}/k3x9"  # the host name, then Ray's replica id
    assert settings.torch_threads == 2  # the replica's CPUs, not the host's cores

    monkeypatch.setenv("DGSERVE_REPLICA", "node-a")
    monkeypatch.setenv("DGSERVE_TORCH_THREADS", "1")
    settings = ray_serve.replica_settings({}, replica_tag="k3x9", cpus=4.0)
    assert (settings.replica, settings.torch_threads) == ("node-a/k3x9", 1)
    assert ray_serve.replica_settings({}).replica == "node-a"  # outside Ray: no id to add


# --- the app's lifespan, as a Ray replica runs it -------------------------------------------


def bundled_settings(tmp_path: Path, **overrides: Any) -> dict[str, Any]:
    values: dict[str, Any] = {
        "model_store": str(default_model_store()), "models": ["shapes-dgnet"], "data_dir": str(tmp_path),
        "torch_threads": 1, "decode_threads": 1,
    }  # fmt: skip
    return {**values, **overrides}


@pytest.fixture
def slow_flush(monkeypatch: pytest.MonkeyPatch) -> None:
    """Records stay in the write-behind queue until a flush or the store's close: so that a
    record found in storage shows who wrote it."""
    real = service_module.open_inspection_store

    def open_store(location: Any, **options: Any) -> Any:
        return real(location, **options, flush_interval_s=3600.0)

    monkeypatch.setattr(service_module, "open_inspection_store", open_store)


def stored_ids(data_dir: Path) -> set[str]:
    path = data_dir / "inspections.sqlite3"
    if not path.exists():
        return set()
    with sqlite3.connect(path) as conn:
        try:
            return {row[0] for row in conn.execute("SELECT id FROM inspections")}
        except sqlite3.OperationalError:  # no table yet
            return set()


class Replica(ASGIAppReplicaWrapper):
    """Ray's wrapper of an ingress app. A replica awaits its async ``__del__`` on a graceful
    stop (``stop`` here); the garbage collector's call, which would leave that coroutine
    unawaited, does nothing."""

    async def stop(self) -> None:
        await asyncio.wait_for(ASGIAppReplicaWrapper.__del__(self), WAIT_S)

    def __del__(self) -> None:  # type: ignore[override]
        pass


@asynccontextmanager
async def replica(options: dict[str, Any]) -> AsyncIterator[tuple[Replica, httpx.AsyncClient]]:
    """What a Ray replica does with the ingress: build the app (the builder function), run the
    lifespan's startup, serve, and on a graceful stop run ``__del__`` (the lifespan's shutdown)."""
    wrapper = Replica(lambda: ray_serve.create_replica_app(options))
    await asyncio.wait_for(wrapper._run_asgi_lifespan_startup(), WAIT_S)
    try:
        transport = httpx.ASGITransport(app=wrapper.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://replica", timeout=60) as client:
            yield wrapper, client
    finally:
        await wrapper.stop()


async def classify(client: httpx.AsyncClient, index: int) -> httpx.Response:
    return await client.post("/v1/models/shapes-dgnet/classify", content=png(index),
                             headers={"content-type": "image/png"})  # fmt: skip


def loads_once_set(load: Callable[..., Any], release: threading.Event) -> Callable[..., Any]:
    """``ModelStore.load`` held until ``release`` is set: a replica still loading its models."""

    def held(*args: Any, **kwargs: Any) -> Any:
        release.wait(WAIT_S)
        return load(*args, **kwargs)

    return held


@pytest.mark.asyncio
@pytest.mark.timeout(300)
async def test_startup_waits_for_the_models_and_shutdown_writes_the_records(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, slow_flush: None
) -> None:
    release = threading.Event()
    monkeypatch.setattr(ModelStore, "load", loads_once_set(ModelStore.load, release))
    # Write-behind (opted out of the commit wait), so the records stay queued until the stop.
    settings = bundled_settings(tmp_path, inspection_commit_timeout_s=0)
    wrapper = Replica(lambda: ray_serve.create_replica_app({"settings": settings}))
    assert wrapper.app.state.dgserve.settings.grpc_port is None
    startup = asyncio.create_task(wrapper._run_asgi_lifespan_startup())
    await asyncio.sleep(1.0)
    assert not startup.done()  # Ray routes nothing to a replica whose startup has not returned
    release.set()
    await asyncio.wait_for(startup, WAIT_S)
    try:
        transport = httpx.ASGITransport(app=wrapper.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://replica", timeout=60) as client:
            ready = await client.get("/readyz")
            assert ready.status_code == 200 and ready.json()["models"] == ["shapes-dgnet:1"]
            ids = [(await classify(client, i)).json()["results"][0]["id"] for i in range(3)]
            assert all(ids)
            assert stored_ids(tmp_path) == set()  # still queued (flush interval of an hour)
            record = (await client.get(f"/v1/inspections/{ids[0]}")).json()
            assert record["prediction"]["replica"] == Settings().replica  # outside Ray: no replica id
    finally:
        await wrapper.stop()  # Ray's graceful stop
    assert stored_ids(tmp_path) >= set(ids)


@pytest.mark.asyncio
@pytest.mark.timeout(300)
async def test_a_model_that_fails_to_load_fails_the_replica_start(tmp_path: Path) -> None:
    store = tmp_path / "store"
    shutil.copytree(default_model_store() / "shapes-dgnet", store / "shapes-dgnet")
    (store / "shapes-dgnet" / "1" / "model.safetensors").write_bytes(b"not weights")
    options = {"settings": bundled_settings(tmp_path, model_store=str(store))}
    wrapper = Replica(lambda: ray_serve.create_replica_app(options))
    with pytest.raises(RuntimeError, match="ASGI lifespan startup failed"):
        await asyncio.wait_for(wrapper._run_asgi_lifespan_startup(), WAIT_S)
    # The app's own shutdown ran: the service is closed (nothing left open to leak).
    assert wrapper.app.state.dgserve.service.not_ready()


@pytest.mark.asyncio
@pytest.mark.timeout(300)
async def test_a_replica_answers_once_its_records_are_committed(tmp_path: Path, slow_flush: None) -> None:
    """The app's own durability (``inspection_commit_timeout_s``, on by default) holds in a replica."""
    async with replica({"settings": bundled_settings(tmp_path)}) as (_, client):
        response = await classify(client, 0)
        assert response.status_code == 200 and response.headers["x-inspection-committed"] == "true"
        # Committed before the answer, although the queue would have waited an hour.
        assert response.json()["results"][0]["id"] in stored_ids(tmp_path)


@pytest.mark.asyncio
@pytest.mark.timeout(300)
async def test_api_keys_in_the_ray_environment_guard_a_replica(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``DGSERVE_API_KEYS`` in the nodes' environment or the config's ``runtime_env`` reaches each
    replica like any setting (the example config's proxy listens on every interface: README)."""
    infer, read = "i" * 24, "r" * 24
    monkeypatch.setenv("DGSERVE_API_KEYS", f"{infer}:infer,{read}:read")
    async with replica({"settings": bundled_settings(tmp_path)}) as (_, client):
        anonymous = await classify(client, 0)
        assert anonymous.status_code == 401 and anonymous.headers["www-authenticate"].startswith("Bearer")
        wrong_scope = await client.post("/v1/models/shapes-dgnet/classify", content=png(0),
                                        headers={"content-type": "image/png", "x-api-key": read})  # fmt: skip
        assert wrong_scope.status_code == 403
        bearer = {"content-type": "image/png", "authorization": f"Bearer {infer}"}
        allowed = await client.post("/v1/models/shapes-dgnet/classify", content=png(0), headers=bearer)
        assert allowed.status_code == 200
        assert (await client.get("/readyz")).status_code == 200  # probes stay open
