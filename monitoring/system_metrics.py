"""TorchServe's system metrics, read as TorchServe reads them (``ts/metrics/system_metrics.py``:
psutil for CPU, memory and the root file system; NVML for GPUs), all with ``Level="Host"``.

:func:`read_system_metrics` returns ``[(name, value, labels)]``; the GPU ones carry a
``DeviceId`` label (the name TorchServe's metrics configuration gives that dimension).
Cheap enough for a scrape (a few syscalls); ``CPUUtilization`` is the system's CPU use since
the previous reading (psutil's ``cpu_percent()``), as TorchServe reports it.
"""

from __future__ import annotations

from typing import Any

import psutil

__all__ = ["read_system_metrics", "SYSTEM_METRICS"]

SYSTEM_METRICS = ("CPUUtilization", "MemoryUsed", "MemoryAvailable", "MemoryUtilization", "DiskUsage",
                  "DiskUtilization", "DiskAvailable", "GPUMemoryUtilization", "GPUMemoryUsed", "GPUUtilization")
_MB, _GB = 1024.0 ** 2, 1024.0 ** 3

psutil.cpu_percent()  # the first reading is since this one


def read_system_metrics(gpu: Any = None) -> list[tuple[str, float, dict[str, str]]]:
    host = {"Level": "Host"}
    vm = psutil.virtual_memory()
    disk = psutil.disk_usage("/")
    out = [("CPUUtilization", float(psutil.cpu_percent()), host),
           ("MemoryUsed", vm.used / _MB, host),
           ("MemoryAvailable", vm.available / _MB, host),
           ("MemoryUtilization", float(vm.percent), host),
           ("DiskUsage", disk.used / _GB, host),
           ("DiskUtilization", float(disk.percent), host),
           ("DiskAvailable", disk.free / _GB, host)]
    if gpu is not None and gpu.active:
        for index, used, total, util in gpu.readings():
            labels = {"Level": "Host", "DeviceId": str(index)}
            out.append(("GPUMemoryUtilization", round(100.0 * used / total, 1) if total else 0.0, labels))
            out.append(("GPUMemoryUsed", used / _MB, labels))
            out.append(("GPUUtilization", float(util), labels))
    return out
