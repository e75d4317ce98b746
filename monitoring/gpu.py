"""Per-GPU memory and utilization, read through NVML at scrape time.

``nvidia-ml-py`` (module ``pynvml``) is imported lazily; without it, without a driver or
without a GPU the collector reports nothing and costs nothing.
"""

from __future__ import annotations

import logging

from prometheus_client.core import GaugeMetricFamily

__all__ = ["GpuCollector", "GPU_METRICS"]

log = logging.getLogger("osprey.metrics.gpu")

GPU_METRICS = ("osprey_gpu_memory_used_bytes", "osprey_gpu_memory_total_bytes", "osprey_gpu_utilization_ratio")


class GpuCollector:
    def __init__(self) -> None:
        self.nvml = None
        self.count = 0
        self._v2: bool | None = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self.count = pynvml.nvmlDeviceGetCount()
            self.nvml = pynvml
        except Exception as exc:  # no package, no driver, no GPU: nothing to report
            log.debug("GPU metrics off: %s", exc)

    @property
    def active(self) -> bool:
        return self.nvml is not None and self.count > 0

    def _memory(self, handle):
        """Memory info; NVML's v2 call, where the driver has it, leaves out reserved memory
        (as nvidia-smi does)."""
        v2 = getattr(self.nvml, "nvmlMemory_v2", None)
        if v2 is not None and self._v2 is not False:
            try:
                mem = self.nvml.nvmlDeviceGetMemoryInfo(handle, version=v2)
                self._v2 = True
                return mem
            except Exception:
                self._v2 = False
        return self.nvml.nvmlDeviceGetMemoryInfo(handle)

    def readings(self) -> list[tuple[int, float, float, float]]:
        """``(index, memory used bytes, memory total bytes, utilization percent)`` per GPU."""
        if not self.active:
            return []
        nv = self.nvml
        out = []
        for i in range(self.count):
            try:
                handle = nv.nvmlDeviceGetHandleByIndex(i)
                mem = self._memory(handle)
                rates = nv.nvmlDeviceGetUtilizationRates(handle)
            except Exception as exc:  # a GPU fell off the bus: report the others
                log.warning("GPU %d: NVML query failed: %s", i, exc)
                continue
            out.append((i, float(mem.used), float(mem.total), float(rates.gpu)))
        return out

    def collect(self):
        if not self.active:
            return []
        used = GaugeMetricFamily("osprey_gpu_memory_used_bytes", "GPU memory in use", labels=["gpu"])
        total = GaugeMetricFamily("osprey_gpu_memory_total_bytes", "GPU memory in all", labels=["gpu"])
        util = GaugeMetricFamily("osprey_gpu_utilization_ratio",
                                 "Fraction of the last sample period the GPU was busy (0-1)", labels=["gpu"])
        for i, mem_used, mem_total, busy in self.readings():
            used.add_metric([str(i)], mem_used)
            total.add_metric([str(i)], mem_total)
            util.add_metric([str(i)], busy / 100.0)
        return [used, total, util]
