"""A real Prometheus scrapes a real ``osprey serve`` under a burst; PromQL checks the numbers.

Also runs every PromQL expression of the shipped Grafana dashboard against that Prometheus
(it must parse and evaluate) and checks that every metric it names is one Osprey exports.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.request

import httpx
import pytest

from monitoring.gpu import GPU_METRICS
from server.retraining.jobs import JobRecord, JobState
from server.retraining.queue import jobs_dir_for

from tests.models import handler_archive
from tests.prometheus_helpers import (DASHBOARD, PrometheusProcess, dashboard_exprs, metric_names_in,
                                 scraped_sample_names)

# Answers after a short sleep per batch so that a burst queues up and batches form; reports
# handler metrics through context.metrics the way TorchServe handlers do. Monitored: the
# request's "i" is its input feature (monitor_features), its answer two class probabilities
# (odd i: class 1 likely), so drift windows close and labels give live quality.
SLOW_HANDLER = '''
import time

import numpy as np
import torch
from handlers.base import BaseHandler

class Slow(BaseHandler):
    monitor_task = "classification"

    def initialize(self, context):
        self.context = context
        self.initialized = True

    def preprocess(self, data):
        return [row.get("body") for row in data]

    def inference(self, rows):
        time.sleep(0.05)
        return torch.tensor([[0.2, 0.8] if r["i"] % 2 else [0.7, 0.3] for r in rows])

    def postprocess(self, probs):
        m = self.context.metrics
        m.add_counter("SlowBatches", 1)
        m.add_time("SlowInferenceMs", 50.0)
        m.add_percent("SlowFill", 100.0 * len(probs) / 8)
        m.add_size("SlowPayload", 0.5)
        m.add_metric("SlowRows", len(probs), "count")
        return [{"n": len(probs)} for _ in range(len(probs))]

    def monitor_features(self, inputs, outputs):
        return {"i": np.array([r["i"] for r in inputs], dtype=np.float32)}
'''

# small windows: the drift and quality families appear after the burst and a few labels
MONITORING = {"window": 20, "baseline_requests": 40, "min_labels": 10, "quality_window": 10}
LABELS = 20

RETRAINING_METRICS = {"osprey_retraining_jobs_total", "osprey_retraining_jobs",
                      "osprey_retraining_job_duration_seconds_sum", "osprey_retraining_job_duration_seconds_count",
                      "osprey_retraining_last_finished_timestamp_seconds"}
# a shadow's results appear once a version is some model's shadow (tests/e2e/test_traffic.py)
SHADOW_METRICS = {"osprey_shadow_requests_total"}

MONITORING_METRICS = {"osprey_drift_detected", "osprey_drift_episodes_total", "osprey_drift_score",
                      "osprey_monitored_requests_total", "osprey_feedback_total", "osprey_quality",
                      "osprey_quality_degraded"}

BURST = 96
TIMEOUT = 30.0


@pytest.fixture
def scraped(osprey, store, tmp_path):
    handler_archive(store, "slow", SLOW_HANDLER,
                    config={"batchSize": 8, "maxBatchDelay": 50, "minWorkers": 1, "maxWorkers": 1,
                            "deviceType": "cpu", "monitoring": MONITORING})
    # a finished retraining job in the embedded queue's records (a server reads those it finds
    # on its model store): the job families are served, as after any job
    jobs = jobs_dir_for(store)
    jobs.mkdir(parents=True, exist_ok=True)
    record = JobRecord(id="0123456789abcdef", model="slow", version="1.0", trigger="manual", episode="manual:test",
                       state=JobState.FAILED, started=time.time() - 30, finished=time.time() - 20,
                       message="a job that ran before this server started")
    (jobs / f"{record.id}.json").write_text(record.to_json())
    server = osprey(models=["slow=slow.mar"], store=store, extra_args=["--no-grpc"])
    prom = PrometheusProcess(tmp_path / "prom", [server.metrics.split("//", 1)[1]])
    try:
        yield server, prom
    finally:
        prom.stop()


def _burst(url: str, n: int) -> list[tuple[int, str, int]]:
    """``n`` concurrent POSTs ``{"i": i}`` from ``n`` threads released together; their
    (status code, x-request-id, i)."""
    answers: list[tuple[int, str, int]] = []
    gate = threading.Barrier(n)
    lock = threading.Lock()

    def one(i: int) -> None:
        with httpx.Client(timeout=TIMEOUT) as client:  # built before the barrier: ~40 ms each here
            gate.wait()
            r = client.post(url, json={"i": i})
        with lock:
            answers.append((r.status_code, r.headers.get("x-request-id", ""), i))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return answers


def _monitored(server, answers) -> None:
    """Wait until the monitor analysed the burst (a window closed), then label LABELS answers
    (the class the request's i makes likely): the drift and quality families are then served."""
    deadline = time.monotonic() + 30
    while True:
        s = httpx.get(f"{server.inference}/monitoring/slow", timeout=10).json()
        if s["requests"] >= BURST and s["windows"] >= 1:
            break
        assert time.monotonic() < deadline, s
        time.sleep(0.05)
    labels = [{"request_id": rid, "label": i % 2} for _, rid, i in answers[:LABELS]]
    r = httpx.post(f"{server.inference}/feedback/slow", json=labels, timeout=10)
    assert r.json() == {"accepted": LABELS, "unmatched": 0, "invalid": 0}, r.text


def test_promql_sees_burst_counts_latency_and_batching(scraped):
    server, prom = scraped
    prom.wait_for('up{job="osprey"}', lambda v: v == 1)
    answers = _burst(f"{server.inference}/predictions/slow", BURST)
    assert [code for code, _, _ in answers] == [200] * BURST
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

    # every dashboard query parses and runs here, and names only metrics Osprey exports (the
    # drift and quality row's once the version was monitored, a window closed and labels arrived)
    _monitored(server, answers)
    deadline = time.monotonic() + 20
    while True:  # the job families: from the records, read at the triggers' next poll (1 s)
        with urllib.request.urlopen(f"{server.metrics}/metrics") as r:
            exported = scraped_sample_names(r.read().decode())
        if RETRAINING_METRICS <= exported or time.monotonic() > deadline:
            break
        time.sleep(0.25)
    assert RETRAINING_METRICS <= exported, sorted(RETRAINING_METRICS - exported)
    assert {"osprey_model_default_version_info", "osprey_traffic_share", "osprey_model_rollbacks_total"} <= exported
    exported |= set(GPU_METRICS) | SHADOW_METRICS | {"up"}  # GPU ones only appear where NVML finds a GPU
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
    # the drift and quality panels find the model's series
    for title, expr in exprs:
        if metric_names_in(expr) & (MONITORING_METRICS | RETRAINING_METRICS):
            concrete = (expr.replace("$__rate_interval", "30s").replace('"$model"', '"slow"')
                        .replace('"$version"', '".*"'))
            deadline = time.monotonic() + 20
            while not prom.query(concrete):
                assert time.monotonic() < deadline, f"panel {title!r} finds no series: {concrete}"
                time.sleep(0.25)
    # the model selector's query finds the served model
    assert [r["metric"]["model"] for r in prom.query('osprey_model_info{model=~"slow"}')] == ["slow"]
