"""The drift store in Redis, shared by the replicas behind one load balancer.

Keys (``osprey:mon:{model}:{version}:...``):
- ``win:{layout}``  hash: the current window's bin counts (field = flat slot), ``_rows``, ``_start``
- ``requests``      monitored rows, all replicas
- ``state``         the episode state and the last window's scores (JSON)
- ``history``       list of window entries (JSON), newest last, trimmed to ``HISTORY``
- ``baseline``      baseline rows counted; ``profile`` the baseline profile (SET NX: first wins)

Replicas add their counts with HINCRBY inside one Lua script that also counts the rows and,
when the window is full, reads and deletes it in the same atomic step: exactly one replica
(the one whose increment crossed ``window``) gets the window and scores it. Counts are
integers, so windows merge exactly whatever the order of increments. Episode state is
updated with WATCH/MULTI (optimistic, retried), so two replicas closing consecutive windows
do not lose an update. The sync client is used from the monitor's background thread only
(plus the feedback part's thread); short timeouts and no retries make a dead Redis fail
fast, and the caller buffers. Scripts assume a single Redis (not Cluster): the window key
and the requests key sit in one script.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import redis
from redis.exceptions import RedisError, WatchError

from .store import HISTORY, Closed, StoreUnavailable, key

__all__ = ["RedisStore"]

_ADD = """
for i = 4, #ARGV, 2 do redis.call('HINCRBY', KEYS[1], ARGV[i], ARGV[i + 1]) end
redis.call('HSETNX', KEYS[1], '_start', ARGV[3])
local rows = redis.call('HINCRBY', KEYS[1], '_rows', ARGV[2])
redis.call('INCRBY', KEYS[2], ARGV[2])
if rows >= tonumber(ARGV[1]) then
  local all = redis.call('HGETALL', KEYS[1])
  redis.call('DEL', KEYS[1])
  return all
end
return false
"""

_CLOSE_DUE = """
local rows = tonumber(redis.call('HGET', KEYS[1], '_rows') or '0')
local start = tonumber(redis.call('HGET', KEYS[1], '_start') or ARGV[1])
if rows >= tonumber(ARGV[3]) and rows > 0 and tonumber(ARGV[1]) - start >= tonumber(ARGV[2]) then
  local all = redis.call('HGETALL', KEYS[1])
  redis.call('DEL', KEYS[1])
  return all
end
return false
"""


def _closed(flat: list, length: int) -> Closed:
    counts = np.zeros(length, dtype=np.int64)
    rows, started = 0, 0.0
    for field, value in zip(flat[::2], flat[1::2]):
        f = field.decode() if isinstance(field, bytes) else str(field)
        if f == "_rows":
            rows = int(value)
        elif f == "_start":
            started = float(value)
        elif 0 <= int(f) < length:
            counts[int(f)] = int(value)
    return Closed(counts, rows, started)


def _why(e: Exception) -> str:
    return f"Redis unavailable: {type(e).__name__}: {e}"


class RedisStore:
    def __init__(self, url: str, timeout: float = 1.0):
        self.url = url
        self.redis = redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout,
                                          retry=None, health_check_interval=0)
        self._add = self.redis.register_script(_ADD)
        self._close_due = self.redis.register_script(_CLOSE_DUE)

    def key(self, model: str, version: str, *parts: str) -> str:
        return key(model, version, *parts)

    def add(self, model, version, layout, length, counts, rows, now, window):
        slots = np.flatnonzero(counts)
        args: list[Any] = [int(window), int(rows), repr(float(now))]
        for s in slots:
            args += [int(s), int(counts[s])]
        try:
            got = self._add(keys=[key(model, version, "win", layout), key(model, version, "requests")], args=args)
        except RedisError as e:
            raise StoreUnavailable(_why(e)) from None
        return _closed(got, length) if got else None

    def close_due(self, model, version, layout, length, now, window_seconds, min_window):
        try:
            got = self._close_due(keys=[key(model, version, "win", layout)],
                                  args=[repr(float(now)), repr(float(window_seconds)), int(min_window)])
        except RedisError as e:
            raise StoreUnavailable(_why(e)) from None
        return _closed(got, length) if got else None

    def commit(self, model, version, update):
        skey, hkey = key(model, version, "state"), key(model, version, "history")
        try:
            with self.redis.pipeline() as pipe:
                while True:
                    try:
                        pipe.watch(skey)
                        raw = pipe.get(skey)
                        state, entry = update(json.loads(raw) if raw else None)
                        pipe.multi()
                        pipe.set(skey, json.dumps(state))
                        if entry is not None:
                            pipe.rpush(hkey, json.dumps(entry))
                            pipe.ltrim(hkey, -HISTORY, -1)
                        pipe.execute()
                        return state
                    except WatchError:
                        continue
        except RedisError as e:
            raise StoreUnavailable(_why(e)) from None

    def read(self, model, version):
        try:
            with self.redis.pipeline(transaction=False) as pipe:
                pipe.get(key(model, version, "state"))
                pipe.lrange(key(model, version, "history"), 0, -1)
                pipe.get(key(model, version, "requests"))
                raw, history, requests = pipe.execute()
        except RedisError as e:
            raise StoreUnavailable(_why(e)) from None
        return (json.loads(raw) if raw else None), [json.loads(h) for h in history], int(requests or 0)

    def baseline_rows(self, model, version, add):
        try:
            return int(self.redis.incrby(key(model, version, "baseline"), int(add)))
        except RedisError as e:
            raise StoreUnavailable(_why(e)) from None

    def get_profile(self, model, version):
        try:
            raw = self.redis.get(key(model, version, "profile"))
        except RedisError as e:
            raise StoreUnavailable(_why(e)) from None
        return json.loads(raw) if raw else None

    def put_profile(self, model, version, profile):
        from .drift.profile import dumps
        k = key(model, version, "profile")
        try:
            if self.redis.set(k, dumps(profile), nx=True):
                return profile
            return json.loads(self.redis.get(k))
        except RedisError as e:
            raise StoreUnavailable(_why(e)) from None

    def forget(self, model, version):
        """Shared keys stay: other replicas may still serve the version."""

    def close(self) -> None:
        try:
            self.redis.close()
        except RedisError:
            pass
