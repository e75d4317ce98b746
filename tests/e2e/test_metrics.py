"""ServingMetrics on its own: exposition is valid Prometheus text, labels stay bounded,
buckets carry the latency objectives, TorchServe names and handler metrics come out right."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from handlers.metrics import HandlerMetrics, MetricTypes
from monitoring.metrics import DEFAULT_BUCKETS, ServingMetrics, metric_buckets
from server.core.errors import ErrorKind, OspreyError
from server.core.model_config import ModelConfig
from server.core.types import InferenceRequest, InferenceResponse, Ticket
from tests.models import mlp_archive


@dataclass
class _Batcher:
    pending: int = 3
    queue_size: int = 10
    in_flight: int = 2


@dataclass
class _Instance:
    index: int = 0
    status: str = "READY"
    start_time: float = 1000.0
    gpu_id: int | None = None
    service: object = None


@dataclass(eq=False)
class _Version:
    name: str = "m"
    version: str = "1.0"
    handler: str = "h.py"
    batcher: _Batcher = field(default_factory=_Batcher)
    config: ModelConfig = field(default_factory=lambda: ModelConfig(min_workers=2, batch_size=4,
                                                                      raw={"precision": "fp16"}))
    instances: list = field(default_factory=lambda: [_Instance()])
    load_seconds: float = 1.5

    @property
    def ready_instances(self):
        return sum(i.status == "READY" for i in self.instances)


class _Registry:
    def __init__(self, versions):
        self.versions = versions

    def all_versions(self):
        return list(self.versions)


class _Samples(dict):
    """(sample name, label pairs in any order) -> value."""

    def __getitem__(self, key):
        return super().__getitem__((key[0], tuple(sorted(key[1]))))


def _samples(metrics: ServingMetrics) -> dict:
    out = _Samples()
    for fam in text_string_to_metric_families(metrics.render().decode()):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _req(version=None, received=10.0, dispatched=10.25, protocol="rest"):
    r = Ticket(InferenceRequest("m", version, "req-1", protocol=protocol))
    r.timings.received, r.timings.dispatched = received, dispatched
    return r


def test_buckets_include_each_objective_and_reject_nonsense():
    assert metric_buckets(DEFAULT_BUCKETS, [0.3, 0.5])[:12] == (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
                                                                  0.1, 0.25, 0.3, 0.5, 1.0)
    assert metric_buckets(DEFAULT_BUCKETS)[0] == 0.0005 and metric_buckets(DEFAULT_BUCKETS)[-1] == 60.0
    with pytest.raises(ValueError, match="latency_objectives"):
        metric_buckets(DEFAULT_BUCKETS, [-1])
    with pytest.raises(ValueError, match="metric_buckets"):
        metric_buckets(["fast"])


def test_request_and_batch_observations(monkeypatch):
    m = ServingMetrics(objectives=[0.3], hostname="h1")
    mv = _Version()
    m.watch(_Registry([mv]))
    monkeypatch.setattr("monitoring.metrics.time.monotonic", lambda: 10.5)
    m.observe(mv, _req(), InferenceResponse())
    m.observe(mv, _req(version="1.0", protocol="grpc"), InferenceResponse())
    m.observe(mv, _req(dispatched=0.0), OspreyError(ErrorKind.QUEUE_FULL, "full"))
    m.observe(mv, _req(), OspreyError(ErrorKind.DEADLINE, "late"))
    m.observe(None, Ticket(InferenceRequest("client-chosen-name", None, "r")), OspreyError(ErrorKind.NOT_FOUND, "no"))
    batch = [_req(), _req(), _req()]
    for r in batch:
        r.timings.started, r.timings.finished = 10.3, 10.4
        r.timings.stages = {"preprocess": 0.01, "inference": 0.08, "postprocess": 0.01}
    m.observe_batch(mv, batch)
    s = _samples(m)
    base = (("model", "m"), ("version", "1.0"))
    assert s[("osprey_requests_total", (("code", "200"), *base, ("protocol", "rest")))] == 1
    assert s[("osprey_requests_total", (("code", "200"), *base, ("protocol", "grpc")))] == 1
    assert s[("osprey_requests_total", (("code", "503"), *base, ("protocol", "rest")))] == 1
    assert s[("osprey_requests_total", (("code", "404"), ("model", ""), ("protocol", "rest"), ("version", "")))] == 1
    assert not any("client-chosen-name" in str(k) for k in s)
    assert s[("osprey_requests_rejected_total", base)] == 1
    assert s[("osprey_requests_expired_total", base)] == 1
    # 0.5 s end to end lands at le=0.5, not le=0.3; queue wait 0.25 s for the three dispatched ones
    dur = (*base, ("protocol", "rest"))
    assert s[("osprey_request_duration_seconds_bucket", (("le", "0.3"), *dur))] == 0
    assert s[("osprey_request_duration_seconds_bucket", (("le", "0.5"), *dur))] == 3
    assert s[("osprey_request_duration_seconds_sum", dur)] == pytest.approx(1.5)
    assert s[("osprey_queue_wait_seconds_count", base)] == 3
    assert s[("osprey_queue_wait_seconds_bucket", (("le", "0.25"), *base))] == 3
    assert s[("osprey_batch_size_bucket", (("le", "2.0"), *base))] == 0
    assert s[("osprey_batch_size_bucket", (("le", "3.0"), *base))] == 1
    assert s[("osprey_stage_duration_seconds_sum", (*base, ("stage", "inference")))] == pytest.approx(0.08)
    assert s[("osprey_stage_duration_seconds_sum", (*base, ("stage", "handle")))] == pytest.approx(0.1)
    # TorchServe's names and labels; "default" when the request named no version
    ts = (("hostname", "h1"), ("model_name", "m"))
    assert s[("ts_inference_requests_total", (*ts, ("model_version", "default")))] == 3
    assert s[("ts_inference_requests_total", (*ts, ("model_version", "1.0")))] == 1
    # (prometheus_client's parser appends _total; the raw text has TorchServe's bare names,
    # see test_exposition_type_lines_match_torchserve)
    assert s[("ts_inference_latency_microseconds_total", (*ts, ("model_version", "1.0")))] == pytest.approx(5e5)
    assert s[("ts_queue_latency_microseconds_total", (*ts, ("model_version", "1.0")))] == pytest.approx(2.5e5)
    assert s[("PredictionTime", (("Hostname", "h1"), ("Level", "Model"), ("ModelName", "m")))] == pytest.approx(100)
    # scrape-time gauges
    assert s[("osprey_queue_depth", base)] == 3 and s[("osprey_queue_capacity", base)] == 10
    assert s[("osprey_requests_in_flight", base)] == 2
    assert s[("osprey_instances_ready", base)] == 1 and s[("osprey_instances_min", base)] == 2
    assert s[("osprey_latency_objective_seconds", base)] == 0.3
    assert s[("osprey_instance_start_time_seconds", (*base, ("worker", "0")))] == 1000
    assert s[("osprey_model_info", (("device", "cpu"), ("handler", "h.py"), ("model", "m"),
                                    ("precision", "fp16"), ("version", "1.0")))] == 1


def test_exposition_type_lines_match_torchserve():
    m = ServingMetrics(hostname="h")
    mv = _Version()
    m.observe(mv, _req(received=0.0, dispatched=0.0), InferenceResponse())
    text = m.render().decode()
    assert "# TYPE ts_inference_latency_microseconds counter\n" in text
    assert "# TYPE ts_inference_requests_total counter\n" in text
    assert "# TYPE ts_queue_latency_microseconds counter\n" in text
    # as TorchServe 0.12 writes them (its recorded /metrics: tests/fixtures/torchserve_metrics), a comma ending the labels
    assert '\nts_inference_requests_total{model_name="m",model_version="default",hostname="h",} 1.0\n' in text
    assert '\nts_inference_latency_microseconds{model_name="m",model_version="default",hostname="h",} ' in text
    assert "_created" not in text


def test_unregistered_versions_are_forgotten():
    m = ServingMetrics(hostname="h")
    mv = _Version()
    reg = _Registry([mv])
    m.watch(reg)
    m.observe(mv, _req(), InferenceResponse())
    assert 'model="m"' in m.render().decode()
    reg.versions = []
    assert 'osprey_requests_total{model="m"' in m.render().decode()  # one more scrape sees the last counts
    text = m.render().decode()
    assert 'model="m"' not in text and 'model_name="m"' not in text
    assert not m._series


def test_forget_drops_a_released_version_at_once_and_keeps_no_reference():
    """No scrape needed (an operator may run none): the release removes the version's series
    and handler metrics; metrics hold versions only weakly. A version registered again under
    the same name and number keeps counting in the same series."""
    import gc
    import weakref

    m = ServingMetrics(hostname="h")
    old, again = _Version(), _Version()
    reg = _Registry([old])
    m.watch(reg)
    m.observe(old, _req(), InferenceResponse())
    m.observe_batch(old, [_req()])
    HandlerMetrics("m", m.handler_metric).add_counter("Calls", 1)
    m.render()  # the scrape caches the version's precision
    ref = weakref.ref(old)
    reg.versions = [again]
    m.forget(old)  # re-registered meanwhile: its series stay, its caches go
    assert m.requests.children and not m._series and not m._precisions
    reg.versions = []
    m.forget(old)
    for family in (*m._families, *m._ts_families):
        assert not family.children, family.name
    assert 'ModelName="m"' not in m.handler.render()
    m.observe(old, _req(), InferenceResponse())  # a late answer of the released version
    del old
    gc.collect()
    assert ref() is None


def test_handler_metrics_reach_prometheus_with_torchserve_names():
    m = ServingMetrics(hostname="h")
    hm = HandlerMetrics("mymodel", m.handler_metric)
    hm.add_counter("Calls", 1)
    hm.add_counter("Calls", 2)
    hm.add_time("PreTime", 12.5)
    hm.add_size("Payload", 3, unit="kB")
    hm.add_percent("Fill", 75)
    hm.add_metric("Custom-Thing", 4, "count", dimensions={"Region": "eu"}, metric_type=MetricTypes.GAUGE)
    hm.add_metric("Hist", 0.2, "s", metric_type=MetricTypes.HISTOGRAM)
    hm.add_metric("osprey_requests_total", 1, "count")  # would shadow Osprey's own: refused
    s = _samples(m)
    lab = (("Hostname", "h"), ("Level", "Model"), ("ModelName", "mymodel"))
    assert s[("Calls_total", lab)] == 3  # (the parser appends _total to counters)
    assert s[("PreTime", lab)] == 12.5
    assert s[("Payload", lab)] == 3
    assert s[("Fill", lab)] == 75
    assert s[("Custom_Thing", (*lab[:2], ("ModelName", "mymodel"), ("Region", "eu")))] == 4
    assert s[("Hist_count", lab)] == 1
    assert not any(k[0] == "osprey_requests_total" and ("ModelName", "mymodel") in k[1] for k in s)


def test_metrics_declared_the_torchserve_way_keep_their_dimensions_and_type():
    """add_metric_to_cache with dimension names, then add_or_update with their values (and
    TorchServe's own MetricTypes enum, not this module's): one series per label value, a counter
    that adds up; get_metric gives the declared one back."""
    import enum

    class TsMetricTypes(enum.Enum):  # ts.metrics.metric_type_enum.MetricTypes, as TorchServe defines it
        COUNTER = "counter"
        GAUGE = "gauge"
        HISTOGRAM = "histogram"

    m = ServingMetrics(hostname="h")
    hm = HandlerMetrics("met2", m.handler_metric)
    hm.add_metric_to_cache("ClassCount", "count", dimension_names=["ModelName", "Label"],
                           metric_type=TsMetricTypes.COUNTER)
    for label in ("cat", "cat", "dog"):
        hm.get_metric("ClassCount", TsMetricTypes.COUNTER).add_or_update(1, ["met2", label])
    hm.add_metric("Latency", 0.2, "s", metric_type=TsMetricTypes.HISTOGRAM)
    s = _samples(m)
    lab = (("Hostname", "h"), ("Level", "Model"), ("ModelName", "met2"))
    assert s[("ClassCount_total", (*lab[:2], ("Label", "cat"), lab[2]))] == 2
    assert s[("ClassCount_total", (*lab[:2], ("Label", "dog"), lab[2]))] == 1
    assert s[("Latency_count", lab)] == 1


def test_label_values_are_escaped():
    m = ServingMetrics(hostname="h")
    HandlerMetrics("m", m.handler_metric).add_metric("X", 1, dimensions={"note": 'a "quoted"\\ line\nbreak'},
                                                     metric_type=MetricTypes.GAUGE)
    fams = {f.name: f for f in text_string_to_metric_families(m.render().decode())}
    assert fams["X"].samples[0].labels["note"] == 'a "quoted"\\ line\nbreak'


def test_gc_pauses_are_timed_and_the_loaded_heap_is_frozen(osprey, store):
    """After startup the loaded heap is frozen out of the collector (full collections stay
    short), and every collection's pause is in /metrics by generation."""
    mlp_archive(store)
    srv = osprey(["mlp.mar"], store)
    for _ in range(50):
        r = httpx.post(f"{srv.inference}/predictions/mlp", json=[0.5] * 16, timeout=30)
        assert r.status_code == 200
    fams = {f.name: f for f in text_string_to_metric_families(httpx.get(f"{srv.metrics}/metrics", timeout=30).text)}
    frozen = fams["osprey_gc_frozen_objects"].samples[0].value
    assert frozen > 10_000  # torch, the handler and the model: tens of thousands of objects
    counts = {s.labels["generation"]: s.value for s in fams["osprey_gc_pause_seconds"].samples
              if s.name == "osprey_gc_pause_seconds_count"}
    assert set(counts) == {"0", "1", "2"}
    # the collector waits while the server starts (server.core.heap.hold): the startup freeze's
    # full collection is the first, and it was timed like any other
    assert counts["2"] >= 1

    # Removing a model runs one full collection (what it left in cycles is freed) and refreezes.
    r = httpx.delete(f"{srv.management}/models/mlp", timeout=30)
    assert r.status_code == 200, r.text
    deadline = time.monotonic() + 15
    while True:
        fams = {f.name: f for f in text_string_to_metric_families(httpx.get(f"{srv.metrics}/metrics", timeout=30).text)}
        after = {s.labels["generation"]: s.value for s in fams["osprey_gc_pause_seconds"].samples
                 if s.name == "osprey_gc_pause_seconds_count"}
        if after["2"] > counts["2"]:
            break
        assert time.monotonic() < deadline, "no full collection after the model was removed"
        time.sleep(0.2)
    assert fams["osprey_gc_frozen_objects"].samples[0].value > 10_000
