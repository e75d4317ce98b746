"""A real Prometheus scrapes a real ``osprey serve`` under a burst; PromQL checks the numbers.

Also runs every PromQL expression of the shipped Grafana dashboard against that Prometheus
(it must parse and evaluate) and checks that every metric it names is one Osprey exports.
"""

from __future__ import annotations

import json
import threading
import urllib.request

import httpx
import pytest

from monitoring.gpu import GPU_METRICS

from tests.models import handler_archive
from tests.prometheus_helpers import (DASHBOARD, PrometheusProcess, dashboard_exprs, metric_names_in,
                                 scraped_sample_names)

# Answers after a short sleep per batch so that a burst queues up and batches form; reports
# handler metrics through context.metrics the way TorchServe handlers do.
SLOW_HANDLER = '''
import time
from handlers.base import BaseHandler

class Slow(BaseHandler):
    def initialize(self, context):
        self.context = context
        self.initialized = True

    def preprocess(self, data):
        return [row.get("body") for row in data]

    def inference(self, rows):
        time.sleep(0.05)
        return rows

    def postprocess(self, rows):
        m = self.context.metrics
        m.add_counter("SlowBatches", 1)
        m.add_time("SlowInferenceMs", 50.0)
        m.add_percent("SlowFill", 100.0 * len(rows) / 8)
        m.add_size("SlowPayload", 0.5)
        m.add_metric("SlowRows", len(rows), "count")
        return [{"n": len(rows)} for _ in rows]
'''

BURST = 96
TIMEOUT = 30.0


@pytest.fixture
def scraped(osprey, store, tmp_path):
    handler_archive(store, "slow", SLOW_HANDLER,
                    config={"batchSize": 8, "maxBatchDelay": 50, "minWorkers": 1, "maxWorkers": 1,
                            "deviceType": "cpu"})
    server = osprey(models=["slow=slow.mar"], store=store, extra_args=["--no-grpc"])
    prom = PrometheusProcess(tmp_path / "prom", [server.metrics.split("//", 1)[1]])
    try:
        yield server, prom
    finally:
        prom.stop()


def _burst(url: str, n: int) -> list[int]:
    """``n`` concurrent POSTs from ``n`` threads released together; their status codes."""
    codes: list[int] = []
    gate = threading.Barrier(n)
    lock = threading.Lock()

    def one(i: int) -> None:
        with httpx.Client(timeout=TIMEOUT) as client:  # built before the barrier: ~40 ms each here
            gate.wait()
            r = client.post(url, json={"i": i})
        with lock:
            codes.append(r.status_code)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return codes


