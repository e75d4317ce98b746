"""Access log: one JSON line per finished inference request, off, on or sampled.

``Settings.access_log`` is ``off`` (default), ``on`` or ``sample:<fraction>`` (for example
``sample:0.01`` logs about one request in a hundred). A line holds the time (UTC), request
id, model, version, protocol, status, error kind (on failures) and the queue, inference and
total milliseconds::

    {"ts":"2025-01-01T12:00:00.123Z","request_id":"...","model":"mlp","version":"1.0",
     "protocol":"rest","status":200,"queue_ms":0.41,"inference_ms":2.03,"total_ms":2.9}

Lines go to ``Settings.access_log_file`` (appended) or, when that is empty, to standard
output. The log is a data plane observer running on the event loop: it writes into a
buffer that is flushed about once a second and when the server stops, so a request never
waits on the disk.
"""

from __future__ import annotations

import asyncio
import random
import sys
import time
from typing import Any, BinaryIO

import orjson

__all__ = ["AccessLog", "parse_access_log"]


def parse_access_log(value: str) -> float:
    """``off`` -> 0, ``on`` -> 1, ``sample:<fraction>`` -> fraction in (0, 1]."""
    v = (value or "off").strip().lower()
    if v in ("off", "false", "0", "no", ""):
        return 0.0
    if v in ("on", "true", "1", "yes"):
        return 1.0
    if v.startswith("sample:"):
        try:
            f = float(v[7:])
        except ValueError:
            f = -1.0
        if 0.0 < f <= 1.0:
            return f
    raise ValueError(f"setting access_log: {value!r} must be off, on or sample:<fraction in (0, 1]>")


def _iso(now: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1000):03d}Z"


class AccessLog:
    """A data plane observer ``(model_version | None, request, outcome)``."""

    def __init__(self, fraction: float, stream: BinaryIO | None = None, *, path: str = "",
                 loop: asyncio.AbstractEventLoop | None = None, flush_every: float = 1.0):
        self.fraction = fraction
        self._own = False
        if stream is None:
            if path:
                stream = open(path, "ab", buffering=1 << 16)
                self._own = True
            else:
                stream = sys.stdout.buffer
        self.stream = stream
        self.flush_every = flush_every
        self._loop = loop
        self._timer: asyncio.TimerHandle | None = None
        self._dirty = False

    @classmethod
    def from_settings(cls, settings: Any, loop: asyncio.AbstractEventLoop | None = None) -> "AccessLog | None":
        fraction = parse_access_log(settings.access_log)
        if fraction <= 0:
            return None
        return cls(fraction, path=getattr(settings, "access_log_file", ""), loop=loop)

    def __call__(self, mv: Any, ticket: Any, outcome: Any) -> None:
        if self.fraction < 1.0 and random.random() >= self.fraction:
            return
        t = ticket.timings
        req = ticket.request
        now = time.monotonic()
        status = getattr(outcome, "status", 500)
        record = {
            "ts": _iso(time.time()),
            "request_id": req.request_id,
            "model": req.model,
            "version": mv.version if mv is not None else (req.version or ""),
            "protocol": req.protocol,
            "status": status,
        }
        kind = getattr(outcome, "kind", None)
        if kind is not None:
            record["error"] = kind.value
        record["queue_ms"] = round(t.queue * 1000.0, 3)
        record["inference_ms"] = round(t.inference * 1000.0, 3)
        record["total_ms"] = round((now - t.received) * 1000.0, 3) if t.received else 0.0
        self.stream.write(orjson.dumps(record) + b"\n")
        self._schedule()

    def _schedule(self) -> None:
        self._dirty = True
        if self._timer is None:
            loop = self._loop
            if loop is None:
                try:
                    loop = self._loop = asyncio.get_running_loop()
                except RuntimeError:
                    self.flush()
                    return
            self._timer = loop.call_later(self.flush_every, self._tick)

    def _tick(self) -> None:
        self._timer = None
        self.flush()

    def flush(self) -> None:
        if self._dirty:
            self._dirty = False
            try:
                self.stream.flush()
            except (OSError, ValueError):  # closed or full disk: never fail a request over it
                pass

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.flush()
        if self._own:
            self.stream.close()
