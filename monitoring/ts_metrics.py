"""TorchServe's default metric set beside Osprey's own: its frontend metrics (``Requests2XX``,
``Requests4XX``, ``Requests5XX``, ``QueueTime``, ``WorkerThreadTime``, ``WorkerLoadTime``) and
its system metrics (``CPUUtilization``, ``Memory*``, ``Disk*``, ``GPU*``), named, labelled and
typed as TorchServe 0.12 exposes them on ``/metrics`` (``Torchserve prometheus <type> metric
with unit: <unit>``), and, with ``metrics_mode=log``, written as its ``ts_metrics.log`` lines.

Which of them exist is the metrics configuration's say (:mod:`monitoring.ts_metrics_config`):
a metric left out of ``metrics_config`` is neither exported nor logged. The label names are
TorchServe's (its frontend fills them by position, so a configuration cannot rename them).

Costs: :meth:`TorchServeMetrics.http_response` (every HTTP answer on every port, as TorchServe
counts them) is one dict lookup and one addition; :meth:`~TorchServeMetrics.batch` (per batch)
two assignments; ``WorkerLoadTime`` and the system metrics are read at scrape time (and, in log
mode, every ``metric_time_interval`` seconds).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Iterable

from .families import Counter, Gauge
from .metrics_log import MetricsLog, ts_value
from .system_metrics import SYSTEM_METRICS, read_system_metrics
from .ts_metrics_config import MetricsConfig

__all__ = ["TorchServeMetrics", "ts_help", "worker_name"]

log = logging.getLogger("osprey.metrics.torchserve")

_HOST = ("Level", "Hostname")


def ts_help(kind: str, unit: str) -> str:
    return f"Torchserve prometheus {kind} metric with unit: {unit}"


def worker_name(model: str, version: str, instance: Any) -> str:
    """TorchServe's worker name, ``W-9000-model_1.0`` (9000 + the worker's number)."""
    return f"W-{getattr(instance, 'id', instance.index)}-{model}_{version}"


class TorchServeMetrics:
    def __init__(self, config: MetricsConfig, hostname: str, gpu: Any = None, metrics_log: MetricsLog | None = None,
                 system: bool = True):
        self.config = config
        self.hostname = hostname
        self.gpu = gpu
        self.log = metrics_log
        self.system = system
        self._timer: asyncio.Handle | None = None
        fams = {}
        for name, cls, labels in (("Requests2XX", Counter, _HOST), ("Requests4XX", Counter, _HOST),
                                  ("Requests5XX", Counter, _HOST), ("QueueTime", Gauge, _HOST),
                                  ("WorkerThreadTime", Gauge, _HOST)):
            spec = config.frontend(name)
            if spec is not None:
                fams[name] = cls(name, ts_help(cls.kind, spec.unit), labels, torchserve=True)
        self.families = fams
        host = ("Host", hostname)
        self._status = {k: fams[f"Requests{k}XX"].child(*host) if f"Requests{k}XX" in fams else None for k in (2, 4, 5)}
        self._queue_time = fams["QueueTime"].child(*host) if "QueueTime" in fams else None
        self._thread_time = fams["WorkerThreadTime"].child(*host) if "WorkerThreadTime" in fams else None
        # log lines: (name, unit) of each frontend metric, from the configuration
        self._units = {n: s.unit for n, s in config.ts_metrics.items()}

    def enabled(self, name: str) -> bool:
        return name in self.config.ts_metrics

    def unit(self, name: str) -> str:
        return self._units.get(name, "")

    # --- hot paths (event loop) ---------------------------------------------------------
    def http_response(self, status: int) -> None:
        """One HTTP answer, on any port (TorchServe counts them in NettyUtils.sendHttpResponse)."""
        k = 2 if 200 <= status < 300 else 4 if 400 <= status < 500 else 5 if status >= 500 else 0
        child = self._status.get(k)
        if child is not None:
            child[0] += 1
            if self.log is not None:
                name = f"Requests{k}XX"
                self.log.frontend(name, self._units[name], "1.0", "Level:Host")

    def batch(self, queue_ms: float, worker_ms: float) -> None:
        """One batch: how long its oldest request queued, and the time its instance spent
        outside the handler (TorchServe: whole milliseconds, as doubles)."""
        q, w = float(int(queue_ms)), float(int(worker_ms))
        if self._queue_time is not None:
            self._queue_time[0] = q
            if self.log is not None:
                self.log.frontend("QueueTime", self._units["QueueTime"], ts_value(q), "Level:Host")
        if self._thread_time is not None:
            self._thread_time[0] = w
            if self.log is not None:
                self.log.frontend("WorkerThreadTime", self._units["WorkerThreadTime"], ts_value(w), "Level:Host")

    def worker_loaded(self, model: str, version: str, instance: Any, seconds: float) -> None:
        """Log mode: a worker finished loading (WorkerLoadTime is read from the registry at scrape)."""
        if self.log is not None and self.enabled("WorkerLoadTime"):
            self.log.frontend("WorkerLoadTime", self.unit("WorkerLoadTime"), ts_value(float(int(seconds * 1000))),
                              f"WorkerName:{worker_name(model, version, instance)},Level:Host")

    # --- scrape ---------------------------------------------------------------------------
    def render(self, versions: Iterable[Any]) -> str:
        out = [f.render() for f in self.families.values()]
        spec = self.config.frontend("WorkerLoadTime")
        if spec is not None:
            g = Gauge("WorkerLoadTime", ts_help("gauge", spec.unit), ("WorkerName", "Level", "Hostname"), torchserve=True)
            for mv in versions:
                for inst in list(mv.instances):
                    seconds = getattr(inst, "load_seconds", None)
                    if seconds is not None:
                        g.child(worker_name(mv.name, mv.version, inst), "Host", self.hostname)[0] = float(int(seconds * 1000))
            out.append(g.render())
        out.append(self._render_system())
        return "".join(out)

    def _render_system(self) -> str:
        wanted = [n for n in SYSTEM_METRICS if self.enabled(n)]
        if not wanted:
            return ""
        fams = {}
        for n in wanted:
            labels = ("Level", "DeviceId", "Hostname") if n.startswith("GPU") else _HOST
            fams[n] = Gauge(n, ts_help("gauge", self.unit(n)), labels, torchserve=True)
        if self.system:
            for name, value, labels in self._read():
                fam = fams.get(name)
                if fam is not None:
                    fam.child(*(labels.get(k, self.hostname if k == "Hostname" else "") for k in fam.labelnames))[0] = value
        return "".join(f.render() for f in fams.values())

    def _read(self) -> list:
        try:
            return read_system_metrics(self.gpu)
        except Exception as exc:  # never fail a scrape over it
            log.warning("system metrics: %s", exc)
            return []

    # --- log mode: system metrics every metric_time_interval seconds -------------------------
    def start(self, loop: asyncio.AbstractEventLoop, interval: float, versions: Any = None) -> None:
        """Log mode: the system metrics every ``interval`` seconds, the first at once (TorchServe
        collects them on a fixed-rate schedule with no initial delay, so its tests find them in
        ts_metrics.log as soon as the server answers), and a WorkerLoadTime line for each worker
        that finished loading (looked for every second)."""
        if self.log is None:
            return
        logged: set = set()
        due = [loop.time()]

        def tick() -> None:
            if self.system and interval > 0 and loop.time() >= due[0]:
                due[0] = loop.time() + interval
                self.log_system()
            for mv in (versions() if versions is not None else ()):
                for inst in list(mv.instances):
                    seconds = getattr(inst, "load_seconds", None)
                    if seconds is not None and id(inst) not in logged:
                        logged.add(id(inst))
                        self.worker_loaded(mv.name, mv.version, inst, seconds)
            self._timer = loop.call_later(1.0, tick)
        self._timer = loop.call_soon(tick)  # before the server says it is ready

    def log_system(self) -> None:
        for name, value, labels in self._read():
            if self.enabled(name):
                dims = ",".join(f"{k}:{v}" for k, v in labels.items())
                self.log.frontend(name, self.unit(name), ts_value(value), dims)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
