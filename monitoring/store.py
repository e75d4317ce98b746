"""Where drift state lives: in this process (default) or in Redis (``monitoring.redis_store``).

The monitor's background thread is the only writer in a process; with Redis several
replicas write the same keys, so every operation that decides something (a window closing,
an episode opening, the baseline profile chosen) is one atomic step in the store, and every
replica reads the same state. Operations per version (model, version):

- ``add``: add one chunk of flat bin counts (``rows`` rows) to the current window; when the
  window reaches ``window`` rows, the call that crossed takes it (counts returned, window
  emptied) and only that caller scores it.
- ``close_due``: the same, for a window open ``window_seconds`` with >= ``min_window`` rows.
- ``commit``: read-modify-write of the episode state plus one history entry, atomically.
  ``update`` must not change the state it is given (it returns a new one).
- ``read``: (state, history, monitored rows) for status.

States and history entries are never changed once stored, only replaced, so the process
store hands out the objects it keeps, without copies; readers must not change them.
- ``baseline_rows`` / ``get_profile`` / ``put_profile``: a version without a profile counts
  baseline rows together and adopts the first profile published (first one wins).

Window counts are namespaced by the layout's fingerprint, so replicas on different profiles
never mix counts. A store raises :class:`StoreUnavailable` (with the reason) when it cannot
answer; callers buffer and report the monitoring degraded, serving never waits for it.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Callable, Protocol

import numpy as np

__all__ = ["StoreUnavailable", "Closed", "Store", "LocalStore", "HISTORY", "open_store"]

HISTORY = 200  # history entries kept per version

Update = Callable[[dict | None], tuple[dict, dict | None]]  # state -> (new state, history entry or None)


class StoreUnavailable(Exception):
    """The store cannot answer now (Redis down); the message says why."""


@dataclass(eq=False)
class Closed:
    """A window taken by the caller whose rows closed it."""

    counts: np.ndarray  # flat bin counts
    rows: int
    started: float
    ended: float | None = None  # set when taken (a commit retried later keeps the close time)


class Store(Protocol):
    redis: Any  # the Redis client (None in process), for parts that keep their own keys

    def key(self, model: str, version: str, *parts: str) -> str: ...

    def add(self, model: str, version: str, layout: str, length: int, counts: np.ndarray, rows: int,
            now: float, window: int) -> Closed | None: ...

    def close_due(self, model: str, version: str, layout: str, length: int, now: float,
                  window_seconds: float, min_window: int) -> Closed | None: ...

    def commit(self, model: str, version: str, update: Update) -> dict: ...

    def read(self, model: str, version: str) -> tuple[dict | None, list[dict], int]: ...

    def baseline_rows(self, model: str, version: str, add: int) -> int: ...

    def get_profile(self, model: str, version: str) -> dict | None: ...

    def put_profile(self, model: str, version: str, profile: dict) -> dict: ...

    def forget(self, model: str, version: str) -> None: ...

    def close(self) -> None: ...


def key(model: str, version: str, *parts: str) -> str:
    return ":".join(("osprey:mon", model, version, *parts))


@dataclass
class _Version:
    windows: dict[str, list]  # layout -> [counts, rows, started]
    state: dict | None = None
    history: list | None = None
    requests: int = 0
    baseline: int = 0
    profile: dict | None = None


class LocalStore:
    """The store of one process: dicts under one lock (status reads from other threads)."""

    redis = None

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._versions: dict[tuple[str, str], _Version] = {}

    def key(self, model: str, version: str, *parts: str) -> str:
        return key(model, version, *parts)

    def _v(self, model: str, version: str) -> _Version:
        v = self._versions.get((model, version))
        if v is None:
            v = self._versions[(model, version)] = _Version(windows={}, history=[])
        return v

    def _take(self, v: _Version, layout: str) -> Closed:
        counts, rows, started = v.windows.pop(layout)
        return Closed(counts, rows, started)

    def add(self, model, version, layout, length, counts, rows, now, window):
        with self._lock:
            v = self._v(model, version)
            w = v.windows.setdefault(layout, [np.zeros(length, dtype=np.int64), 0, now])
            w[0] += counts
            w[1] += int(rows)
            v.requests += int(rows)
            return self._take(v, layout) if w[1] >= window else None

    def close_due(self, model, version, layout, length, now, window_seconds, min_window):
        with self._lock:
            v = self._v(model, version)
            w = v.windows.get(layout)
            if w is None or w[1] < min_window or now - w[2] < window_seconds:
                return None
            return self._take(v, layout)

    def commit(self, model, version, update):
        with self._lock:
            v = self._v(model, version)
            state, entry = update(v.state)
            v.state = state
            if entry is not None:
                v.history = (v.history + [entry])[-HISTORY:]
            return state

    def read(self, model, version):
        with self._lock:
            v = self._v(model, version)
            return v.state, list(v.history), v.requests

    def baseline_rows(self, model, version, add):
        with self._lock:
            v = self._v(model, version)
            v.baseline += int(add)
            return v.baseline

    def get_profile(self, model, version):
        with self._lock:
            return self._v(model, version).profile

    def put_profile(self, model, version, profile):
        with self._lock:
            v = self._v(model, version)
            if v.profile is None:
                v.profile = profile
            return v.profile

    def forget(self, model, version):
        with self._lock:
            self._versions.pop((model, version), None)

    def close(self) -> None:
        pass


def open_store(redis_url: str) -> Store:
    """Redis when ``redis_url`` is set, else this process."""
    if redis_url:
        from .redis_store import RedisStore
        return RedisStore(redis_url)
    return LocalStore()
