"""Several server processes' metrics merged into one scrape (``metrics/merge.py``)."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from dgserve.metrics import GPU_MEMORY_ALLOCATED_BYTES, GPU_TEMPERATURE_CELSIUS, MODEL_LOAD_SECONDS, MODEL_READY, Metrics
from dgserve.metrics.merge import SERVER_PROCESSES, merge


def _process(requests: int, waits: list[float], depth: float, ready: float, load_s: float, temp: float) -> bytes:
    registry = CollectorRegistry()
    Counter("dgserve_requests", "r", ["model"], registry=registry).labels("m").inc(requests)
    histogram = Histogram("dgserve_queue_wait_seconds", "w", ["model"], buckets=(0.01, 0.1), registry=registry)
    for wait in waits:
        histogram.labels("m").observe(wait)
    Gauge("dgserve_queue_depth", "d", ["model"], registry=registry).labels("m").set(depth)
    Gauge(MODEL_READY, "ready", ["model"], registry=registry).labels("m").set(ready)
    Gauge(MODEL_LOAD_SECONDS, "load", ["model"], registry=registry).labels("m").set(load_s)
    Gauge(GPU_TEMPERATURE_CELSIUS, "t", ["gpu"], registry=registry).labels("0").set(temp)
    Gauge(GPU_MEMORY_ALLOCATED_BYTES, "a", ["device"], registry=registry).labels("cuda:0").set(100)
    return generate_latest(registry)


def _values(text: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text.decode())
        for s in family.samples
    }


def test_counters_and_histograms_add_up_and_gauges_merge_by_their_meaning() -> None:
    a = _process(3, [0.005, 0.05], depth=2, ready=1, load_s=1.5, temp=60)
    b = _process(4, [0.5], depth=5, ready=0, load_s=2.5, temp=61)
    merged = _values(merge([a, b]))
    m = (("model", "m"),)
    assert merged[("dgserve_requests_total", m)] == 7
    assert merged[("dgserve_queue_wait_seconds_bucket", (("le", "0.01"), *m))] == 1
    assert merged[("dgserve_queue_wait_seconds_bucket", (("le", "0.1"), *m))] == 2
    assert merged[("dgserve_queue_wait_seconds_bucket", (("le", "+Inf"), *m))] == 3
    assert merged[("dgserve_queue_wait_seconds_count", m)] == 3
    assert merged[("dgserve_queue_wait_seconds_sum", m)] == pytest.approx(0.555)
    assert merged[("dgserve_queue_depth", m)] == 7  # waiting in either process
    assert merged[(MODEL_READY, m)] == 0  # one process does not serve it yet
    assert merged[(MODEL_LOAD_SECONDS, m)] == 2.5  # the slowest load
    assert merged[(GPU_TEMPERATURE_CELSIUS, (("gpu", "0"),))] == 61  # one device, read by both
    assert merged[(GPU_MEMORY_ALLOCATED_BYTES, (("device", "cuda:0"),))] == 200  # each process's tensors
    assert merged[(SERVER_PROCESSES, ())] == 2
    created = [v for (name, _), v in merged.items() if name == "dgserve_requests_created"]
    first = min(v for (name, _), v in _values(a).items() | _values(b).items() if name == "dgserve_requests_created")
    assert created == [first]


def test_a_real_apps_metrics_survive_the_merge() -> None:
    """Every family of a real ``Metrics`` comes through, with its type and help."""
    metrics = Metrics()
    metrics.observe_request("m", 1, "/v1/models/{name}/classify", 200, 0.01)
    metrics.model_loaded("m", 1, 0.5)
    text = metrics.render()[0]
    merged = merge([text, text])
    before = {f.name: (f.type, f.documentation) for f in text_string_to_metric_families(text.decode())}
    after = {f.name: (f.type, f.documentation) for f in text_string_to_metric_families(merged.decode())}
    assert after == {**before, SERVER_PROCESSES: ("gauge", "Server processes whose metrics this scrape merged.")}
    values = _values(merged)
    labels = (("endpoint", "/v1/models/{name}/classify"), ("model", "m"), ("status", "200"), ("version", "1"))
    assert values[("dgserve_requests_total", labels)] == 2
    assert values[(MODEL_READY, (("model", "m"), ("version", "1")))] == 1
