"""Prometheus metrics for the serving core (``GET /metrics`` on the metrics port).

What is recorded where:

* per request, by the data plane observer :meth:`ServingMetrics.observe` (event loop):
  ``osprey_requests_total{model,version,protocol,code}``,
  ``osprey_request_duration_seconds{model,version,protocol}`` (end to end),
  ``osprey_queue_wait_seconds{model,version}``, ``osprey_requests_rejected_total`` (queue
  full), ``osprey_requests_expired_total`` (deadline passed), and TorchServe's
  ``ts_inference_requests_total``, ``ts_inference_latency_microseconds`` and
  ``ts_queue_latency_microseconds`` with TorchServe's labels (model_name, model_version,
  hostname; model_version is ``default`` when the request named none);
* per batch, by the batcher hook :meth:`ServingMetrics.observe_batch` (event loop):
  ``osprey_batch_size{model,version}``, ``osprey_stage_duration_seconds{model,version,stage}``
  (``handle`` = the whole handler call; ``preprocess``/``inference``/``postprocess`` when the
  handler reports them) and TorchServe's ``HandlerTime``/``PredictionTime`` gauges;
* at scrape time, read from the live registry (no cost on the request path): queue depth
  and capacity, requests in flight, instances ready and wanted, instance start times, model
  load duration, ``osprey_model_info{model,version,handler,device,precision}``, the latency
  objective; routing: ``osprey_model_default_version_info{model,version}`` (1 for each
  model's default), ``osprey_traffic_share{model,version}`` (share of the requests naming no
  version, from the canary weights), ``osprey_shadow_requests_total{model,version,result}``
  (shadow copies: agree, disagree, error, dropped), ``osprey_model_rollbacks_total{model}``
  (rollbacks of the default, by hand or in probation); process CPU and memory; per-GPU memory and
  utilization when NVML answers;
* the HTTP ports' connections and the front-end processes, at scrape time
  (:func:`connection_metrics`): ``osprey_connections_open{port}``,
  ``osprey_connections_refused_total{port}`` (max_connections) and, with ``frontends`` over 1,
  ``osprey_frontends_up``, ``osprey_frontend_restarts_total``, ``osprey_frontend_shed_total``;
* handler metrics from ``context.metrics`` (:mod:`monitoring.handler_metrics`);
* the rest of TorchServe's default metric set (:mod:`monitoring.ts_metrics`: Requests2XX/4XX/5XX
  per HTTP answer, QueueTime and WorkerThreadTime per batch, WorkerLoadTime and the system
  metrics at scrape time). TorchServe's metrics configuration (``metrics_config``, else its
  default) decides which TorchServe metrics exist and how handler metrics are typed; with
  ``metrics_mode=log`` they are also written as TorchServe's log lines (:mod:`monitoring.metrics_log`).

Labels are bounded: model and version come from the registry (a request for an unknown
model is counted with empty model and version), protocol and code from the server; never a
request id. Durations are seconds; histogram buckets default to 0.5 ms .. 60 s with an extra
edge at every configured latency objective.
"""

from __future__ import annotations

import socket
import time
import weakref
from typing import Any, Iterable, Mapping

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.process_collector import ProcessCollector

from .families import Counter, Gauge, Histogram
from .gc_metrics import gc_collector
from .gpu import GpuCollector
from .handler_metrics import HandlerMetricsCollector
from .metrics_log import MetricsLog, ts_value
from .ts_metrics import TorchServeMetrics, ts_help
from .ts_metrics_config import MetricsConfig, load_metrics_config

__all__ = ["ServingMetrics", "DEFAULT_BUCKETS", "BATCH_BUCKETS", "CONTENT_TYPE", "metric_buckets", "connection_metrics"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
DEFAULT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 512, 1024)
MAX_STAGES = 16  # distinct handler stage names per model version
_QUEUE_FULL, _DEADLINE = "queue_full", "deadline"


