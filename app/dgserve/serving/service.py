"""The serving service: what every protocol front-end (``/v1`` today, OIP next) calls.

A front-end translates its protocol into these calls and the results back, nothing
more:

1. ``admit`` finds a ready model that does the task and asks its batcher whether it
   would take work, before the caller reads or decodes a body: under overload that
   work is wasted, and the 503's ``Retry-After`` is the batcher's own estimate;
2. ``prepare`` decodes and preprocesses uploads in the decode pool, never on the loop;
3. ``infer`` submits the items to the model's batcher with the request's deadline,
   waits for every image, then hands each image's inspection record to the inspection
   store (a bounded write-behind queue) outside the batch handler, so store time is
   never compute time and a slow disk never stalls a model worker. The ids it returns
   are readable at once and durable once the store flushes.

Results are immutable. Cancelling ``infer`` (the client left) removes the request's
images from the queue before any compute; nothing is recorded for them.

An inspection store that cannot be opened at start-up (a database that is down) does
not stop the server: ``start`` returns, ``not_ready`` names the store and the error,
``admit`` and the inspection reads answer 503, and the store is opened again in the
background, with back-off, until it opens and the server becomes ready.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from torch import Tensor

from dgserve.allocator import keep_large_blocks
from dgserve.errors import DGServeError, InvalidRequestError, NotReadyError
from dgserve.inspection import InspectionRecord, InspectionStore, open_inspection_store
from dgserve.metrics import Metrics
from dgserve.model_store import Manifest, ModelStore
from dgserve.serving.batcher import DynamicBatcher
from dgserve.serving.reservation import Reservation
from dgserve.serving.decode import new_decode_pool
from dgserve.serving.served_models import ServedModel, ServedModels
from dgserve.serving.worker import ImageResult
from dgserve.settings import Settings
from dgserve.tasks import ImageInfo, InferenceItem, Options, Task, get_task

__all__ = ["ImagePrediction", "ServingService", "Upload"]

log = logging.getLogger(__name__)

# Back-off between attempts to open an inspection store that failed to open.
_STORE_RETRY_MIN_S = 0.5
_STORE_RETRY_MAX_S = 30.0
# How soon a client refused because the store is not open should ask again.
_STORE_RETRY_AFTER_S = 5.0


@dataclass(frozen=True, slots=True)
class Upload:
    """One encoded image as a front-end received it."""

    part: str | None  # its multipart part (file name or field), for messages and records
    data: bytes
    content_type: str


@dataclass(frozen=True, slots=True)
class ImagePrediction:
    """One image's answer: its inspection id, the image as sent, and what the model made of it.

    ``id`` is ``None`` when the record was dropped (the store's queue was full with
    ``DGSERVE_INSPECTION_WHEN_FULL=drop``): an id is only handed out for a kept record.
    ``committed`` says whether the record was durable before the answer went out.
    """

    id: str | None
    image: ImageInfo
    result: ImageResult
    committed: bool = True


class ServingService:
    """Models, the decode pool and the inspection store of one server, and the way through them."""

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.models = ServedModels(settings, ModelStore(settings.model_store), metrics)
        self._decode_pool: ThreadPoolExecutor | None = None
        self._store: InspectionStore | None = None  # created at start, open or not
        self._inspections: InspectionStore | None = None  # the same store, once it is open
        self._store_error: str | None = None  # why it is not open yet
        self._store_opener: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self._load_task: asyncio.Task[None] | None = None
        # The server's process sets it (api/server.py): its models live as long as it does.
        self.freeze_after_load = False

    # --- lifecycle ------------------------------------------------------------------

    async def start(self) -> None:
        """Open the decode pool and the inspection store, scan the store, start loading models.

        Returns once the manifests are read (milliseconds); models load in the background,
        and ``/readyz`` says when they are ready. A store URL that is not valid raises; a
        store that cannot be opened now is retried in the background (``not_ready``).
        """
        settings = self.settings
        if settings.malloc_keep_large_blocks:
            keep_large_blocks()  # before any replica allocates (process workers do the same)
        self._decode_pool = new_decode_pool(settings.decode_threads, settings.compute_nice)
        store = open_inspection_store(
            settings.inspection_location,
            max_age_s=settings.inspection_max_age_s,
            max_records=settings.inspection_max_records,
            max_pending=settings.inspection_max_pending,
            when_full=settings.inspection_when_full,
            observer=self.metrics,
        )
        self._store = store
        self.metrics.track_inspections(store)
        if not await self._try_open_store(store):
            self._store_opener = asyncio.create_task(self._open_store_later(store), name="dgserve-open-inspections")
        await asyncio.to_thread(self.models.discover)
        self._load_task = asyncio.create_task(self._load_models(), name="dgserve-load-models")

    async def _try_open_store(self, store: InspectionStore) -> bool:
        try:
            await store.start()
        except Exception as exc:
            # The first line: libpq adds hints on the next ones, which /readyz can spare.
            why = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            self._store_error = f"inspection store {store.backend.location}: {why}"
            log.warning("%s; the server is not ready, and will try again", self._store_error, exc_info=exc)
            return False
        self._inspections, self._store_error = store, None
        return True

    async def _open_store_later(self, store: InspectionStore) -> None:
        # An attempt under way is never cancelled (close waits for it), so a connection it
        # opens is never orphaned; each attempt is bounded by the backend's connect timeout.
        delay = _STORE_RETRY_MIN_S
        while True:
            try:
                await asyncio.wait_for(self._stopping.wait(), delay)
                return
            except TimeoutError:
                pass
            if await self._try_open_store(store):
                log.info("inspection store %s is open", store.backend.location)
                return
            delay = min(delay * 2, _STORE_RETRY_MAX_S)

    def not_ready(self) -> list[str]:
        """One line per thing that keeps the server from serving: models, and the
        inspection store; empty when ready (``/readyz``)."""
        lines = self.models.not_ready()
        if self._store_error is not None:
            lines.append(self._store_error)
        elif self._inspections is None:
            lines.append("inspection store not open yet")
        return lines

    async def close(self) -> None:
        """Stop loading, stop the models (queued work fails), then flush and close the store."""
        self._stopping.set()
        if self._load_task is not None:
            self._load_task.cancel()
            await asyncio.gather(self._load_task, return_exceptions=True)
        await self.models.close()
        if self._store_opener is not None:
            await self._store_opener
        if self._store is not None:
            store, self._store, self._inspections = self._store, None, None
            await store.close()
        if self._decode_pool is not None:
            self._decode_pool.shutdown(wait=False, cancel_futures=True)
            self._decode_pool = None

    async def stop_work(self) -> None:
        """The drain's deadline (``api/drain.py``): every request queued or computing fails
        now with ``ShuttingDownError`` (503), and so does every later ``admit``. Records
        already put stay queued; ``close`` flushes them."""
        await self.models.stop_work()

    async def loaded(self) -> None:
        """Return once every configured model has loaded or failed (see ``models.not_ready``)."""
        if self._load_task is not None:
            await asyncio.shield(self._load_task)

    async def _load_models(self) -> None:
        try:
            await self.models.load_all()
        except Exception:
            # load_all records each model's failure itself; this is the store itself failing.
            log.exception("loading models failed")
        if self.freeze_after_load:
            # Every object alive now (the models' modules and tensors, the app) lives as long
            # as the process. Frozen, the cyclic GC stops walking them: each full collection
            # had walked them all, stopping the whole server for 100-260 ms, the p99 spikes
            # of the LitServe peer's rounds. Garbage is still freed by reference counts.
            gc.collect()
            gc.freeze()
            log.info("froze %d long-lived objects out of the cyclic GC's collections", gc.get_freeze_count())

    @property
    def inspections(self) -> InspectionStore:
        """The open inspection store; ``NotReadyError`` (503) saying why while it is not."""
        if self._inspections is None:
            raise self._store_not_ready()
        return self._inspections

    def _store_not_ready(self) -> NotReadyError:
        why = self._store_error or "the inspection store is not open"
        return NotReadyError(why, retry_after_s=_STORE_RETRY_AFTER_S)

    # --- the request path -------------------------------------------------------------

    def deadline(self, timeout_ms: float | None) -> float:
        """The absolute ``loop.time()`` a request arriving now must be answered by."""
        timeout = timeout_ms or self.settings.default_timeout_ms
        return asyncio.get_running_loop().time() + timeout / 1000.0

    def admit(
        self, name: str, version: int | None, task: Task | None, held: Reservation | None = None
    ) -> tuple[ServedModel, Reservation]:
        """A ready model version doing ``task`` (any, for ``None``) whose queue has room, and
        the place held there for the request (pass it to ``infer``; ``with`` it, so that a
        request failing before ``infer`` gives it back); else its 404/422/503.

        Also 503 while the inspection store is not open: every answer carries the id of
        its record, so none is computed before there is a store to keep it. ``held``: the
        place the admission gate already took for this request (``api/admission.py``).
        """
        served = self.models.require(name, version, task)
        if self._inspections is None:
            raise self._store_not_ready()
        assert served.batcher is not None  # require() returns ready models only
        if held is not None and held.batcher is served.batcher:
            return served, held
        return served, served.batcher.reserve()

    async def prepare(self, served: ServedModel, uploads: Sequence[Upload], options: Options) -> list[InferenceItem]:
        """Decode and preprocess ``uploads`` in the decode pool; the first bad one, in order, fails."""
        if self._decode_pool is None:
            raise NotReadyError("the server is starting")
        assert served.manifest is not None
        loop = asyncio.get_running_loop()
        pool, manifest = self._decode_pool, served.manifest
        settings = self.settings
        outcomes = await asyncio.gather(
            *(loop.run_in_executor(pool, _prepare, u, manifest, settings, options) for u in uploads),
            return_exceptions=True,
        )
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
        return list(outcomes)  # type: ignore[arg-type]

    def prepare_tensors(self, served: ServedModel, tensors: Sequence[Tensor], options: Options) -> list[InferenceItem]:
        """Inputs the client preprocessed itself: float32 of the task's ``input_shape`` (``(3, H, W)`` for images)."""
        assert served.manifest is not None
        task, (height, width) = get_task(served.manifest.task), served.manifest.preprocessing.input_size
        shape = task.input_shape(served.manifest.preprocessing)
        items = []
        for index, tensor in enumerate(tensors):
            if tuple(tensor.shape) != shape:
                raise InvalidRequestError(
                    f"input {index}: shape {list(tensor.shape)} is not the model's preprocessed input {list(shape)}"
                )
            prepared, context = task.prepare_tensor(tensor)
            items.append(InferenceItem(prepared, ImageInfo(None, width, height), options, context))
        return items

    async def infer(
        self,
        served: ServedModel,
        items: Sequence[InferenceItem],
        deadline: float,
        request_id: str | None = None,
        tags: Mapping[str, str] | None = None,
        reservation: Reservation | None = None,
    ) -> list[ImagePrediction]:
        """Every item's result, in order, each recorded in the inspection store under its id.

        ``request_id`` is the client's own id for the request (OIP's ``id``); the records keep it.
        ``tags`` (validated by the front-end, ``dgserve.inspection.tags``) go with every image's record.
        """
        assert served.batcher is not None
        results = await _submit_all(served.batcher, items, deadline, reservation)
        ids, committed = await self._record(served, items, results, request_id, dict(tags or {}))
        return [ImagePrediction(i, item.image, r, committed and i is not None)
                for i, item, r in zip(ids, items, results, strict=True)]  # fmt: skip

    async def _record(
        self,
        served: ServedModel,
        items: Sequence[InferenceItem],
        results: Sequence[ImageResult],
        request_id: str | None,
        tags: dict[str, str],
    ) -> tuple[list[str | None], bool]:
        """Each image's record id (None: dropped), and whether they were all committed."""
        store = self.inspections
        assert served.manifest is not None
        started = time.perf_counter()
        ids = []
        for item, result in zip(items, results, strict=True):
            prediction = {"image": item.image.to_dict(), "predictions": result.predictions,
                          "replica": self.settings.replica}  # fmt: skip
            if request_id is not None:
                prediction["request_id"] = request_id
            record = InspectionRecord.new(
                model=served.name,
                version=served.version,
                task=served.manifest.task,
                prediction=prediction,
                connectivity=result.connectivity,
                connectivity_json=result.connectivity_json,
                tags=tags,
                thumbnail=item.image.thumbnail,  # None unless DGSERVE_INSPECTION_THUMBNAILS
            )
            # A full store queue (storage down or behind) makes this wait (back-pressure,
            # nothing lost) or drops the record, counted and logged, so that the answer
            # still goes out (DGSERVE_INSPECTION_WHEN_FULL). Never the model worker's time.
            # A dropped record's id is never handed out: every id a client gets is durable.
            ids.append(record.id if await store.put(record) else None)
        # An acknowledged id must survive a crash of this process: the answer waits for the
        # commit (shared with every request queued meanwhile), but never on storage that is
        # down; then it goes out marked uncommitted, its records still queued.
        timeout = self.settings.inspection_commit_wait_s  # 0 with DGSERVE_INSPECTION_DURABILITY=async
        kept = any(i is not None for i in ids)
        committed = kept and timeout > 0 and await store.commit(timeout)
        self.metrics.observe_recording(served.name, served.version, time.perf_counter() - started)
        self.metrics.observe_connectivity(served.name, served.version, [r.record for r in results])
        return ids, committed


