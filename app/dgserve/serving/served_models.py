"""The models a server serves, by name and version, and their loading lifecycle.

``discover()`` reads the store's manifests (cheap) so every configured version is known,
and listed, before any weights are read; ``load_all()`` then loads them one by one in
the background: replicas on every worker device, a warm-up batch through each, and a
started ``DynamicBatcher``. A version whose store entry is broken (``ManifestError``,
``WeightsError``, or anything else its loading raises) is kept, marked ``failed`` with
its error, and never becomes ready; it does not stop the others from loading.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from pydantic import ValidationError

from dgserve.cores import available_cores
from dgserve.errors import (
    DGServeError,
    InvalidRequestError,
    ModelNotFoundError,
    NotReadyError,
    VersionNotFoundError,
)
from dgserve.metrics import Metrics
from dgserve.model_store import Batching, LoadedModel, Manifest, ModelStore
from dgserve.models.connectivity import describe_graph
from dgserve.serving.batcher import DynamicBatcher
from dgserve.serving.process_worker import ProcessModelWorker
from dgserve.serving.worker import ImageResult, ModelWorker
from dgserve.settings import Settings
from dgserve.tasks import InferenceItem, Task, get_task

__all__ = ["ModelGroup", "ServedModel", "ServedModels", "resolve_devices"]

log = logging.getLogger(__name__)

State = Literal["pending", "loading", "ready", "failed"]

# A broken version will not fix itself; a client retrying it quickly achieves nothing.
_FAILED_RETRY_AFTER_S = 60.0
_LOADING_RETRY_AFTER_S = 5.0


@dataclass(eq=False)
class ServedModel:
    name: str
    version: int
    manifest: Manifest | None = None
    state: State = "pending"
    error: str | None = None
    error_code: str | None = None
    batching: Batching | None = None
    devices: list[str] = field(default_factory=list)
    workers: list[ModelWorker | ProcessModelWorker] = field(default_factory=list)
    batcher: DynamicBatcher[InferenceItem, ImageResult] | None = None
    load_seconds: float | None = None
    graph: dict[str, Any] | None = None

    @property
    def ready(self) -> bool:
        return self.state == "ready"

    def fail(self, code: str, message: str) -> None:
        self.state, self.error_code, self.error = "failed", code, message


@dataclass(eq=False)
class ModelGroup:
    name: str
    versions: dict[int, ServedModel] = field(default_factory=dict)
    error: str | None = None  # configured but not in the store

    @property
    def default(self) -> ServedModel | None:
        return self.versions[max(self.versions)] if self.versions else None


def resolve_devices(spec: str) -> list[torch.device]:
    if spec == "auto":
        if torch.cuda.is_available():
            return [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
        return [torch.device("cpu")]
    return [torch.device(item.strip()) for item in spec.split(",")]


class ServedModels:
    def __init__(self, settings: Settings, store: ModelStore, metrics: Metrics) -> None:
        self.settings = settings
        self.store = store
        self.metrics = metrics
        self.groups: dict[str, ModelGroup] = {}
        self.discovered = False
        self.devices = resolve_devices(settings.devices)

    # --- lookup -------------------------------------------------------------------

    def lookup(self, name: str, version: int | None = None) -> ServedModel:
        group = self.groups.get(name)
        if group is None or not group.versions:
            raise ModelNotFoundError(name)
        if version is None:
            served = group.default
            assert served is not None
            return served
        served_version = group.versions.get(version)
        if served_version is None:
            raise VersionNotFoundError(name, version, sorted(group.versions))
        return served_version

    def require(self, name: str, version: int | None, task: Task | None) -> ServedModel:
        """A ready version that does ``task`` (any, for ``None``), or the 404/422/503 that says why not."""
        served = self.lookup(name, version)
        if task is not None and served.manifest is not None and served.manifest.task != task.name:
            endpoint = get_task(served.manifest.task).endpoint
            raise InvalidRequestError(
                f"model {name!r} version {served.version} is a {served.manifest.task} model; "
                f"use POST /v1/models/{name}/{endpoint}"
            )
        if served.state == "failed":
            raise NotReadyError(
                f"model {name!r} version {served.version} failed to load ({served.error_code}); "
                f"see GET /v1/models/{name}",
                retry_after_s=_FAILED_RETRY_AFTER_S,
            )
        if not served.ready or served.batcher is None:
            raise NotReadyError(
                f"model {name!r} version {served.version} is {served.state}", retry_after_s=_LOADING_RETRY_AFTER_S
            )
        return served

    def not_ready(self) -> list[str]:
        """One line per configured model or version that is not serving; empty when all are."""
        if not self.discovered:
            return ["model store not scanned yet"]
        lines = []
        for group in self.groups.values():
            if group.error:
                lines.append(f"{group.name}: {group.error}")
            for served in group.versions.values():
                if not served.ready:
                    why = f" ({served.error_code})" if served.error_code else ""
                    lines.append(f"{served.name} v{served.version}: {served.state}{why}")
        return lines

    # --- lifecycle ------------------------------------------------------------------

    def discover(self) -> None:
        """Read every configured manifest (blocking file I/O: call it in a thread)."""
        names = self.settings.models or self.store.names()
        for name in names:
            group = self.groups.setdefault(name, ModelGroup(name))
            try:
                versions = self.store.versions(name)
            except ModelNotFoundError as exc:
                group.error = exc.message
                log.error("configured model %s: %s", name, exc.message)
                continue
            if self.settings.versions == "latest":
                versions = versions[-1:]
            for version in versions:
                served = group.versions.setdefault(version, ServedModel(name, version))
                self.metrics.set_ready(name, version, False)  # exported at 0 while it loads
                try:
                    served.manifest = self.store.resolve(name, version).manifest
                except DGServeError as exc:
                    served.fail(exc.code, exc.message)
                    log.error("model %s v%d is broken: %s", name, version, exc.message)
        self.discovered = True

    async def load_all(self) -> None:
        """Load every discovered version in turn; failures are recorded, never raised."""
        if not self.discovered:
            await asyncio.to_thread(self.discover)
        for group in self.groups.values():
            for served in group.versions.values():
                if served.state == "pending":
                    await self._load(served)
        ready = sum(s.ready for g in self.groups.values() for s in g.versions.values())
        log.info("models loaded: %d ready; not ready: %s", ready, self.not_ready() or "none")

    def idle_s(self) -> float:
        """Seconds since any model last had a request arrive or a batch finish; 0 while one waits or
        computes (heavy reads wait for inference, ``inspection/readers.py``)."""
        return min((s.batcher.idle_s for g in self.groups.values() for s in g.versions.values()
                    if s.batcher is not None), default=math.inf)  # fmt: skip

    async def stop_work(self) -> None:
        """Fail every request queued or computing, on every model, with ``ShuttingDownError`` now.

        The batchers stop taking work; the workers stay until ``close`` (a batch still in
        its thread finishes there, and nobody waits for it).
        """
        batchers = [s.batcher for g in self.groups.values() for s in g.versions.values() if s.batcher is not None]
        await asyncio.gather(*(b.stop(timeout=0) for b in batchers))

    async def close(self) -> None:
        for group in self.groups.values():
            for served in group.versions.values():
                if served.batcher is not None:
                    await served.batcher.stop()
                    self.metrics.model_unloaded(served.name, served.version)
                for worker in served.workers:
                    worker.close()
                served.workers = []

    def _worker_threads(self, device: torch.device) -> int | None:
        """torch intra-op threads for one worker on ``device`` (None: leave torch's default)."""
        if device.type != "cpu":
            return None
        # Split the cores among the replicas that may compute at once on the CPU, in
        # every server process, so they do not oversubscribe it.
        settings = self.settings
        cpu_replicas = settings.instances_per_device * sum(d.type == "cpu" for d in self.devices)
        # "auto" is made a number by the launcher (api/processes.run); an app made without
        # it (create_app in a test, a Ray replica) is the only server process.
        cpu_replicas *= settings.server_processes if isinstance(settings.server_processes, int) else 1
        return settings.torch_threads or max(1, available_cores() // cpu_replicas)

    async def _load(self, served: ServedModel) -> None:
        served.state = "loading"
        started = time.perf_counter()
        try:
            served.batching = self._batching(served)
            for device in self.devices:
                for _ in range(self.settings.instances_per_device):
                    served.workers.append(await self._worker(served, device))
            served.manifest, served.graph = self._describe(served.workers[0])
            # A compiled forward compiles in its warm-up: without one the first requests would wait for it.
            if self.settings.warmup or served.manifest.torch_compile:
                for worker in served.workers:
                    await worker.warm_up()
        except ValidationError as exc:
            message = f"batching settings are invalid: {exc.errors(include_url=False)[0]['msg']}"
            self._abandon(served, "invalid_batching", message)
            log.error("model %s v%d: %s", served.name, served.version, message)
            return
        except DGServeError as exc:
            self._abandon(served, exc.code, exc.message)
            log.error("model %s v%d failed to load: %s", served.name, served.version, exc.message)
            return
        except Exception as exc:
            self._abandon(served, "load_failed", f"{type(exc).__name__}: {exc}")
            log.exception("model %s v%d failed to load", served.name, served.version)
            return
        batching = served.batching
        served.batcher = DynamicBatcher(
            served.workers,
            max_batch_size=batching.max_batch_size,
            max_delay_s=batching.max_delay_ms / 1000.0,
            max_queue_size=batching.max_queue_size,
            name=f"{served.name}:v{served.version}",
            observer=self.metrics.observer(served.name, served.version),
        )
        served.batcher.start()
        served.devices = [str(w.device) for w in served.workers]
        served.load_seconds = time.perf_counter() - started
        served.state = "ready"
        self.metrics.track_queue(served.name, served.version, served.batcher)
        self.metrics.model_loaded(served.name, served.version, served.load_seconds)
        log.info("model %s v%d ready in %.2fs on %s", served.name, served.version, served.load_seconds,
                 ", ".join(served.devices))

    def _abandon(self, served: ServedModel, code: str, message: str) -> None:
        for worker in served.workers:
            worker.close()
        served.workers = []
        served.fail(code, message)
        self.metrics.set_ready(served.name, served.version, False)

    async def _worker(self, served: ServedModel, device: torch.device) -> ModelWorker | ProcessModelWorker:
        """One more replica of ``served`` on ``device``, in a thread or a process (``DGSERVE_MODEL_WORKERS``)."""
        name = f"{served.name}-v{served.version}-{device}-{len(served.workers)}"
        threads = self._worker_threads(device)
        if self.settings.model_workers == "process":
            worker = ProcessModelWorker(self.store.root, served.name, served.version, device, name=name,
                                        threads=threads, nice=self.settings.compute_nice,
                                        precision=self.settings.precision,
                                        memory_format=self.settings.memory_format,
                                        torch_compile=self.settings.torch_compile,
                                        max_batch_size=served.batching.max_batch_size,
                                        malloc_keep_large_blocks=self.settings.malloc_keep_large_blocks)  # fmt: skip
            try:
                await worker.start()
            except BaseException:
                worker.close()  # a child still starting (a cancelled load) is stopped once it has
                raise
            return worker
        loaded = await asyncio.to_thread(self._replica, served, device)
        return ModelWorker(loaded, device, name=name, threads=threads, nice=self.settings.compute_nice,
                           precision=self.settings.precision, memory_format=self.settings.memory_format,
                           torch_compile=self.settings.torch_compile, max_batch_size=served.batching.max_batch_size)

    @staticmethod
    def _describe(worker: ModelWorker | ProcessModelWorker) -> tuple[Manifest, dict[str, Any]]:
        if isinstance(worker, ProcessModelWorker):
            assert worker.manifest is not None and worker.graph is not None  # started
            return worker.manifest, worker.graph
        return worker.manifest, describe_graph(worker.loaded.model)

    def _replica(self, served: ServedModel, device: torch.device) -> LoadedModel:
        # Further replicas copy the first one: weights are read and verified once.
        if served.workers and isinstance(served.workers[0], ModelWorker):
            first = served.workers[0].loaded
            return LoadedModel(first.manifest, copy.deepcopy(first.model).to(device).eval(), first.path)
        return self.store.load(served.name, served.version, device)

    def _batching(self, served: ServedModel) -> Batching:
        assert served.manifest is not None
        s = self.settings
        values = served.manifest.batching.model_dump()
        for key in ("max_batch_size", "max_delay_ms", "max_queue_size"):
            if getattr(s, key) is not None:
                values[key] = getattr(s, key)
        override = s.batching.get(served.name)
        if override is not None:
            values.update(override.model_dump(exclude_none=True))
        return Batching(**values)  # ValidationError: the overrides and manifest disagree
