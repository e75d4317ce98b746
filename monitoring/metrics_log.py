"""``metrics_mode=log``: TorchServe's metric log lines for ``ts_metrics.log`` and ``model_metrics.log``.

TorchServe (log4j2 pattern ``%d{ISO8601} - %m%n``) writes one line per metric event::

    2026-11-29T19:43:29,106 - Requests2XX.Count:1.0|#Level:Host|#hostname:vm,timestamp:1795981409
    2026-11-29T19:43:29,100 - PredictionTime.ms:0.51|#ModelName:tsm,Level:Model|#hostname:vm,requestID:<ids>,timestamp:1795981409

``name.Unit:value|#Dim:value,...|#hostname:HOST[,requestID:IDS],timestamp:EPOCH``; counters are
logged as the increment, gauges as the value. Osprey writes the same lines (units and dimensions
from the metrics configuration, see :mod:`monitoring.ts_metrics_config`).

Lines are appended to a deque (thread-safe: handler metrics come from instance threads) and
reach their file in one ``write(file, text)`` per file: when a request is done, before its answer
leaves (:meth:`MetricsLog.flush`, called by the request observer: its ts_inference_* lines, the
batch's QueueTime/WorkerThreadTime and the handler's model metrics are then in the files, as
TorchServe, which writes each line as it is logged, has them when its answer arrives), about every
``flush_every`` seconds for the rest (system metrics, Requests2XX/4XX/5XX, which are counted as
an answer is sent) and when the server stops. ``write`` is the server's log files'
``write_now`` (server/log_files.py): the write happens before it returns.
"""

from __future__ import annotations

import asyncio
import collections
import time
from typing import Callable

__all__ = ["MetricsLog", "iso8601", "ts_value"]

TS_METRICS, MODEL_METRICS = "ts_metrics", "model_metrics"

_second_cache: list = [-1, ""]


def iso8601(now: float) -> str:
    """log4j2's ``%d{ISO8601}``: local time, ``2026-11-29T19:43:29,106``."""
    sec = int(now)
    if _second_cache[0] != sec:
        _second_cache[0], _second_cache[1] = sec, time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(sec))
    return f"{_second_cache[1]},{int((now - sec) * 1000):03d}"


def ts_value(value: float) -> str:
    """A value as TorchServe's Java frontend prints a double (``1.0``, ``0.25``)."""
    v = float(value)
    return repr(v) if v != int(v) or abs(v) >= 1e16 else f"{int(v)}.0"


class MetricsLog:
    def __init__(self, hostname: str, write: Callable[[str, str], None], flush_every: float = 0.5):
        self.hostname = hostname
        self._write = write
        self.flush_every = flush_every
        self._lines: dict[str, collections.deque] = {TS_METRICS: collections.deque(), MODEL_METRICS: collections.deque()}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._timer = loop.call_later(self.flush_every, self._tick)

    def frontend(self, name: str, unit: str, value: str, dims: str) -> None:
        """A ts_metrics.log line; ``dims`` is ``Dim:value,...`` (pre-built by the caller)."""
        now = time.time()
        self._lines[TS_METRICS].append(
            f"{iso8601(now)} - {name}.{unit}:{value}|#{dims}|#hostname:{self.hostname},timestamp:{int(now)}\n")

    def model(self, name: str, unit: str, value: str, dims: str, request_ids: str) -> None:
        """A model_metrics.log line."""
        now = time.time()
        self._lines[MODEL_METRICS].append(
            f"{iso8601(now)} - {name}.{unit}:{value}|#{dims}|#hostname:{self.hostname},"
            f"requestID:{request_ids},timestamp:{int(now)}\n")

    def _tick(self) -> None:
        self.flush()
        if self._loop is not None and not self._loop.is_closed():
            self._timer = self._loop.call_later(self.flush_every, self._tick)

    def flush(self) -> None:
        for file, lines in self._lines.items():
            if lines:
                parts = []
                try:
                    while True:
                        parts.append(lines.popleft())
                except IndexError:
                    pass
                self._write(file, "".join(parts))

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.flush()