def metric_buckets(buckets: Iterable[Any], objectives: Iterable[Any] = ()) -> tuple[float, ...]:
    """Sorted bucket edges in seconds: ``buckets`` plus one edge per latency objective."""
    out = set()
    for what, values in (("metric_buckets", buckets), ("latency_objectives", objectives)):
        for v in values:
            try:
                f = float(v)
            except (TypeError, ValueError):
                raise ValueError(f"setting {what}: {v!r} is not a number of seconds") from None
            if not f > 0 or f == float("inf"):
                raise ValueError(f"setting {what}: {v!r} must be a positive number of seconds")
            out.add(f)
    if not out:
        raise ValueError("setting metric_buckets: at least one bucket edge is needed")
    return tuple(sorted(out))


class _Series:
    """The labelled children of one model version, looked up once and kept.

    ``mv`` is a weak reference: metrics never keep an unregistered version (its handler,
    model and instances) alive; the entry is dropped by :meth:`ServingMetrics.forget`."""

    __slots__ = ("mv", "name", "version", "outcomes", "queue", "batch", "stages", "handler_time",
                 "prediction_time", "rejected", "expired")

    def __init__(self, m: "ServingMetrics", mv: Any):
        self.mv, self.name, self.version = weakref.ref(mv), mv.name, mv.version
        self.outcomes: dict[tuple, tuple] = {}
        self.queue = m.queue_seconds.child(mv.name, mv.version)
        self.batch = m.batch_size.child(mv.name, mv.version)
        self.stages: dict[str, Any] = {}
        self.handler_time = m.ts_handler_time.child(mv.name, "Model", m.hostname)
        self.prediction_time = m.ts_prediction_time.child(mv.name, "Model", m.hostname)
        self.rejected = m.rejected.child(mv.name, mv.version)
        self.expired = m.expired.child(mv.name, mv.version)


