"""Metrics: every method feeds the right series, apps do not share state, and
METRIC_NAMES is exactly what /metrics exports.

Values are read back from the rendered exposition text, the way Prometheus sees them.
"""

from __future__ import annotations

import asyncio
import math
import re
import sys
from collections.abc import Sequence
from types import SimpleNamespace

import pytest
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from dgserve.metrics import (
    FRACTION_BUCKETS,
    GPU_MEMORY_ALLOCATED_BYTES,
    METRIC_NAMES,
    Metrics,
    metric_family_of,
)
from dgserve.connectivity import ImageConnectivity, StageConnectivity
from dgserve.serving.batcher import DynamicBatcher

pytestmark = pytest.mark.timeout(10)


def value(metrics: Metrics, sample_name: str, **labels: str) -> float | None:
    """The value of the one sample called ``sample_name`` whose labels include ``labels``."""
    text = metrics.render()[0].decode()
    found = [
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == sample_name and all(s.labels.get(k) == v for k, v in labels.items())
    ]
    assert len(found) <= 1, f"{sample_name}{labels} matches {len(found)} samples"
    return found[0] if found else None


def type_lines(metrics: Metrics) -> dict[str, str]:
    text = metrics.render()[0].decode()
    return dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, flags=re.MULTILINE))


def stage(name: str, open_edges: int, possible: int, executed: Sequence[bool]) -> StageConnectivity:
    return StageConnectivity(
        stage=name,
        nodes=[],
        adjacency=[],
        thresholds=[],
        executed=list(executed),
        open_edges=open_edges,
        possible_edges=possible,
    )


# --- requests -----------------------------------------------------------------------


def test_observe_request_counts_by_status_and_times_by_endpoint() -> None:
    m = Metrics()
    m.observe_request("dgnet", 2, "predict", 200, 0.03)
    m.observe_request("dgnet", 2, "predict", 200, 0.2)
    m.observe_request("dgnet", 2, "predict", 422, 0.004)
    base = {"model": "dgnet", "version": "2", "endpoint": "predict"}
    assert value(m, "dgserve_requests_total", **base, status="200") == 2
    assert value(m, "dgserve_requests_total", **base, status="422") == 1
    assert value(m, "dgserve_request_duration_seconds_count", **base) == 3
    assert value(m, "dgserve_request_duration_seconds_sum", **base) == pytest.approx(0.234)
    assert value(m, "dgserve_request_duration_seconds_bucket", **base, le="0.005") == 1
    assert value(m, "dgserve_request_duration_seconds_bucket", **base, le="0.05") == 2
    assert value(m, "dgserve_request_duration_seconds_bucket", **base, le="+Inf") == 3


def test_latency_buckets_span_milliseconds_to_seconds() -> None:
    m = Metrics()
    m.observe_request("a", 1, "predict", 200, 0.001)
    les = {
        s.labels["le"]
        for family in text_string_to_metric_families(m.render()[0].decode())
        for s in family.samples
        if s.name == "dgserve_request_duration_seconds_bucket"
    }
    bounds = sorted(float(le) for le in les if le != "+Inf")
    assert bounds[0] <= 0.001 and bounds[-1] >= 10


def test_observe_rejection_counts_by_reason() -> None:
    m = Metrics()
    m.observe_rejection("a", 1, "payload_too_large")
    m.observe_rejection("a", 1, "payload_too_large")
    m.observe_rejection("a", 1, "invalid_image")
    assert value(m, "dgserve_rejections_total", model="a", version="1", reason="payload_too_large") == 2
    assert value(m, "dgserve_rejections_total", model="a", version="1", reason="invalid_image") == 1


# --- batch observer ------------------------------------------------------------------------


