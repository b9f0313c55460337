"""Every Prometheus metric dgserve exports, in one place.

Each app builds its own ``Metrics`` on its own ``CollectorRegistry`` -- never the
process-wide default -- so tests (and a process hosting several apps) can create as
many as they like without "Duplicated timeseries" errors.

Names carry their unit (``_seconds``, ``_bytes``) and counters end in ``_total``, as
Prometheus' naming conventions ask. Label values ``model`` and ``version`` must be
ones the store knows: every distinct value is a new time series, so a request for a
model that does not exist should be recorded with ``model=""`` and ``version=""``,
not with whatever name the client typed.

Alongside the usual serving metrics sit the two only a dynamic-graph server can
have: how much of each DG-Net stage's graph the images actually used
(``dgserve_active_edge_fraction``) and how many blocks routing let them skip
(``dgserve_skipped_nodes_total``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, Final, Protocol, TypeVar

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from dgserve.inspection.pending import DROP_REASONS
from dgserve.metrics.gpu import (  # noqa: F401  (the GPU names are exported here too)
    GPU_MEMORY_ALLOCATED_BYTES,
    GPU_MEMORY_TOTAL_BYTES,
    GPU_MEMORY_USED_BYTES,
    GPU_NAMES,
    GPU_TEMPERATURE_CELSIUS,
    GPU_UTILIZATION_RATIO,
    NvmlCollector,
    TorchMemoryCollector,
)
from dgserve.connectivity import ImageConnectivity, StageConnectivity

if TYPE_CHECKING:
    from dgserve.inspection.pending import DropReason
    from dgserve.serving.batcher import BatchObserver, RejectReason

# The metric names (REQUESTS, ...) are exported too; METRIC_NAMES lists them all.
__all__ = ["METRIC_NAMES", "Metrics", "QueueStats", "metric_family_of"]

log = logging.getLogger(__name__)

T = TypeVar("T")

# --- names ------------------------------------------------------------------------
# As written in the exposition's TYPE lines and in PromQL (histograms add
# _bucket/_sum/_count there); dashboards and alert rules are checked against these.

REQUESTS: Final = "dgserve_requests_total"
REQUEST_DURATION_SECONDS: Final = "dgserve_request_duration_seconds"
QUEUE_WAIT_SECONDS: Final = "dgserve_queue_wait_seconds"
COMPUTE_SECONDS: Final = "dgserve_compute_seconds"
BATCH_SIZE: Final = "dgserve_batch_size"
BATCHES: Final = "dgserve_batches_total"
QUEUE_DEPTH: Final = "dgserve_queue_depth"
IN_FLIGHT_REQUESTS: Final = "dgserve_in_flight_requests"
REJECTIONS: Final = "dgserve_rejections_total"
MODEL_LOAD_SECONDS: Final = "dgserve_model_load_seconds"
MODEL_READY: Final = "dgserve_model_ready"
ACTIVE_EDGE_FRACTION: Final = "dgserve_active_edge_fraction"
SKIPPED_NODES: Final = "dgserve_skipped_nodes_total"
INSPECTION_RECORD_SECONDS: Final = "dgserve_inspection_record_seconds"
INSPECTION_PENDING_RECORDS: Final = "dgserve_inspection_pending_records"
INSPECTION_DROPPED_RECORDS: Final = "dgserve_inspection_dropped_records_total"
INSPECTION_WRITE_ERRORS: Final = "dgserve_inspection_write_errors_total"

METRIC_NAMES: Final[tuple[str, ...]] = (
    REQUESTS, REQUEST_DURATION_SECONDS, QUEUE_WAIT_SECONDS, COMPUTE_SECONDS, BATCH_SIZE, BATCHES, QUEUE_DEPTH,
    IN_FLIGHT_REQUESTS, REJECTIONS, MODEL_LOAD_SECONDS, MODEL_READY, ACTIVE_EDGE_FRACTION, SKIPPED_NODES,
    INSPECTION_RECORD_SECONDS, INSPECTION_PENDING_RECORDS, INSPECTION_DROPPED_RECORDS, INSPECTION_WRITE_ERRORS,
    *GPU_NAMES,
)  # fmt: skip
"""Every metric family the server exports, by the name PromQL uses for it."""

_HISTOGRAMS: Final = frozenset(
    {REQUEST_DURATION_SECONDS, QUEUE_WAIT_SECONDS, COMPUTE_SECONDS, BATCH_SIZE, ACTIVE_EDGE_FRACTION,
     INSPECTION_RECORD_SECONDS}
)
_COUNTERS: Final = frozenset(
    {REQUESTS, BATCHES, REJECTIONS, SKIPPED_NODES, INSPECTION_DROPPED_RECORDS, INSPECTION_WRITE_ERRORS}
)

# --- buckets --------------------------------------------------------------------------

# From 1 ms (a queue that was empty) to 30 s (a request deadline blown on a CPU box).
LATENCY_BUCKETS_S: Final[tuple[float, ...]] = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)
BATCH_SIZE_BUCKETS: Final[tuple[float, ...]] = (1, 2, 4, 8, 16, 32, 64, 128)
# 0.0 is its own bucket on purpose: a stage with every edge closed is worth seeing.
FRACTION_BUCKETS: Final[tuple[float, ...]] = tuple(i / 10 for i in range(11))

_MODEL_LABELS: Final = ("model", "version")


def metric_family_of(series: str) -> str | None:
    """The entry of :data:`METRIC_NAMES` a PromQL series name belongs to, if any.

    ``dgserve_compute_seconds_bucket`` -> ``dgserve_compute_seconds``; counters also
    expose ``<base>_created``, which maps back to ``<base>_total``.
    """
    if series in METRIC_NAMES:
        return series
    for suffix in ("_bucket", "_sum", "_count", "_created"):
        if not series.endswith(suffix):
            continue
        base = series[: -len(suffix)]
        if base in _HISTOGRAMS:
            return base
        if suffix == "_created" and f"{base}_total" in _COUNTERS:
            return f"{base}_total"
    return None


class QueueStats(Protocol):
    """What the queue gauges read at scrape time; ``DynamicBatcher`` provides it."""

    @property
    def queue_depth(self) -> int: ...

    @property
    def in_flight(self) -> int: ...


class PendingStats(Protocol):
    """What the inspection gauge reads at scrape time; the inspection store provides it."""

    @property
    def pending(self) -> int: ...


class Metrics:
    """One app's metrics, registered on ``registry`` (a fresh one when not given)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        # Each answered request's labelled children, looked up once per label set: labels()
        # validates and locks on every call, and under overload it ran for every refusal.
        self._request_children: dict[tuple[str, str, str, str], tuple[Any, Any]] = {}
        # The same for these; none of these series is ever removed, so a cached child stays live.
        self._recording_children: dict[tuple[str, str], Any] = {}
        self._stage_children: dict[tuple[str, str, str], tuple[Any, Any]] = {}
        self.requests = Counter(
            REQUESTS, "HTTP requests answered, by endpoint and status code.",
            [*_MODEL_LABELS, "endpoint", "status"], registry=r,
        )
        self.request_duration = Histogram(
            REQUEST_DURATION_SECONDS, "Time from request received to response ready.",
            [*_MODEL_LABELS, "endpoint"], buckets=LATENCY_BUCKETS_S, registry=r,
        )
        self.queue_wait = Histogram(
            QUEUE_WAIT_SECONDS, "Time each image waited in the batching queue for a worker.",
            _MODEL_LABELS, buckets=LATENCY_BUCKETS_S, registry=r,
        )
        self.compute = Histogram(
            COMPUTE_SECONDS, "Time to compute one batch (the handler call, model forward included).",
            _MODEL_LABELS, buckets=LATENCY_BUCKETS_S, registry=r,
        )
        self.batch_size = Histogram(
            BATCH_SIZE, "Images per batch handed to the model.",
            _MODEL_LABELS, buckets=BATCH_SIZE_BUCKETS, registry=r,
        )
        self.batches = Counter(
            BATCHES, "Batches computed, by outcome (ok, or error when the handler failed).",
            [*_MODEL_LABELS, "outcome"], registry=r,
        )
        self.queue_depth = Gauge(
            QUEUE_DEPTH, "Requests waiting in the batching queue.", _MODEL_LABELS, registry=r,
        )
        self.in_flight = Gauge(
            IN_FLIGHT_REQUESTS, "Images inside a model call right now.", _MODEL_LABELS, registry=r,
        )
        self.rejections = Counter(
            REJECTIONS, "Requests refused or dropped without a result, by reason.",
            [*_MODEL_LABELS, "reason"], registry=r,
        )
        self.model_load = Gauge(
            MODEL_LOAD_SECONDS, "Seconds the last load of this version took, warm-up included.",
            _MODEL_LABELS, registry=r,
        )
        self.model_ready = Gauge(
            MODEL_READY, "1 when this version is loaded and serving, else 0.", _MODEL_LABELS, registry=r,
        )
        self.active_edge_fraction = Histogram(
            ACTIVE_EDGE_FRACTION, "Per image and DG-Net stage: open edges / possible edges after routing.",
            [*_MODEL_LABELS, "stage"], buckets=FRACTION_BUCKETS, registry=r,
        )
        self.skipped_nodes = Counter(
            SKIPPED_NODES, "DG-Net blocks that routing skipped, summed over images, by stage.",
            [*_MODEL_LABELS, "stage"], registry=r,
        )
        self.inspection_record = Histogram(
            INSPECTION_RECORD_SECONDS,
            "Per request: time to queue its images' inspection records and wait for their commit "
            "(only the queueing with DGSERVE_INSPECTION_DURABILITY=async; grows when the store "
            "falls behind; never part of the compute time).",
            _MODEL_LABELS, buckets=LATENCY_BUCKETS_S, registry=r,
        )
        self.inspection_pending = Gauge(
            INSPECTION_PENDING_RECORDS, "Inspection records queued and not yet durable.", registry=r,
        )
        self.inspection_dropped = Counter(
            INSPECTION_DROPPED_RECORDS, "Inspection records lost, by reason: queue_full (queue full and "
            "DGSERVE_INSPECTION_WHEN_FULL=drop) or closing (storage failing at shutdown).", ["reason"], registry=r,
        )
        for reason in DROP_REASONS:  # every reason exported from the start, at 0
            self.inspection_dropped.labels(reason)
        self.inspection_write_errors = Counter(
            INSPECTION_WRITE_ERRORS, "Failed writes of a batch of inspection records (kept queued, retried).",
            registry=r,
        )
        r.register(TorchMemoryCollector())
        r.register(NvmlCollector())

    # --- requests ---------------------------------------------------------------

    def observe_request(
        self, model: str, version: int | str, endpoint: str, status: int | str, seconds: float
    ) -> None:
        """One answered request: its status code and how long it took."""
        key = (model, str(version), endpoint, str(status))
        children = _child(self._request_children, key,
                          lambda: (self.requests.labels(*key), self.request_duration.labels(*key[:3])))
        children[0].inc()
        children[1].observe(seconds)

    def observe_rejection(self, model: str, version: int | str, reason: str) -> None:
        """A request refused before reaching the batcher (``payload_too_large``, ...)."""
        self.rejections.labels(model, str(version), reason).inc()

    # --- batching ------------------------------------------------------------------

    def observer(self, model: str, version: int | str) -> BatchObserver:
        """The hooks to hand to this model version's ``DynamicBatcher``."""
        return _BatchMetrics(self, model, str(version))

    def track_queue(self, model: str, version: int | str, source: QueueStats) -> None:
        """Read ``source``'s queue depth and in-flight count whenever Prometheus scrapes.

        Reading at scrape time means the gauges are never stale, and nothing on the
        hot path has to remember to update them.
        """
        v = str(version)
        self.queue_depth.labels(model, v).set_function(_safe(lambda: source.queue_depth))
        self.in_flight.labels(model, v).set_function(_safe(lambda: source.in_flight))

    def set_queue(self, model: str, version: int | str, depth: int, in_flight: int) -> None:
        """Set the queue gauges by hand (replaces a :meth:`track_queue` callback)."""
        v = str(version)
        for gauge, value in ((self.queue_depth, depth), (self.in_flight, in_flight)):
            # A child given set_function keeps reporting its callback whatever set()
            # stores, so a tracked series is dropped and made afresh.
            try:
                gauge.remove(model, v)
            except KeyError:
                pass
            gauge.labels(model, v).set(value)

    # --- model lifecycle ---------------------------------------------------------------

    def model_loaded(self, model: str, version: int | str, load_seconds: float) -> None:
        """A version finished loading and warming up, and now serves."""
        v = str(version)
        self.model_load.labels(model, v).set(load_seconds)
        self.model_ready.labels(model, v).set(1)

    def set_ready(self, model: str, version: int | str, ready: bool) -> None:
        self.model_ready.labels(model, str(version)).set(1 if ready else 0)

    def model_unloaded(self, model: str, version: int | str) -> None:
        """A version stopped serving: ready drops to 0 and its queue series go away.

        Removing the queue series also drops the scrape callbacks, which would
        otherwise keep the stopped batcher alive.
        """
        v = str(version)
        self.model_ready.labels(model, v).set(0)
        for gauge in (self.queue_depth, self.in_flight):
            try:
                gauge.remove(model, v)
            except KeyError:
                pass  # never tracked

    # --- inspection records -------------------------------------------------------------

    def observe_recording(self, model: str, version: int | str, seconds: float) -> None:
        """One request's records were queued in the inspection store and, unless written
        behind, committed, in ``seconds``."""
        key = (model, str(version))
        _child(self._recording_children, key, lambda: self.inspection_record.labels(*key)).observe(seconds)

    def track_inspections(self, store: PendingStats) -> None:
        """Read the store's queued-record count whenever Prometheus scrapes."""
        self.inspection_pending.set_function(_safe(lambda: store.pending))

    # The inspection store's QueueObserver: it runs on the event loop, so it only counts.
    def inspection_records_dropped(self, count: int, reason: DropReason) -> None:
        self.inspection_dropped.labels(reason).inc(count)

    def inspection_write_failed(self) -> None:
        self.inspection_write_errors.inc()

    # --- connectivity ---------------------------------------------------------------------

    def observe_connectivity(
        self, model: str, version: int | str, images: Iterable[ImageConnectivity]
    ) -> None:
        """Record each image's per-stage edge usage and skipped blocks."""
        v = str(version)
        for image in images:
            for stage in image.of(StageConnectivity):
                key = (model, v, stage.stage)
                children = _child(self._stage_children, key,
                                  lambda: (self.active_edge_fraction.labels(*key), self.skipped_nodes.labels(*key)))
                children[0].observe(stage.active_edge_fraction)
                children[1].inc(stage.skipped_nodes)

    # --- exposition -----------------------------------------------------------------------

    def render(self) -> tuple[bytes, str]:
        """The body and content type for ``GET /metrics``."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _BatchMetrics:
    """A ``BatchObserver`` for one model version; runs on the event loop, so it only counts."""

    def __init__(self, metrics: Metrics, model: str, version: str) -> None:
        self._metrics = metrics
        self._model = model
        self._version = version
        # Resolved once: labels() takes a lock and a dict lookup on every call.
        self._queue_wait = metrics.queue_wait.labels(model, version)
        self._compute = metrics.compute.labels(model, version)
        self._batch_size = metrics.batch_size.labels(model, version)
        self._ok = metrics.batches.labels(model, version, "ok")
        self._error = metrics.batches.labels(model, version, "error")
        self._rejections: dict[str, Any] = {}

    def batch_formed(self, size: int, queue_wait_s: Sequence[float]) -> None:
        self._batch_size.observe(size)
        for wait in queue_wait_s:
            self._queue_wait.observe(wait)

    def batch_done(self, size: int, compute_s: float, ok: bool) -> None:
        self._compute.observe(compute_s)
        (self._ok if ok else self._error).inc()

    def rejected(self, reason: RejectReason) -> None:
        # Under overload this runs for most requests: one labels() per reason, not per call.
        counter = self._rejections.get(reason)
        if counter is None:
            counter = self._rejections[reason] = self._metrics.rejections.labels(self._model, self._version, reason)
        counter.inc()


def _child(cache: dict[Any, T], key: Any, make: Callable[[], T]) -> T:
    """``cache[key]``, made once: ``labels()`` validates and takes a lock on every call."""
    child = cache.get(key)
    if child is None:
        child = cache[key] = make()
    return child


def _safe(read: Callable[[], float]) -> Callable[[], float]:
    # A callback that raises would fail the whole scrape; one missing value is better.
    def guarded() -> float:
        try:
            return float(read())
        except Exception:
            log.exception("metrics: gauge callback failed")
            return math.nan

    return guarded