class ServingMetrics:
    def __init__(self, buckets: Iterable[float] = DEFAULT_BUCKETS, objectives: Iterable[float] = (),
                 hostname: str | None = None, registry: CollectorRegistry | None = None,
                 ts_config: MetricsConfig | None = None, metrics_log: MetricsLog | None = None,
                 system_metrics: bool = True, auto_detect: bool | None = None):
        """``ts_config``: TorchServe's metrics configuration (its default when None); handler
        metrics it does not declare are exported as first seen when ``auto_detect`` (TorchServe's
        ``model_metrics_auto_detect``; by default on when no configuration was given, off with
        one, as TorchServe). ``metrics_log``: metrics_mode=log's line writer, or None."""
        self.hostname = hostname or socket.gethostname()
        self.ts_config = ts_config or load_metrics_config()
        self.auto_detect = ts_config is None if auto_detect is None else auto_detect
        self.log = metrics_log
        self.objectives = tuple(sorted(float(o) for o in objectives))
        self.buckets = metric_buckets(buckets, self.objectives)
        b = self.buckets
        self.requests = Counter("osprey_requests_total", "Inference requests by model, version, protocol and status code",
                                ("model", "version", "protocol", "code"))
        self.request_seconds = Histogram("osprey_request_duration_seconds",
                                         "End-to-end request duration, from arrival to answer",
                                         ("model", "version", "protocol"), b)
        self.queue_seconds = Histogram("osprey_queue_wait_seconds", "Time a request waited in its model's queue",
                                       ("model", "version"), b)
        self.stage_seconds = Histogram("osprey_stage_duration_seconds",
                                       "Handler time per batch by stage (handle = the whole handler call)",
                                       ("model", "version", "stage"), b)
        self.batch_size = Histogram("osprey_batch_size", "Requests per batch handed to an instance",
                                    ("model", "version"), BATCH_BUCKETS)
        self.rejected = Counter("osprey_requests_rejected_total", "Requests refused because the queue was full",
                                ("model", "version"))
        self.expired = Counter("osprey_requests_expired_total", "Requests whose deadline passed before an answer",
                               ("model", "version"))
        ts = ("model_name", "model_version", "hostname")
        self.ts_requests = Counter("ts_inference_requests_total",
                                   "Torchserve prometheus counter metric with unit: Count", ts, torchserve=True)
        self.ts_latency = Counter("ts_inference_latency_microseconds",
                                  "Torchserve prometheus counter metric with unit: Microseconds", ts, torchserve=True)
        self.ts_queue = Counter("ts_queue_latency_microseconds",
                                "Torchserve prometheus counter metric with unit: Microseconds", ts, torchserve=True)
        model_specs = self.ts_config.model_metrics
        self.ts_handler_time = Gauge("HandlerTime", ts_help("gauge", getattr(model_specs.get("HandlerTime"), "unit", "ms")),
                                     ("ModelName", "Level", "Hostname"))
        self.ts_prediction_time = Gauge("PredictionTime", ts_help("gauge", getattr(model_specs.get("PredictionTime"), "unit",
                                                                                   "ms")), ("ModelName", "Level", "Hostname"))
        self._families = (self.requests, self.request_seconds, self.queue_seconds, self.stage_seconds,
                          self.batch_size, self.rejected, self.expired)
        self._ts_families = (self.ts_requests, self.ts_latency, self.ts_queue, self.ts_handler_time,
                             self.ts_prediction_time)
        self.handler = HandlerMetricsCollector(self.hostname)
        self.process_registry = registry or CollectorRegistry(auto_describe=False)
        ProcessCollector(registry=self.process_registry)
        self.gc = gc_collector()
        self.gpu = GpuCollector()
        if self.gpu.active:
            self.process_registry.register(self.gpu)
        self.ts = TorchServeMetrics(self.ts_config, self.hostname, self.gpu, metrics_log, system_metrics)
        self._ts_rendered = tuple(f for f in self._ts_families if f.name in self.ts_config.ts_metrics
                                  or f.name in model_specs)
        self._units = {n: s.unit for n, s in (*self.ts_config.ts_metrics.items(), *model_specs.items())}
        self.http_response = self.ts.http_response  # every HTTP answer on every port (the routers call it)
        self.registry: Any = None
        self._series: dict[int, _Series] = {}
        self._precisions: dict[int, tuple[weakref.ref, str | None]] = {}
        self._gone: set[tuple[str, str]] = set()

    def watch(self, registry: Any) -> None:
        """The model registry whose live state the scrape-time gauges read."""
        self.registry = registry

    # --- the request path (event loop) ----------------------------------------------
    def _series_for(self, mv: Any) -> _Series:
        s = self._series.get(id(mv))
        if s is None or s.mv() is not mv:
            s = self._series[id(mv)] = _Series(self, mv)
        return s

    def forget(self, mv: Any) -> None:
        """``mv`` was unregistered and its requests are answered: drop what is kept for it and
        remove its labelled series, unless a version of the same name and version number has
        been registered again meanwhile (it then goes on counting in the same series)."""
        for cache in (self._series, self._precisions):
            entry = cache.get(id(mv))
            held = entry.mv if isinstance(entry, _Series) else entry[0] if entry is not None else None
            if held is not None and (held() is mv or held() is None):  # not a newer version at a reused id
                del cache[id(mv)]
        live = self.registry.all_versions() if self.registry is not None else ()
        if any((v.name, v.version) == (mv.name, mv.version) for v in live):
            return
        key = (mv.name, mv.version)
        self._gone.discard(key)
        for f in self._families:
            f.remove(lambda lab: (lab["model"], lab["version"]) == key)
        names = {v.name for v in live}
        for f in self._ts_families[:3]:
            f.remove(lambda lab: (lab["model_name"], lab["model_version"]) == key
                     or (lab["model_version"] == "default" and lab["model_name"] not in names))
        if mv.name not in names:
            for f in self._ts_families[3:]:
                f.remove(lambda lab: lab["ModelName"] == mv.name)
        self.handler.forget(mv.name, names)

    def over_objective(self, model: str, version: str) -> tuple[int, int] | None:
        """(requests, of them slower than the p99 latency objective) a version has answered so
        far, over every protocol; None without an objective. Read on the loop (the retraining
        triggers' latency watch takes differences between polls)."""
        if not self.objectives:
            return None
        edge = self.request_seconds.bounds.index(max(self.objectives))
        n = over = 0
        for key, child in list(self.request_seconds.children.items()):
            if key[0] == model and key[1] == version:
                counts = child.counts
                n += sum(counts)
                over += sum(counts[edge + 1:])
        return n, over

    def observe(self, mv: Any, ticket: Any, outcome: Any) -> None:
        """Data plane observer: one finished request (answered, failed or cancelled)."""
        now = time.monotonic()
        status = outcome.status
        t = ticket.timings
        req = ticket.request
        if mv is None:
            self.requests.child("", "", req.protocol, str(status))[0] += 1
            return
        s = self._series.get(id(mv))
        if s is None or s.mv() is not mv:
            s = self._series_for(mv)
        key = (req.protocol, status, req.version)
        children = s.outcomes.get(key)
        if children is None:
            name, version = mv.name, mv.version
            tsv = req.version or "default"
            children = s.outcomes[key] = (
                self.requests.child(name, version, req.protocol, str(status)),
                self.request_seconds.child(name, version, req.protocol),
                self.ts_requests.child(name, tsv, self.hostname),
                self.ts_latency.child(name, tsv, self.hostname),
                self.ts_queue.child(name, tsv, self.hostname),
            )
        count, duration, ts_count, ts_latency, ts_queue = children
        total = now - t.received if t.received else 0.0
        count[0] += 1
        duration.observe(total)
        ts_count[0] += 1
        ts_latency[0] += total * 1e6
        wait = None
        if t.dispatched:
            wait = t.dispatched - t.received
            s.queue.observe(wait)
            ts_queue[0] += wait * 1e6
        if self.log is not None:
            self._log_request(mv.name, req.version, total, wait)
            self.log.flush()  # before the answer leaves: a client that reads the file then finds them
        if status >= 500:
            kind = getattr(outcome, "kind", None)
            if kind is not None:
                if kind.value == _QUEUE_FULL:
                    s.rejected[0] += 1
                elif kind.value == _DEADLINE:
                    s.expired[0] += 1

    def _log_request(self, name: str, version: str | None, total: float, wait: float | None) -> None:
        """metrics_mode=log: TorchServe's lines for one request (ts_metrics.log)."""
        dims = f"model_name:{name},model_version:{version or 'default'}"
        units, lg = self._units, self.log
        if "ts_inference_requests_total" in units:
            lg.frontend("ts_inference_requests_total", units["ts_inference_requests_total"], "1.0", dims)
        if "ts_inference_latency_microseconds" in units:
            lg.frontend("ts_inference_latency_microseconds", units["ts_inference_latency_microseconds"],
                        repr(round(total * 1e6, 3)), dims)
        if wait is not None and "ts_queue_latency_microseconds" in units:
            lg.frontend("ts_queue_latency_microseconds", units["ts_queue_latency_microseconds"],
                        repr(round(wait * 1e6, 3)), dims)

    def refused(self, mv: Any, protocol: str, error: Any) -> None:
        """Data plane refusal observer: a request refused at admission (queue full, no instance)
        before any request object existed: counters only."""
        status = error.status
        s = self._series.get(id(mv))
        if s is None or s.mv is not mv:
            s = self._series_for(mv)
        key = ("refused", protocol, status)
        count = s.outcomes.get(key)
        if count is None:
            count = s.outcomes[key] = self.requests.child(mv.name, mv.version, protocol, str(status))
        count[0] += 1
        if error.kind.value == _QUEUE_FULL:
            s.rejected[0] += 1

    def observe_batch(self, mv: Any, batch: list) -> None:
        """Batcher hook: one batch came back from an instance."""
        if not batch:
            return
        s = self._series.get(id(mv))
        if s is None or s.mv() is not mv:
            s = self._series_for(mv)
        s.batch.observe(len(batch))
        t = batch[0].timings
        if t.finished:
            handle = t.finished - t.started
            self._stage(s, "handle").observe(handle)
            s.handler_time[0] = s.prediction_time[0] = handle * 1000.0
            self.ts.batch((t.dispatched - t.received) * 1000.0 if t.dispatched and t.received else 0.0,
                          (t.started - t.dispatched) * 1000.0 if t.dispatched else 0.0)
            if self.log is not None:
                self._log_batch(mv.name, batch, handle)
        if t.stages:
            for stage, seconds in t.stages.items():
                child = s.stages.get(stage) or self._stage(s, stage)
                if child is not None:
                    child.observe(seconds)

    def _log_batch(self, name: str, batch: list, handle: float) -> None:
        """metrics_mode=log: the backend's PredictionTime and HandlerTime lines (model_metrics.log)."""
        ids = ",".join(t.request.request_id for t in batch)
        value = repr(round(handle * 1000.0, 2))
        dims = f"ModelName:{name},Level:Model"
        for metric in ("PredictionTime", "HandlerTime"):
            unit = self._units.get(metric)
            if unit is not None:
                self.log.model(metric, unit, value, dims, ids)

    def _stage(self, s: _Series, stage: str):
        child = s.stages.get(stage)
        if child is None:
            if len(s.stages) >= MAX_STAGES or not isinstance(stage, str):
                return None
            child = s.stages[stage] = self.stage_seconds.child(s.name, s.version, stage)
        return child

    # --- handler metrics (instance threads) -----------------------------------------
    def handler_metric(self, name: str, value: float, unit: str, kind: str, dims: dict,
                       request_ids: str | None = None) -> None:
        """``context.metrics`` sink (instance threads). A metric the configuration declares under
        model_metrics takes its declared type, unit and dimensions; others are exported only with
        auto-detection on (see __init__)."""
        if name in ("HandlerTime", "PredictionTime"):
            return  # Osprey records these itself, per batch, as TorchServe does
        spec = self.ts_config.model_metrics.get(name)
        if spec is None and not self.auto_detect:
            return
        self.handler.record(name, value, unit, kind, dims, spec)
        if self.log is not None:
            names = spec.dimensions if spec is not None else (*dims, "Hostname")
            d = ",".join(f"{k}:{dims.get(k, 'Model' if k == 'Level' else '')}" for k in names if k != "Hostname")
            self.log.model(name, spec.unit if spec is not None else unit, ts_value(value), d, request_ids or "")

    # --- scrape ---------------------------------------------------------------------
    def _live(self) -> str:
        versions = list(self.registry.all_versions()) if self.registry is not None else []
        lab = ("model", "version")
        g = {n: Gauge(n, d, lab) for n, d in (
            ("osprey_queue_depth", "Requests waiting in the model version's queue"),
            ("osprey_queue_capacity", "Requests the queue holds before refusing more (jobQueueSize)"),
            ("osprey_requests_in_flight", "Requests handed to an instance and not yet answered"),
            ("osprey_instances_ready", "Instances ready to serve"),
            ("osprey_instances_min", "Instances the model version should have ready (minWorkers)"),
            ("osprey_batch_size_limit", "Largest batch the model version takes (batchSize)"),
            ("osprey_model_load_seconds", "How long the model version's instances took to load"),
            ("osprey_latency_objective_seconds", "End-to-end p99 latency objective"),
        )}
        starts = Gauge("osprey_instance_start_time_seconds", "Unix time each instance started; a change is a restart",
                       ("model", "version", "worker"))
        restarts = Counter("osprey_instance_restarts_total", "Instances restarted after a crash or a hang",
                           ("model", "version"))
        abandoned = Counter("osprey_instances_abandoned_total",
                            "Hung instance threads abandoned (they cannot be killed) and replaced", ("model", "version"))
        g["osprey_model_healthy"] = Gauge("osprey_model_healthy", "0 once the version stopped restarting its "
                                          "instances (crash loop, too many hung threads), else 1", lab)
        info = Gauge("osprey_model_info", "Model version facts (always 1)",
                     ("model", "version", "handler", "device", "precision"))
        objective = max(self.objectives) if self.objectives else None
        for mv in versions:
            b = mv.batcher
            k = (mv.name, mv.version)
            g["osprey_queue_depth"].child(*k)[0] = b.pending
            g["osprey_queue_capacity"].child(*k)[0] = b.queue_size
            g["osprey_requests_in_flight"].child(*k)[0] = b.in_flight
            g["osprey_instances_ready"].child(*k)[0] = mv.ready_instances
            g["osprey_instances_min"].child(*k)[0] = mv.config.min_workers
            g["osprey_batch_size_limit"].child(*k)[0] = mv.config.batch_size
            g["osprey_model_load_seconds"].child(*k)[0] = mv.load_seconds
            g["osprey_model_healthy"].child(*k)[0] = 1 if getattr(mv, "unhealthy", None) is None else 0
            restarts.child(*k)[0] = getattr(mv, "restarts", 0)
            abandoned.child(*k)[0] = getattr(mv, "abandoned_total", 0)
            if objective is not None:
                g["osprey_latency_objective_seconds"].child(*k)[0] = objective
            for inst in list(mv.instances):
                if inst.status in ("READY", "LOADING"):
                    starts.child(mv.name, mv.version, str(inst.index))[0] = inst.start_time
            device = "cuda" if any(i.gpu_id is not None for i in mv.instances) else "cpu"
            info.child(mv.name, mv.version, str(mv.handler), device, self._precision(mv))[0] = 1
        self._prune({(mv.name, mv.version) for mv in versions}, {mv.name for mv in versions},
                    {id(mv) for mv in versions})
        return "".join(f.render() for f in (*g.values(), starts, restarts, abandoned, info,
                                            *self._routing(versions)))

    def _routing(self, versions: list) -> tuple:
        """Default version, traffic shares and shadow results, read from the registry."""
        default = Gauge("osprey_model_default_version_info", "The version answering requests that name none "
                        "(always 1)", ("model", "version"))
        share = Gauge("osprey_traffic_share", "Share of the requests naming no version that the version gets "
                      "(canary weights; 1 for the default without weights)", ("model", "version"))
        shadow = Counter("osprey_shadow_requests_total", "Copies of the default's requests run on a shadow version, "
                         "by result (agree, disagree, error, dropped)", ("model", "version", "result"))
        rollbacks = Counter("osprey_model_rollbacks_total", "Rollbacks of the default version to the previous "
                            "one (by hand or automatic in probation), since the model was registered", ("model",))
        traffic = getattr(self.registry, "traffic", None)
        count = getattr(self.registry, "rollbacks", None)
        for name in sorted({mv.name for mv in versions}) if traffic is not None else ():
            try:
                t = traffic(name)
                n = count(name) if count is not None else None
            except Exception:  # unregistered meanwhile
                continue
            default.child(name, t["default"])[0] = 1
            for version, value in t["shares"].items():
                share.child(name, version)[0] = value
            if n is not None:  # 0 from registration on, so that the first rollback is an increase
                rollbacks.child(name)[0] = n
        for mv in versions:
            for result, n in getattr(mv, "shadow_results", {}).items():
                shadow.child(mv.name, mv.version, result)[0] = n
        return default, share, shadow, rollbacks

    def _precision(self, mv: Any) -> str:
        cached = self._precisions.get(id(mv))
        if cached is None or cached[0]() is not mv or cached[1] is None:
            cached = self._precisions[id(mv)] = (weakref.ref(mv), _detect_precision(mv))
        return cached[1] or "unknown"

    def _prune(self, live: set, names: set, ids: set) -> None:
        """Forget versions gone from the registry, one scrape after they went."""
        for cache in (self._series, self._precisions):
            for key in [k for k in cache if k not in ids]:
                del cache[key]
        known = {k for f in self._families for k in _versions_of(f)}
        gone = {k for k in known if k not in live and k[0]}
        drop = gone & self._gone
        self._gone = gone - drop
        if drop:
            for f in self._families:
                f.remove(lambda lab: (lab["model"], lab["version"]) in drop)
            # ts series: per version, and "default" ones while the model still exists
            for f in self._ts_families[:3]:
                f.remove(lambda lab: (lab["model_name"], lab["model_version"]) in drop
                         or (lab["model_version"] == "default" and lab["model_name"] not in names))

    def render(self) -> bytes:
        live = self._live()  # first: it also forgets versions that left the registry
        parts = [f.render() for f in self._families]
        parts.append(live)
        parts.extend(f.render() for f in self._ts_rendered)
        parts.append(self.ts.render(self.registry.all_versions() if self.registry is not None else ()))
        parts.append(self.handler.render())
        parts.append(self.gc.render())
        return "".join(parts).encode() + generate_latest(self.process_registry)


