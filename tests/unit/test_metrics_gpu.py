"""Per-GPU metrics through NVML: present and sane on a CUDA host, absent (not failing) without."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from monitoring.gpu import GPU_METRICS, GpuCollector
from monitoring.metrics import ServingMetrics


def test_without_nvml_the_server_exports_no_gpu_series():
    if GpuCollector().active:
        pytest.skip("a GPU is present")
    text = ServingMetrics(hostname="h").render().decode()
    assert not any(name in text for name in GPU_METRICS)


def test_gpu_memory_and_utilization_per_device():
    gpu = GpuCollector()
    if not gpu.active:
        pytest.skip("no NVIDIA GPU / NVML on this host")
    fams = {f.name: f for f in text_string_to_metric_families(ServingMetrics(hostname="h").render().decode())}
    for name in GPU_METRICS:
        assert len(fams[name].samples) == gpu.count
    for used, total, util in zip(fams["osprey_gpu_memory_used_bytes"].samples,
                                 fams["osprey_gpu_memory_total_bytes"].samples,
                                 fams["osprey_gpu_utilization_ratio"].samples):
        assert 0 <= used.value <= total.value and total.value > 1e9
        assert 0.0 <= util.value <= 1.0