def _prepare(upload: Upload, manifest: Manifest, settings: Settings, options: Options) -> InferenceItem:
    """Runs in the decode pool: bytes to a preprocessed tensor, decoded as the model's task decodes uploads."""
    task = get_task(manifest.task)
    tensor, info, context = task.prepare_upload(upload.data, upload.part, manifest.preprocessing, settings)
    return InferenceItem(tensor, info, options, context)


async def _submit_all(
    batcher: DynamicBatcher[InferenceItem, ImageResult],
    items: Sequence[InferenceItem],
    deadline: float,
    reservation: Reservation | None,
) -> list[ImageResult]:
    # The place held at admission goes to the first image; a multipart request's others
    # queue as any request does.
    if len(items) == 1:
        return [await batcher.submit(items[0], deadline=deadline, reservation=reservation)]
    tasks = [asyncio.ensure_future(batcher.submit(item, deadline=deadline, reservation=reservation if i == 0 else None))
             for i, item in enumerate(items)]  # fmt: skip
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
    finally:
        # One image failing fails the request: its siblings leave the queue at once.
        for task in tasks:
            task.cancel()
        await asyncio.wait(tasks)
    errors = [t.exception() for t in tasks if not t.cancelled() and t.exception() is not None]
    if errors:
        raise next((e for e in errors if isinstance(e, DGServeError)), errors[0])
    return [t.result() for t in tasks]
