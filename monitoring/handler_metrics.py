"""Handler metrics (``context.metrics``) as Prometheus metrics, named as TorchServe names them.

TorchServe in ``metrics_mode=prometheus`` exposes a handler's ``add_metric("MyMetric", ...)``
as ``MyMetric{ModelName="...",Level="Model",Hostname="..."}``: the metric's own name, its
dimensions as labels. Osprey does the same, so dashboards built on TorchServe keep working.
Counters add up, gauges keep the last value, histograms use TorchServe's default buckets.

Handlers call in from their instance threads, so this one collector takes a lock.
A metric keeps the label names it was first seen with (missing ones are empty, extra ones
dropped); names that would shadow Osprey's own (``osprey_``, ``ts_``, ``process_``) are refused.
A metric declared in TorchServe's metrics configuration (``metrics_config``, model_metrics) has
the declared type, unit and label names (declared order, ``Hostname`` last, as TorchServe); the
handler's dimensions fill them by name.
"""

from __future__ import annotations

import logging
import re
import threading
from typing import Any

from .families import Counter, Gauge, Histogram

__all__ = ["HandlerMetricsCollector", "TS_HISTOGRAM_BUCKETS"]

log = logging.getLogger("osprey.metrics.handler")

TS_HISTOGRAM_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
_RESERVED = ("osprey_", "ts_", "process_", "python_")
_DEFAULT_LABELS = ("ModelName", "Level", "Hostname")
MAX_METRICS = 500  # handler metric names
MAX_SERIES = 1000  # label combinations per name


def _metric_name(name: str) -> str:
    out = re.sub(r"[^a-zA-Z0-9_]", "_", name)
    return "_" + out if out[:1].isdigit() or not out else out


def _label_name(name: str) -> str:
    out = re.sub(r"[^a-zA-Z0-9_]", "_", name)
    return "_" + out if out[:1].isdigit() or not out or out.startswith("__") else out


class HandlerMetricsCollector:
    def __init__(self, hostname: str):
        self.hostname = hostname
        self.families: dict[str, Counter | Gauge | Histogram] = {}
        self._lock = threading.Lock()
        self._refused: set[str] = set()

    def _refuse(self, name: str, why: str) -> None:
        if name not in self._refused:
            self._refused.add(name)
            log.warning("handler metric %r is not exported: %s", name, why)

    def record(self, name: str, value: float, unit: str, kind: str, dims: dict[str, str], spec: Any = None) -> None:
        metric = _metric_name(name)
        if metric.startswith(_RESERVED):
            return self._refuse(name, "the name is reserved for Osprey's own metrics")
        if spec is not None:  # declared (monitoring.ts_metrics_config.MetricSpec)
            kind, unit = spec.kind, spec.unit
            labels = {_label_name(k): self.hostname if k == "Hostname" else dims.get(k, "Model" if k == "Level" else "")
                      for k in spec.dimensions}
        else:
            labels = {"ModelName": dims.get("ModelName", ""), "Level": dims.get("Level", "Model"),
                      "Hostname": self.hostname}
            for k, v in dims.items():
                if k not in labels:
                    labels[_label_name(k)] = v
        with self._lock:
            fam = self.families.get(metric)
            if fam is None:
                if len(self.families) >= MAX_METRICS:
                    return self._refuse(name, f"more than {MAX_METRICS} handler metrics")
                doc = (f"Torchserve prometheus {kind} metric with unit: {unit}" if spec is not None
                       else f"Handler metric {name} ({kind}, unit: {unit or 'none'})")
                names = tuple(labels)
                if kind == "counter":
                    fam = Counter(metric, doc, names)
                elif kind == "histogram":
                    fam = Histogram(metric, doc, names, TS_HISTOGRAM_BUCKETS)
                else:
                    fam = Gauge(metric, doc, names)
                self.families[metric] = fam
            key = tuple(labels.get(n, "") for n in fam.labelnames)
            if key not in fam.children and len(fam.children) >= MAX_SERIES:
                return self._refuse(name, f"more than {MAX_SERIES} label combinations")
            if isinstance(fam, Histogram):
                fam.child(*key).observe(value)
            elif isinstance(fam, Gauge):
                fam.child(*key)[0] = value
            else:
                fam.child(*key)[0] += value

    def forget(self, model: str, live: set[str]) -> None:
        """Model ``model`` has no registered version left (``live``: the names that do): drop
        its series, so that a model registered and unregistered over and over adds nothing."""
        if model in live:
            return
        with self._lock:
            for fam in self.families.values():
                if "ModelName" in fam.labelnames:
                    fam.remove(lambda lab: lab["ModelName"] == model)

    def render(self) -> str:
        with self._lock:
            return "".join(f.render() for f in self.families.values())
