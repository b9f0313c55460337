"""The replica side: each replica's settings, its app, and a lifespan that waits until it serves.

* In each replica, Ray calls the ingress builder (``serve.ingress`` with a function, Ray >= 2.47)
  after the deployment's constructor: ``create_replica_app`` builds this replica's ``Settings``
  (``replica_settings``: the ``DGSERVE_*`` environment, which the config's ``runtime_env``
  sets, then ``args.settings``; the replica named after Ray's replica id; the OIP gRPC port off,
  as Ray's proxy is the ingress and replicas may share a host), then calls ``create_app``.
* Ray then runs the app's ASGI lifespan in the replica (uvicorn's ``LifespanOn``, as uvicorn
  itself does): the serving service starts, the inspection store opens, the models load.
  ``create_replica_app`` extends that lifespan so that startup returns only once every model is
  loaded and the store is open: Ray routes requests to a replica only after its startup, so a
  replica that is loading never answers 503 through the proxy, and a model that fails to load
  fails the replica's start (``serve status`` shows why; Ray retries it). On a graceful stop
  (scale-down, redeploy, ``serve shutdown``) Ray drains the replica's requests and runs the
  lifespan's shutdown: the models stop, and the inspection records still queued are written.
* Nothing here is about durability: the app itself answers only once a request's records are
  committed (``inspection_commit_timeout_s``), so a replica that is killed (SIGKILL, OOM, a lost
  node) loses no id it handed out, unless that setting is 0.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, field_validator
from ray import serve

from dgserve.settings import Settings

if TYPE_CHECKING:
    from fastapi import FastAPI

    from dgserve.serving.service import ServingService

# In a replica, dgserve's loggers (this one among them) write where Ray Serve writes the
# replica's lines: logs/serve/replica_<app>_<deployment>_<id>.log (``_route_dgserve_logs``).
# Not Ray's own "ray.serve" logger: Ray raises that one to WARNING while the lifespan runs.
log = logging.getLogger(__name__)


class ReplicaOptions(BaseModel):
    """The config's ``args``: what each replica is built from."""

    model_config = ConfigDict(extra="forbid")

    settings: dict[str, Any] = Field(
        default_factory=dict,
        description="dgserve settings by field name (model_store, models, inspection_commit_timeout_s...); "
        "they beat the DGSERVE_* environment. Keep passwords out: set DGSERVE_INSPECTION_URL in the environment.",
    )
    startup_timeout_s: PositiveFloat = Field(
        900.0, description="How long a replica's start may wait for its models and the inspection store."
    )

    @field_validator("settings")
    @classmethod
    def _known_settings(cls, value: dict[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(value) - set(Settings.model_fields))
        if unknown:
            raise ValueError(f"not dgserve settings: {', '.join(unknown)} (see dgserve.settings.Settings)")
        return value


def replica_settings(
    overrides: Mapping[str, Any], *, replica_tag: str | None = None, cpus: float | None = None
) -> Settings:
    """This replica's settings: the ``DGSERVE_*`` environment, then ``overrides``, then Ray's needs.

    * ``replica`` (named in every inspection record) is ``<prefix>/<replica_tag>``: the prefix is
      ``DGSERVE_REPLICA`` or ``settings.replica`` when given, else the host name. Ray puts several
      replicas on one host, so the host name alone cannot tell them apart; the tag is Ray's
      replica id, as ``serve status`` and the replica's log file name show it.
    * ``grpc_port`` is off: Ray's proxy is the ingress, and replicas on one host cannot all bind
      one port. The Open Inference Protocol's HTTP API (``/v2``) still answers through the proxy.
    * ``torch_threads``, unless set, is the replica's CPUs (``num_cpus``), not the host's cores.
    """
    base = Settings(**overrides)
    given = base.model_fields_set
    update: dict[str, Any] = {"grpc_port": None}
    if "grpc_port" in given and base.grpc_port is not None:
        log.warning("DGSERVE_GRPC_PORT=%s is ignored on Ray Serve: the OIP gRPC service is off", base.grpc_port)
    prefix = base.replica if "replica" in given else (socket.gethostname() or "dgserve")
    update["replica"] = f"{prefix}/{replica_tag}" if replica_tag else prefix
    if "torch_threads" not in given and cpus:
        update["torch_threads"] = max(1, int(cpus))
    return base.model_copy(update=update)


def _replica_identity() -> tuple[str | None, float | None]:
    """(Ray's replica id, the CPUs Ray gave this replica); (None, None) outside a replica."""
    try:
        tag: str | None = serve.get_replica_context().replica_tag
    except Exception:  # not in a replica: a test, or a plain process
        return None, None
    try:
        import ray

        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
    except Exception:
        cpus = None
    return tag, cpus


def _route_dgserve_logs() -> logging.Logger:
    """dgserve's own loggers write where Ray Serve writes this replica's lines."""
    dgserve_log = logging.getLogger("dgserve")
    serve_log = logging.getLogger("ray.serve")
    if not dgserve_log.handlers and serve_log.handlers:
        for handler in serve_log.handlers:
            dgserve_log.addHandler(handler)
        dgserve_log.propagate = False
    return dgserve_log


def create_replica_app(options: ReplicaOptions | Mapping[str, Any] | None = None) -> FastAPI:
    """The app of one replica: ``create_app`` with this replica's settings, whose lifespan's
    startup returns once the replica serves (see the module's docstring)."""
    from dgserve.api.app import create_app

    options = ReplicaOptions.model_validate(options or {})
    tag, cpus = _replica_identity()
    dgserve_log = _route_dgserve_logs() if tag is not None else None
    settings = replica_settings(options.settings, replica_tag=tag, cpus=cpus)
    if dgserve_log is not None:
        dgserve_log.setLevel(settings.log_level.upper())
    if settings.inspection_url is None:
        log.warning(
            "dgserve replica %s keeps its inspection records in its own SQLite file (%s): set "
            "DGSERVE_INSPECTION_URL=postgresql://... so that every replica shares them",
            settings.replica, settings.inspection_location,
        )
    if settings.inspection_commit_timeout_s == 0:
        # Said once per replica: the opt-out trades the ids of a killed replica's last
        # ~50 ms of answers for not waiting on the commit.
        log.info("dgserve replica %s answers before its inspection records are committed "
                 "(DGSERVE_INSPECTION_COMMIT_TIMEOUT_S=0)", settings.replica)  # fmt: skip
    app = create_app(settings)
    service: ServingService = app.state.dgserve.service
    _serve_once_ready(app, service, settings.replica, options.startup_timeout_s)
    return app


def _serve_once_ready(app: FastAPI, service: ServingService, replica: str, timeout_s: float) -> None:
    """Extend the app's own lifespan: startup also waits until the service is ready."""
    inner = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(app_: Any) -> AsyncIterator[Any]:
        async with inner(app_) as state:
            await _until_ready(service, timeout_s)
            log.info("dgserve replica %s is ready: %d model versions, inspection store open",
                     replica, sum(len(g.versions) for g in service.models.groups.values()))  # fmt: skip
            yield state
            log.info("dgserve replica %s: lifespan shutdown, closing models and the inspection store", replica)
        log.info("dgserve replica %s: lifespan shutdown done, queued inspection records written", replica)

    app.router.lifespan_context = lifespan


async def _until_ready(service: ServingService, timeout_s: float) -> None:
    """Until every model is loaded and the inspection store is open; raises past ``timeout_s``
    or when a model failed, which fails the replica's start."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    try:
        await asyncio.wait_for(service.loaded(), timeout_s)
    except TimeoutError:
        raise TimeoutError(f"models not loaded after {timeout_s:.0f} s: {'; '.join(service.not_ready())}") from None
    failed = service.models.not_ready()
    if failed:
        raise RuntimeError("models failed to load: " + "; ".join(failed))
    # The inspection store: opened again in the background while it cannot be (a database down).
    while missing := service.not_ready():
        if loop.time() >= deadline:
            raise TimeoutError(f"not ready after {timeout_s:.0f} s: {'; '.join(missing)}")
        await asyncio.sleep(0.2)