def test_observer_feeds_queue_wait_compute_batch_size_and_rejections() -> None:
    m = Metrics()
    obs = m.observer("dgnet", 3)
    obs.batch_formed(3, [0.001, 0.02, 0.3])
    obs.batch_done(3, 0.05, True)
    obs.batch_formed(1, [0.002])
    obs.batch_done(1, 0.5, False)
    obs.rejected("queue_full")
    obs.rejected("deadline")
    obs.rejected("deadline")

    mv = {"model": "dgnet", "version": "3"}
    assert value(m, "dgserve_queue_wait_seconds_count", **mv) == 4  # one per image
    assert value(m, "dgserve_queue_wait_seconds_sum", **mv) == pytest.approx(0.323)
    assert value(m, "dgserve_compute_seconds_count", **mv) == 2  # one per batch
    assert value(m, "dgserve_compute_seconds_sum", **mv) == pytest.approx(0.55)
    assert value(m, "dgserve_batch_size_count", **mv) == 2
    assert value(m, "dgserve_batch_size_bucket", **mv, le="1.0") == 1
    assert value(m, "dgserve_batch_size_bucket", **mv, le="4.0") == 2
    assert value(m, "dgserve_batches_total", **mv, outcome="ok") == 1
    assert value(m, "dgserve_batches_total", **mv, outcome="error") == 1
    assert value(m, "dgserve_rejections_total", **mv, reason="queue_full") == 1
    assert value(m, "dgserve_rejections_total", **mv, reason="deadline") == 2


def test_batch_size_buckets_are_powers_of_two() -> None:
    m = Metrics()
    m.observer("a", 1).batch_formed(1, [0.0])
    les = [
        s.labels["le"]
        for family in text_string_to_metric_families(m.render()[0].decode())
        for s in family.samples
        if s.name == "dgserve_batch_size_bucket"
    ]
    assert les == ["1.0", "2.0", "4.0", "8.0", "16.0", "32.0", "64.0", "128.0", "+Inf"]


def test_observer_works_with_a_real_batcher() -> None:
    m = Metrics()

    async def double(items: list[int]) -> list[int]:
        return [2 * i for i in items]

    async def main() -> list[int]:
        batcher: DynamicBatcher[int, int] = DynamicBatcher(
            [double], max_batch_size=4, max_delay_s=0.01, max_queue_size=8, observer=m.observer("toy", 1)
        )
        async with batcher:
            return list(await asyncio.gather(*(batcher.submit(i) for i in range(4))))

    assert asyncio.run(main()) == [0, 2, 4, 6]
    assert value(m, "dgserve_queue_wait_seconds_count", model="toy", version="1") == 4
    assert value(m, "dgserve_batches_total", model="toy", version="1", outcome="ok") == 1
    assert value(m, "dgserve_batch_size_sum", model="toy", version="1") == 4


# --- queue gauges ------------------------------------------------------------------------------


class FakeQueue:
    def __init__(self) -> None:
        self.queue_depth = 0
        self.in_flight = 0


def test_track_queue_reads_live_values_at_scrape_time() -> None:
    m, q = Metrics(), FakeQueue()
    m.track_queue("a", 1, q)
    assert value(m, "dgserve_queue_depth", model="a", version="1") == 0
    q.queue_depth, q.in_flight = 7, 4
    assert value(m, "dgserve_queue_depth", model="a", version="1") == 7
    assert value(m, "dgserve_in_flight_requests", model="a", version="1") == 4


def test_a_failing_queue_callback_does_not_break_the_scrape(caplog: pytest.LogCaptureFixture) -> None:
    class Broken:
        @property
        def queue_depth(self) -> int:
            raise RuntimeError("gone")

        in_flight = 1

    m = Metrics()
    m.track_queue("a", 1, Broken())
    m.observe_request("a", 1, "predict", 200, 0.01)
    depth = value(m, "dgserve_queue_depth", model="a", version="1")
    assert depth is not None and math.isnan(depth)
    assert value(m, "dgserve_in_flight_requests", model="a", version="1") == 1
    assert value(m, "dgserve_requests_total", model="a", version="1", endpoint="predict", status="200") == 1


def test_set_queue_sets_values_and_replaces_a_callback() -> None:
    m, q = Metrics(), FakeQueue()
    q.queue_depth = 9
    m.track_queue("a", 1, q)
    m.set_queue("a", 1, depth=3, in_flight=2)
    assert value(m, "dgserve_queue_depth", model="a", version="1") == 3
    assert value(m, "dgserve_in_flight_requests", model="a", version="1") == 2


