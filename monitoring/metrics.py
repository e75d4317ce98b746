"""Prometheus metrics for the serving core, on a registry that is passed in (never global).

The data plane calls :meth:`ServingMetrics.observe` once per finished request and
:meth:`ServingMetrics.observe_batch` once per batch; handler metrics from
``context.metrics`` arrive through :meth:`ServingMetrics.handler_metric`.
"""

from __future__ import annotations

import re
import threading
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.process_collector import ProcessCollector

__all__ = ["ServingMetrics", "DEFAULT_BUCKETS", "CONTENT_TYPE"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
DEFAULT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class ServingMetrics:
    def __init__(self, registry: CollectorRegistry | None = None, buckets: tuple[float, ...] = DEFAULT_BUCKETS):
        self.registry = registry or CollectorRegistry()
        ProcessCollector(registry=self.registry)
        r = self.registry
        self.requests = Counter("osprey_requests_total", "Requests by model, version, protocol and status code",
                                ["model", "version", "protocol", "code"], registry=r)
        self.request_seconds = Histogram("osprey_request_duration_seconds", "End-to-end request duration",
                                         ["model", "version", "protocol"], buckets=buckets, registry=r)
        self.queue_seconds = Histogram("osprey_queue_wait_seconds", "Time from arrival to leaving the queue",
                                       ["model", "version"], buckets=buckets, registry=r)
        self.inference_seconds = Histogram("osprey_batch_inference_seconds", "Handler time per batch",
                                           ["model", "version"], buckets=buckets, registry=r)
        self.batch_size = Histogram("osprey_batch_size", "Requests per batch", ["model", "version"],
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=r)
        self.handler_gauges: dict[str, Gauge] = {}
        self._lock = threading.Lock()

    def observe(self, mv: Any, req: Any, outcome: Any, now: float) -> None:
        model = req.model
        version = mv.version if mv is not None else ""
        status = getattr(outcome, "status", 500)
        self.requests.labels(model, version, req.protocol, str(status)).inc()
        if mv is not None and req.timings.received:
            self.request_seconds.labels(model, version, req.protocol).observe(now - req.timings.received)

    def observe_batch(self, mv: Any, batch: list) -> None:
        t = batch[0].timings
        self.batch_size.labels(mv.name, mv.version).observe(len(batch))
        self.inference_seconds.labels(mv.name, mv.version).observe(t.inference)
        q = self.queue_seconds.labels(mv.name, mv.version)
        for r in batch:
            q.observe(r.timings.queue)

    def handler_metric(self, model: str, name: str, value: float, unit: str, kind: str, dims: dict) -> None:
        metric = "osprey_handler_" + re.sub(r"[^a-zA-Z0-9_]", "_", name).lower()
        with self._lock:
            g = self.handler_gauges.get(metric)
            if g is None:
                g = Gauge(metric, f"Handler metric {name} ({unit})", ["model"], registry=self.registry)
                self.handler_gauges[metric] = g
        if kind == "counter":
            g.labels(model).inc(value)
        else:
            g.labels(model).set(value)

    def render(self) -> bytes:
        return generate_latest(self.registry)
