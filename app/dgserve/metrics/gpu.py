"""GPU metrics, read at scrape time: what torch holds, and what the device itself reports.

* ``dgserve_gpu_memory_allocated_bytes{device}``: bytes held by tensors, from torch;
* ``dgserve_gpu_utilization_ratio{gpu}``, ``dgserve_gpu_memory_used_bytes{gpu}``,
  ``dgserve_gpu_memory_total_bytes{gpu}``, ``dgserve_gpu_temperature_celsius{gpu}``:
  from the driver, through NVML (nvidia-ml-py), for every GPU the process can see.

Both collectors always yield their families, so the HELP/TYPE lines exist on a host
without a GPU or a driver, where they simply have no samples. Nothing here starts a
CUDA context, and a failing read costs one log line, never the scrape.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from typing import Final

import torch
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

__all__ = [
    "GPU_MEMORY_ALLOCATED_BYTES", "GPU_MEMORY_TOTAL_BYTES", "GPU_MEMORY_USED_BYTES", "GPU_NAMES",
    "GPU_TEMPERATURE_CELSIUS", "GPU_UTILIZATION_RATIO", "NvmlCollector", "TorchMemoryCollector",
]  # fmt: skip

log = logging.getLogger(__name__)

GPU_MEMORY_ALLOCATED_BYTES: Final = "dgserve_gpu_memory_allocated_bytes"
GPU_UTILIZATION_RATIO: Final = "dgserve_gpu_utilization_ratio"
GPU_MEMORY_USED_BYTES: Final = "dgserve_gpu_memory_used_bytes"
GPU_MEMORY_TOTAL_BYTES: Final = "dgserve_gpu_memory_total_bytes"
GPU_TEMPERATURE_CELSIUS: Final = "dgserve_gpu_temperature_celsius"
GPU_NAMES: Final = (
    GPU_MEMORY_ALLOCATED_BYTES, GPU_UTILIZATION_RATIO, GPU_MEMORY_USED_BYTES, GPU_MEMORY_TOTAL_BYTES,
    GPU_TEMPERATURE_CELSIUS,
)  # fmt: skip


class TorchMemoryCollector(Collector):
    """``dgserve_gpu_memory_allocated_bytes{device}``, from torch."""

    def describe(self) -> Iterable[Metric]:
        return [self._family()]

    def collect(self) -> Iterable[Metric]:
        family = self._family()
        try:
            # is_initialized, not is_available: a scrape must never be the thing that
            # creates a CUDA context (hundreds of MB, and unsafe before a fork).
            if torch.cuda.is_initialized():
                for index in range(torch.cuda.device_count()):
                    family.add_metric([f"cuda:{index}"], float(torch.cuda.memory_allocated(index)))
        except Exception:
            log.exception("metrics: reading GPU memory failed")
        return [family]

    @staticmethod
    def _family() -> GaugeMetricFamily:
        return GaugeMetricFamily(
            GPU_MEMORY_ALLOCATED_BYTES,
            "Bytes of GPU memory held by tensors (torch.cuda.memory_allocated), per device.",
            labels=["device"],
        )


class NvmlCollector(Collector):
    """Utilisation, memory and temperature per GPU, from the driver (NVML).

    NVML is initialised on the first scrape, not at import or start-up; where there is
    no driver it is tried once, and the families stay empty.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._state = "new"  # new | ready | absent

    def describe(self) -> Iterable[Metric]:
        return list(self._families())

    def collect(self) -> Iterable[Metric]:
        util, used, total, temp = families = self._families()
        if not self._ready():
            return list(families)
        try:
            import pynvml

            for index in range(pynvml.nvmlDeviceGetCount()):
                handle = pynvml.nvmlDeviceGetHandleByIndex(index)
                memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
                label = [str(index)]
                util.add_metric(label, pynvml.nvmlDeviceGetUtilizationRates(handle).gpu / 100.0)
                used.add_metric(label, float(memory.used))
                total.add_metric(label, float(memory.total))
                temp.add_metric(label, float(pynvml.nvmlDeviceGetTemperature(handle, pynvml.NVML_TEMPERATURE_GPU)))
        except Exception:
            log.exception("metrics: reading NVML failed")
            return list(self._families())  # all or nothing: no half-filled scrape
        return list(families)

    def _ready(self) -> bool:
        with self._lock:
            if self._state == "new":
                try:
                    import pynvml

                    pynvml.nvmlInit()
                    self._state = "ready"
                except Exception as exc:  # no driver, no library: a CPU host
                    log.info("metrics: no GPU metrics from NVML (%s)", exc)
                    self._state = "absent"
            return self._state == "ready"

    @staticmethod
    def _families() -> tuple[GaugeMetricFamily, ...]:
        return (
            GaugeMetricFamily(GPU_UTILIZATION_RATIO, "Share of the last sample period the GPU was busy (NVML).",
                              labels=["gpu"]),
            GaugeMetricFamily(GPU_MEMORY_USED_BYTES, "GPU memory in use by every process (NVML).", labels=["gpu"]),
            GaugeMetricFamily(GPU_MEMORY_TOTAL_BYTES, "GPU memory in all (NVML).", labels=["gpu"]),
            GaugeMetricFamily(GPU_TEMPERATURE_CELSIUS, "GPU core temperature (NVML).", labels=["gpu"]),
        )  # fmt: skip
