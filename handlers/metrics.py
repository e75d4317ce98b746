"""``context.metrics``: TorchServe's handler metrics API, forwarded to a sink.

Handlers call ``add_metric``, ``add_time``, ``add_size``, ``add_percent`` and
``add_counter`` as they do under TorchServe; each call becomes one
``sink(name, value, unit, kind, dimensions)`` call. The server's sink turns them into
Prometheus metrics; the default sink keeps the last value of each, for tests and tools.
"""

from __future__ import annotations

import enum
import logging
import threading
from typing import Any, Callable

__all__ = ["MetricTypes", "HandlerMetrics"]

log = logging.getLogger("osprey.handlers")


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
        self._declared: dict[str, _Declared] = {}  # add_metric_to_cache's, by name

    def _emit(self, name: str, value: float, unit: str, kind: MetricTypes, dimensions: Any) -> None:
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"metric {name}: value {value!r} is not a number") from None
        # this module's MetricTypes or TorchServe's own (ts.metrics.metric_type_enum), or a name
        kind_name = str(kind.value if isinstance(kind, enum.Enum) else kind).lower()
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
        declared = _Declared(self, metric_name, unit, metric_type, list(dimension_names or []))
        with self._lock:
            self._declared[metric_name] = declared
        return declared

    def get_metric(self, metric_name: str, metric_type: MetricTypes = MetricTypes.COUNTER) -> "_Declared":
        with self._lock:
            declared = self._declared.get(metric_name)
        return declared if declared is not None else _Declared(self, metric_name, "", metric_type, [])


class _Declared:
    """A metric declared with ``add_metric_to_cache``: its dimension names, given values later."""

    def __init__(self, owner: HandlerMetrics, name: str, unit: str, kind: MetricTypes, dimension_names: list):
        self.owner, self.name, self.unit, self.kind = owner, name, unit, kind
        self.dimension_names = [str(n) for n in dimension_names]
        self._warned = False

    def add_or_update(self, value: float, dimension_values: Any = None, request_id: Any = None) -> None:
        """TorchServe's: ``dimension_values`` in the order of the declared names."""
        values = list(dimension_values or [])
        if len(values) != len(self.dimension_names) and not self._warned:
            self._warned = True  # (a metric taken with get_metric without a declaration has no names)
            log.warning("metric %s: %d dimension values for the %d names declared (%s); the values without a "
                        "name are left out", self.name, len(values), len(self.dimension_names),
                        ", ".join(self.dimension_names) or "none")
        self.owner._emit(self.name, value, self.unit, self.kind, dict(zip(self.dimension_names, map(str, values))))

    def update(self, value: float, request_id: Any = None, dimensions: Any = None) -> None:
        self.owner._emit(self.name, value, self.unit, self.kind, dimensions)
