"""TorchServe's metrics configuration: the default set, a user's file, bad files and settings."""

from __future__ import annotations

import pytest

from monitoring.metrics import ServingMetrics
from monitoring.ts_metrics_config import load_metrics_config
from server.settings import load_settings


def test_default_is_torchserves_set():
    c = load_metrics_config()
    assert set(c.ts_metrics) >= {"Requests2XX", "Requests4XX", "Requests5XX", "ts_inference_requests_total",
                                 "QueueTime", "WorkerThreadTime", "WorkerLoadTime", "CPUUtilization",
                                 "MemoryUsed", "DiskAvailable", "GPUUtilization"}
    assert c.frontend("Requests2XX").kind == "counter" and c.frontend("QueueTime").unit == "Milliseconds"
    assert c.model("HandlerTime").dimensions == ("ModelName", "Level", "Hostname")  # Hostname added


def test_bad_files_are_refused_naming_the_problem(tmp_path):
    bad = tmp_path / "m.yaml"
    for text, words in (("ts_metrics: [1]", "ts_metrics must map"), ("model_metrics:\n  timer: []", "timer"),
                        ("model_metrics:\n  gauge:\n    - unit: ms", "needs a name"), (": :", "not valid YAML")):
        bad.write_text(text)
        with pytest.raises(ValueError, match=words):
            load_metrics_config(bad)
    with pytest.raises(ValueError, match="metrics_config"):
        load_settings(env={"OSPREY_METRICS_CONFIG": str(tmp_path / "missing.yaml")})
    with pytest.raises(ValueError, match="metrics_mode"):
        load_settings(env={"OSPREY_METRICS_MODE": "statsd"})


def test_log_locations_from_torchserves_environment():
    s = load_settings(env={"LOG_LOCATION": "/tmp/a", "METRICS_LOCATION": "/tmp/b"})
    assert (s.log_location, s.metrics_location) == ("/tmp/a", "/tmp/b")
    assert load_settings(env={"LOG_LOCATION": "/tmp/a", "OSPREY_LOG_LOCATION": "/tmp/c"}).log_location == "/tmp/c"


def test_declared_handler_metrics_take_the_declared_type_and_undeclared_ones_are_dropped(tmp_path):
    cfg = tmp_path / "m.yaml"
    cfg.write_text("model_metrics:\n  histogram:\n    - name: Size\n      unit: MB\n"
                   "      dimensions: [ModelName, Level, Kind]\n")
    m = ServingMetrics(hostname="h", ts_config=load_metrics_config(cfg))
    m.handler_metric("Size", 0.5, "B", "gauge", {"Kind": "k", "ModelName": "m"})
    m.handler_metric("Other", 1, "count", "counter", {"ModelName": "m"})
    text = m.render().decode()
    assert "# TYPE Size histogram" in text and "Torchserve prometheus histogram metric with unit: MB" in text
    assert 'Size_count{ModelName="m",Level="Model",Kind="k",Hostname="h"} 1.0' in text
    assert "Other" not in text and "Requests2XX" not in text  # the file declares no frontend metrics
    auto = ServingMetrics(hostname="h")  # no metrics_config: every handler metric is exported
    auto.handler_metric("Other", 1, "count", "counter", {"ModelName": "m"})
    assert 'Other{ModelName="m",Level="Model",Hostname="h"} 1.0' in auto.render().decode()