# --- model lifecycle ---------------------------------------------------------------------------


def test_model_loaded_ready_and_unloaded() -> None:
    m = Metrics()
    m.track_queue("a", 1, FakeQueue())
    m.model_loaded("a", 1, 2.5)
    assert value(m, "dgserve_model_load_seconds", model="a", version="1") == 2.5
    assert value(m, "dgserve_model_ready", model="a", version="1") == 1
    m.set_ready("a", 1, False)
    assert value(m, "dgserve_model_ready", model="a", version="1") == 0
    m.set_ready("a", 1, True)
    m.model_unloaded("a", 1)
    assert value(m, "dgserve_model_ready", model="a", version="1") == 0
    assert value(m, "dgserve_queue_depth", model="a", version="1") is None
    m.model_unloaded("never", 1)  # nothing tracked: no error


# --- connectivity ----------------------------------------------------------------------------------


def test_observe_connectivity_records_each_stage_per_image() -> None:
    m = Metrics()
    images = [
        ImageConnectivity([stage("stage1", 3, 10, [True, False, True]), stage("stage2", 10, 10, [True] * 4)]),
        ImageConnectivity([stage("stage1", 0, 10, [True, False, False]), stage("stage2", 5, 10, [True] * 4)]),
        ImageConnectivity(),  # a model without routing: nothing to record
    ]
    m.observe_connectivity("dgnet", 1, images)

    s1 = {"model": "dgnet", "version": "1", "stage": "stage1"}
    s2 = {"model": "dgnet", "version": "1", "stage": "stage2"}
    assert value(m, "dgserve_active_edge_fraction_count", **s1) == 2
    assert value(m, "dgserve_active_edge_fraction_sum", **s1) == pytest.approx(0.3)
    assert value(m, "dgserve_active_edge_fraction_bucket", **s1, le="0.0") == 1  # every edge closed
    assert value(m, "dgserve_active_edge_fraction_bucket", **s1, le="0.3") == 2
    assert value(m, "dgserve_active_edge_fraction_bucket", **s2, le="0.5") == 1
    assert value(m, "dgserve_active_edge_fraction_bucket", **s2, le="1.0") == 2
    assert value(m, "dgserve_skipped_nodes_total", **s1) == 3
    assert value(m, "dgserve_skipped_nodes_total", **s2) == 0


