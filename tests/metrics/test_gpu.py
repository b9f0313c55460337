"""GPU metrics from NVML: per-GPU utilisation, memory and temperature, and nothing at all on a CPU host."""

from __future__ import annotations

import sys
from types import SimpleNamespace
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from dgserve.metrics import Metrics
from dgserve.metrics.gpu import GPU_NAMES, NvmlCollector


def fake_nvml(gpus: int, fail_init: bool = False) -> SimpleNamespace:
    """A stand-in for the driver's library, as pynvml exposes it."""

    def init() -> None:
        if fail_init:
            raise RuntimeError("NVML Shared Library Not Found")

    return SimpleNamespace(
        nvmlInit=init,
        nvmlDeviceGetCount=lambda: gpus,
        nvmlDeviceGetHandleByIndex=lambda i: i,
        nvmlDeviceGetUtilizationRates=lambda h: SimpleNamespace(gpu=40 + h),
        nvmlDeviceGetMemoryInfo=lambda h: SimpleNamespace(used=(h + 1) * 2**30, total=80 * 2**30),
        nvmlDeviceGetTemperature=lambda h, sensor: 50 + h,
        NVML_TEMPERATURE_GPU=0,
    )


def samples(metrics: Metrics) -> dict[tuple[str, str], float]:
    out = {}
    for family in text_string_to_metric_families(metrics.render()[0].decode()):
        for s in family.samples:
            if "gpu" in s.labels:
                out[(s.name, s.labels["gpu"])] = s.value
    return out


def test_every_gpu_reports_utilisation_memory_and_temperature(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml(2))
    got = samples(Metrics())
    assert got[("dgserve_gpu_utilization_ratio", "0")] == pytest.approx(0.40)
    assert got[("dgserve_gpu_utilization_ratio", "1")] == pytest.approx(0.41)
    assert got[("dgserve_gpu_memory_used_bytes", "1")] == 2 * 2**30
    assert got[("dgserve_gpu_memory_total_bytes", "0")] == 80 * 2**30
    assert got[("dgserve_gpu_temperature_celsius", "1")] == 51


def test_without_a_driver_the_families_exist_empty_and_init_is_tried_once(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    nvml: Any = fake_nvml(1, fail_init=True)
    original = nvml.nvmlInit
    nvml.nvmlInit = lambda: (calls.append(1), original())
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    metrics = Metrics()
    for _ in range(3):
        text = metrics.render()[0].decode()
    assert calls == [1]
    assert all(f"# TYPE {name} gauge" in text for name in GPU_NAMES) and samples(metrics) == {}


def test_a_failing_read_empties_the_scrape_but_never_breaks_it(monkeypatch: pytest.MonkeyPatch) -> None:
    nvml: Any = fake_nvml(2)
    nvml.nvmlDeviceGetTemperature = lambda h, sensor: (_ for _ in ()).throw(RuntimeError("GPU fell off the bus"))
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    assert [list(f.samples) for f in NvmlCollector().collect()] == [[], [], [], []]