def connection_metrics(ports: Mapping[str, tuple[int, int | None]], frontends: Mapping[str, int] | None) -> str:
    """The HTTP ports' connections and the front-end processes, read at scrape time.

    ``ports``: port name (inference, management, metrics) -> (connections open, connections
    refused for ``max_connections`` or None where the port has no limit), the inference port's
    with its front ends' added; ``frontends``: :meth:`server.frontends.supervisor.FrontEnds.stats`,
    None without front ends (setting ``frontends`` 1)."""
    open_ = Gauge("osprey_connections_open", "Connections open on the port (the inference port's: this "
                  "process's and its front ends')", ("port",))
    refused = Counter("osprey_connections_refused_total", "Connections answered 503 and closed because "
                      "max_connections were open on the port", ("port",))
    for name, (n_open, n_refused) in ports.items():
        open_.child(name)[0] = n_open
        if n_refused is not None:
            refused.child(name)[0] = n_refused
    families = [open_, refused]
    if frontends is not None:
        up = Gauge("osprey_frontends_up", "Front-end processes listening on the inference port beside the "
                   "server's own (setting frontends, less one)", ())
        restarts = Counter("osprey_frontend_restarts_total", "Front-end processes started again after they exited "
                           "or stopped answering", ())
        shed = Counter("osprey_frontend_shed_total", "Requests a front end answered 503 because the server had not "
                       "read what it relayed (the server not keeping up)", ())
        up.child()[0] = frontends["up"]
        restarts.child()[0] = frontends["restarts"]
        shed.child()[0] = frontends["shed"]
        families += [up, restarts, shed]
    return "".join(f.render() for f in families)


def _versions_of(family) -> set:
    i, j = family.labelnames.index("model"), family.labelnames.index("version")
    return {(k[i], k[j]) for k in family.children}


def _detect_precision(mv: Any) -> str | None:
    """Its config's ``precision``, else the parameter dtype its first instance reported at
    load (fp32, fp16, bf16, int8, ...); None until an instance has loaded."""
    raw = mv.config.raw if isinstance(mv.config.raw, Mapping) else {}
    handler = raw.get("handler") if isinstance(raw.get("handler"), Mapping) else {}
    declared = raw.get("precision") or handler.get("precision")
    if declared:
        return str(declared).lower()
    if not mv.ready_instances:
        return None  # ask again at the next scrape
    return mv.signature.precision or "unknown"
