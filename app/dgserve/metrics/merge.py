"""``/metrics`` of a server that runs as several processes on one port (``DGSERVE_SERVER_PROCESSES``).

Each process keeps its own registry, exactly as a single process does. A scrape lands
on whichever process the kernel hands the connection to; that process asks each
sibling for its exposition (``api/siblings.py``) and answers with ``merge``: counters,
histograms and most gauges are summed, so the figures are the server's, not one
process's.

Why not prometheus_client's multiprocess mode: it exports only values written to its
memory-mapped files, so every gauge read at scrape time (a batcher's queue depth and
in-flight count, the store's pending records, torch's and NVML's GPU figures) would
have to become a write on the hot path, and custom collectors would be lost. Asking
the live processes keeps every metric as it is, at the cost of one local round trip
per sibling per scrape. A sibling that does not answer (restarting) is left out, and
``dgserve_server_processes`` says how many answered.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Final

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from dgserve.metrics import (
    GPU_MEMORY_TOTAL_BYTES,
    GPU_MEMORY_USED_BYTES,
    GPU_TEMPERATURE_CELSIUS,
    GPU_UTILIZATION_RATIO,
    MODEL_LOAD_SECONDS,
    MODEL_READY,
)

__all__ = ["SERVER_PROCESSES", "merge"]

SERVER_PROCESSES: Final = "dgserve_server_processes"

# Gauges that are not a per-process quantity to add up.
_MAX: Final = frozenset(
    {
        MODEL_LOAD_SECONDS,  # the slowest process's load
        # NVML reads the device, which every process shares: the same figure from each.
        GPU_UTILIZATION_RATIO, GPU_MEMORY_USED_BYTES, GPU_MEMORY_TOTAL_BYTES, GPU_TEMPERATURE_CELSIUS,
    }
)  # fmt: skip
_MIN: Final = frozenset({MODEL_READY})  # 1 only when every process serves the version


def merge(expositions: Sequence[bytes]) -> bytes:
    """One exposition from several processes' (Prometheus text format), plus ``dgserve_server_processes``."""
    families: dict[str, Metric] = {}
    values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    for text in expositions:
        for family in text_string_to_metric_families(text.decode()):
            merged = families.setdefault(family.name, Metric(family.name, family.documentation, family.type))
            combine = _combiner(merged)
            samples = values.setdefault(family.name, {})
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                old = samples.get(key)
                value = sample.value
                if old is not None:
                    value = min(old, value) if sample.name.endswith("_created") else combine(old, value)
                samples[key] = value
    for name, merged in families.items():
        for (sample_name, labels), value in values[name].items():
            merged.add_sample(sample_name, dict(labels), value)
    count = GaugeMetricFamily(SERVER_PROCESSES, "Server processes whose metrics this scrape merged.")
    count.add_metric([], len(expositions))
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Fixed([*families.values(), count]))
    return generate_latest(registry)


def _combiner(family: Metric) -> Callable[[float, float], float]:
    if family.type == "gauge" and family.name in _MAX:
        return max
    if family.type == "gauge" and family.name in _MIN:
        return min
    return lambda a, b: a + b


class _Fixed(Collector):
    def __init__(self, families: Iterable[Metric]) -> None:
        self._families = list(families)

    def collect(self) -> Iterable[Metric]:
        return self._families