def test_active_edge_fraction_buckets_are_tenths() -> None:
    assert FRACTION_BUCKETS == (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


# --- GPU memory ----------------------------------------------------------------------------------------


def test_gpu_memory_has_no_samples_without_an_initialised_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    m = Metrics()
    assert type_lines(m)[GPU_MEMORY_ALLOCATED_BYTES] == "gauge"
    assert value(m, GPU_MEMORY_ALLOCATED_BYTES) is None


def test_gpu_memory_is_read_per_device_at_scrape_time(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    allocated = {0: 1024, 1: 0}
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda index: allocated[index])
    m = Metrics()
    assert value(m, GPU_MEMORY_ALLOCATED_BYTES, device="cuda:0") == 1024
    allocated[1] = 4096
    assert value(m, GPU_MEMORY_ALLOCATED_BYTES, device="cuda:1") == 4096


def test_gpu_memory_errors_do_not_break_the_scrape(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import torch

    def boom(index: int) -> int:
        raise RuntimeError("driver gone")

    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "memory_allocated", boom)
    m = Metrics()
    m.set_ready("a", 1, True)
    assert value(m, "dgserve_model_ready", model="a", version="1") == 1
    assert value(m, GPU_MEMORY_ALLOCATED_BYTES) is None


# --- isolation and exposition -------------------------------------------------------------------------------


def test_two_instances_do_not_clash() -> None:
    a, b = Metrics(), Metrics()  # would raise "Duplicated timeseries" on a shared registry
    a.observe_request("m", 1, "predict", 200, 0.01)
    assert value(a, "dgserve_requests_total", model="m", version="1", endpoint="predict", status="200") == 1
    assert value(b, "dgserve_requests_total", model="m", version="1", endpoint="predict", status="200") is None


def test_an_explicit_registry_is_used_and_the_default_one_is_not() -> None:
    from prometheus_client import REGISTRY

    registry = CollectorRegistry()
    m = Metrics(registry)
    assert m.registry is registry
    m.set_ready("a", 1, True)
    assert registry.get_sample_value("dgserve_model_ready", {"model": "a", "version": "1"}) == 1
    assert REGISTRY.get_sample_value("dgserve_model_ready", {"model": "a", "version": "1"}) is None


def test_render_gives_the_prometheus_text_format() -> None:
    body, content_type = Metrics().render()
    assert isinstance(body, bytes)
    assert content_type == CONTENT_TYPE_LATEST and content_type.startswith("text/plain")


class FakeStore:
    pending = 3


def exercise(m: Metrics) -> None:
    """Touch every method, as a server that has served a little would have."""
    obs = m.observer("a", 1)
    obs.batch_formed(2, [0.01, 0.02])
    obs.batch_done(2, 0.1, True)
    obs.rejected("queue_full")
    m.observe_request("a", 1, "predict", 200, 0.1)
    m.observe_rejection("a", 1, "invalid_image")
    m.track_queue("a", 1, FakeQueue())
    m.model_loaded("a", 1, 1.0)
    m.observe_connectivity("a", 1, [ImageConnectivity([stage("s", 1, 2, [True, False])])])
    m.observe_recording("a", 1, 0.001)
    m.track_inspections(FakeStore())


@pytest.mark.parametrize("served", [False, True], ids=["fresh", "after-traffic"])
def test_metric_names_are_exactly_the_exported_families(served: bool) -> None:
    m = Metrics()
    if served:
        exercise(m)
    exported = type_lines(m)
    # Every advertised name has HELP/TYPE lines, even before any label child exists...
    assert set(METRIC_NAMES) <= set(exported)
    # ...and nothing is exported that METRIC_NAMES (and so the dashboards' check) misses.
    assert {name for name in exported if metric_family_of(name) is None} == set()
    assert len(set(METRIC_NAMES)) == len(METRIC_NAMES)
    assert all(name.startswith("dgserve_") for name in METRIC_NAMES)


def test_every_metric_has_samples_after_traffic(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda index: 1)
    nvml = SimpleNamespace(
        nvmlInit=lambda: None, nvmlDeviceGetCount=lambda: 1, nvmlDeviceGetHandleByIndex=lambda i: i,
        nvmlDeviceGetUtilizationRates=lambda h: SimpleNamespace(gpu=50),
        nvmlDeviceGetMemoryInfo=lambda h: SimpleNamespace(used=1, total=2),
        nvmlDeviceGetTemperature=lambda h, sensor: 60, NVML_TEMPERATURE_GPU=0,
    )  # fmt: skip
    monkeypatch.setitem(sys.modules, "pynvml", nvml)  # the driver, as a GPU host has it
    m = Metrics()
    exercise(m)
    sampled = {
        metric_family_of(s.name)
        for family in text_string_to_metric_families(m.render()[0].decode())
        for s in family.samples
    }
    assert set(METRIC_NAMES) <= sampled


@pytest.mark.parametrize(
    ("series", "family"),
    [
        ("dgserve_requests_total", "dgserve_requests_total"),
        ("dgserve_requests_created", "dgserve_requests_total"),
        ("dgserve_request_duration_seconds_bucket", "dgserve_request_duration_seconds"),
        ("dgserve_compute_seconds_sum", "dgserve_compute_seconds"),
        ("dgserve_batch_size_count", "dgserve_batch_size"),
        ("dgserve_queue_wait_seconds_created", "dgserve_queue_wait_seconds"),
        ("dgserve_model_ready", "dgserve_model_ready"),
        ("dgserve_model_ready_bucket", None),
        ("dgserve_requests", None),
        ("process_cpu_seconds_total", None),
    ],
)
def test_metric_family_of(series: str, family: str | None) -> None:
    assert metric_family_of(series) == family