def test_promql_sees_burst_counts_latency_and_batching(scraped):
    server, prom = scraped
    prom.wait_for('up{job="osprey"}', lambda v: v == 1)
    codes = _burst(f"{server.inference}/predictions/slow", BURST)
    assert codes == [200] * BURST
    # an unknown model: counted with empty model/version labels, not under its name
    assert httpx.post(f"{server.inference}/predictions/nosuchmodel", json={}).status_code == 404

    sent = prom.wait_for('sum(osprey_requests_total{model="slow"})', lambda v: v >= BURST)
    assert sent == BURST
    assert prom.scalar('sum(osprey_requests_total{model="slow", code="200", protocol="rest"})') == BURST
    assert prom.scalar('sum(ts_inference_requests_total{model_name="slow", model_version="default"})') == BURST
    assert prom.wait_for('sum(osprey_requests_total{model="", code="404"})', lambda v: v >= 1) == 1
    assert prom.query('osprey_requests_total{model="nosuchmodel"}') == []

    p99 = prom.scalar('histogram_quantile(0.99, sum by (le) (osprey_request_duration_seconds_bucket{model="slow"}))')
    assert p99 is not None and 0 < p99 < TIMEOUT
    assert prom.scalar('sum(osprey_request_duration_seconds_count{model="slow"})') == BURST
    # a queue formed behind the 50 ms batches, and the handler's own stages were recorded
    assert prom.scalar('sum(osprey_queue_wait_seconds_count{model="slow"})') == BURST
    assert prom.scalar('histogram_quantile(0.99, sum by (le) (osprey_queue_wait_seconds_bucket{model="slow"}))') > 0.01
    inference_p50 = prom.scalar('histogram_quantile(0.5, sum by (le) '
                                '(osprey_stage_duration_seconds_bucket{model="slow", stage="inference"}))')
    assert 0.04 < inference_p50 < 1.0
    for stage in ("preprocess", "postprocess", "handle"):
        assert prom.scalar(f'sum(osprey_stage_duration_seconds_count{{model="slow", stage="{stage}"}})') > 0

    # batching happened: fewer batches than requests, every request in exactly one batch,
    # and the larger batches carried several requests (the 90th percentile: on a busy machine the
    # burst can trickle in, so many batches of one may sit beside the full ones)
    batches = prom.scalar('sum(osprey_batch_size_count{model="slow"})')
    assert batches < BURST / 2
    assert prom.scalar('sum(osprey_batch_size_sum{model="slow"})') == BURST
    assert prom.scalar('histogram_quantile(0.9, sum by (le) (osprey_batch_size_bucket{model="slow"}))') > 2
    assert prom.scalar('histogram_quantile(0.99, sum by (le) (osprey_batch_size_bucket{model="slow"}))') <= 8

    # TorchServe's latency counters: microseconds, consistent with the seconds histogram
    ts_total = prom.scalar('sum(ts_inference_latency_microseconds{model_name="slow"})')
    seconds = prom.scalar('sum(osprey_request_duration_seconds_sum{model="slow"})')
    assert ts_total == pytest.approx(seconds * 1e6, rel=1e-6)
    assert prom.scalar('sum(ts_queue_latency_microseconds{model_name="slow"})') > 0

    # scrape-time gauges and the info metric
    assert prom.scalar('osprey_instances_ready{model="slow", version="1.0"}') == 1
    assert prom.scalar('osprey_queue_capacity{model="slow"}') == 100
    assert prom.scalar('osprey_batch_size_limit{model="slow"}') == 8
    assert prom.scalar('osprey_model_load_seconds{model="slow"}') > 0
    info = prom.query('osprey_model_info{model="slow"}')
    assert len(info) == 1 and info[0]["metric"]["device"] == "cpu"
    assert info[0]["metric"]["handler"] == "slow_handler.py"
    assert prom.scalar('process_resident_memory_bytes{job="osprey"}') > 10e6

    # handler metrics under their TorchServe names and labels
    assert prom.scalar('SlowBatches{ModelName="slow", Level="Model"}') == batches
    assert prom.scalar('SlowRows{ModelName="slow"}') == BURST
    assert prom.scalar('SlowInferenceMs{ModelName="slow"}') == 50.0
    assert 0 < prom.scalar('SlowFill{ModelName="slow"}') <= 100
    assert prom.scalar('PredictionTime{ModelName="slow"}') > 40

    # every dashboard query parses and runs here, and names only metrics Osprey exports
    with urllib.request.urlopen(f"{server.metrics}/metrics") as r:
        exported = scraped_sample_names(r.read().decode())
    exported |= set(GPU_METRICS) | {"up"}  # GPU ones only appear where NVML finds a GPU
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = dashboard_exprs(dashboard)
    assert len(exprs) >= 20
    unknown = {}
    for title, expr in exprs:
        concrete = (expr.replace("$__rate_interval", "30s").replace('"$model"', '"slow"')
                    .replace('"$version"', '".*"'))
        body = prom.api("query", query=concrete)
        assert body["status"] == "success", f"panel {title!r}: {expr}: {body.get('error')}"
        names = metric_names_in(expr)
        assert names, f"panel {title!r} reads no metric: {expr}"
        if names - exported:
            unknown[title] = sorted(names - exported)
    assert not unknown, f"dashboard panels name metrics Osprey does not export: {unknown}"
    # the model selector's query finds the served model
    assert [r["metric"]["model"] for r in prom.query('osprey_model_info{model=~"slow"}')] == ["slow"]
