"""``context.metrics``: TorchServe's handler metrics API, forwarded to a sink.

Handlers call ``add_metric``, ``add_time``, ``add_size``, ``add_percent`` and
``add_counter`` as they do under TorchServe; each call becomes one
``sink(name, value, unit, kind, dimensions)`` call. The server's sink turns them into
Prometheus metrics; the default sink keeps the last value of each, for tests and tools.
"""

from __future__ import annotations

import enum
import threading
from typing import Any, Callable

__all__ = ["MetricTypes", "HandlerMetrics"]


class MetricTypes(enum.Enum):
    COUNTER = "counter"
    GAUGE = "gauge"
    HISTOGRAM = "histogram"


Sink = Callable[[str, float, str, str, dict], None]


def _dims(dimensions: Any) -> dict[str, str]:
    if not dimensions:
        return {}
    if isinstance(dimensions, dict):
        return {str(k): str(v) for k, v in dimensions.items()}
    out = {}
    for d in dimensions:  # TorchServe's Dimension objects or (name, value) pairs
        name = getattr(d, "name", None)
        value = getattr(d, "value", None)
        if name is None and isinstance(d, (tuple, list)) and len(d) == 2:
            name, value = d
        if name is not None:
            out[str(name)] = str(value)
    return out


class HandlerMetrics:
    def __init__(self, model_name: str, sink: Sink | None = None):
        self.model_name = model_name
        self._lock = threading.Lock()
        self.values: dict[str, float] = {}
        self._sink = sink
        # the running batch's request ids ({index: id}, set by the instance per batch): the
        # requestID of TorchServe's model_metrics.log lines
        self.request_ids: dict[int, str] | None = None

    def _emit(self, name: str, value: float, unit: str, kind: MetricTypes, dimensions: Any) -> None:
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"metric {name}: value {value!r} is not a number") from None
        kind_name = kind.value if isinstance(kind, MetricTypes) else str(kind).lower()
        with self._lock:
            if kind_name == "counter":
                self.values[name] = self.values.get(name, 0.0) + value
            else:
                self.values[name] = value
        if self._sink is not None:
            dims = _dims(dimensions)
            dims.setdefault("ModelName", self.model_name)
            ids = self.request_ids
            if ids:
                self._sink(name, value, unit, kind_name, dims, ",".join(ids.values()))
            else:
                self._sink(name, value, unit, kind_name, dims)

    def add_metric(self, name: str, value: float, unit: str = "", idx: Any = None,
                   dimensions: Any = None, metric_type: MetricTypes = MetricTypes.COUNTER) -> None:
        self._emit(name, value, unit, metric_type, dimensions)

    def add_counter(self, name: str, value: float, idx: Any = None, dimensions: Any = None) -> None:
        self._emit(name, value, "count", MetricTypes.COUNTER, dimensions)

    def add_time(self, name: str, value: float, idx: Any = None, unit: str = "ms",
                 dimensions: Any = None, metric_type: MetricTypes = MetricTypes.GAUGE) -> None:
        self._emit(name, value, unit, metric_type, dimensions)

    def add_size(self, name: str, value: float, idx: Any = None, unit: str = "MB",
                 dimensions: Any = None, metric_type: MetricTypes = MetricTypes.GAUGE) -> None:
        self._emit(name, value, unit, metric_type, dimensions)

    def add_percent(self, name: str, value: float, idx: Any = None, dimensions: Any = None,
                    metric_type: MetricTypes = MetricTypes.GAUGE) -> None:
        self._emit(name, value, "percent", metric_type, dimensions)

    # TorchServe's cache API, for handlers that declare metrics up front.
    def add_metric_to_cache(self, metric_name: str, unit: str = "", dimension_names: Any = None,
                            metric_type: MetricTypes = MetricTypes.COUNTER) -> "_Declared":
        return _Declared(self, metric_name, unit, metric_type)

    def get_metric(self, metric_name: str, metric_type: MetricTypes = MetricTypes.COUNTER) -> "_Declared":
        return _Declared(self, metric_name, "", metric_type)


class _Declared:
    def __init__(self, owner: HandlerMetrics, name: str, unit: str, kind: MetricTypes):
        self.owner, self.name, self.unit, self.kind = owner, name, unit, kind

    def add_or_update(self, value: float, dimension_values: Any = None, request_id: Any = None) -> None:
        self.owner._emit(self.name, value, self.unit, self.kind, None)

    def update(self, value: float, request_id: Any = None, dimensions: Any = None) -> None:
        self.owner._emit(self.name, value, self.unit, self.kind, dimensions)
