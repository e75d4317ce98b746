"""Where one version's quality state lives: the prediction log (request id -> the model's
outputs, kept ``feedback_ttl`` seconds, at most ``max_predictions``), the window of labelled
predictions, the closed quality windows, the counters and the version's output meta (task,
classes).

:class:`MemoryStore` keeps it in this process (the default: nothing to install).
:class:`RedisStore` keeps it in Redis (setting ``redis_url``), so a label is joined whichever
replica receives it and every replica reports the same quality. Both are synchronous and
thread-safe; Redis calls are made from the monitor's background thread or a worker thread,
never from the event loop. A Redis failure raises :class:`StoreUnavailable`.

Joining is a claim: the prediction is read, the label checked against it, and only then
deleted; whoever deletes it (``DEL`` answers 1) owns the join, so a label sent twice, to
two replicas at once or twice in one request, is joined once and the other is unmatched.
"""

from __future__ import annotations

import threading
from collections import deque
from itertools import repeat
from typing import Any, Protocol

import orjson

__all__ = ["QualityStore", "MemoryStore", "RedisStore", "StoreUnavailable", "redis_client"]

HISTORY = 200  # closed quality windows kept
COMPACT_SLACK = 4096  # ids of rows gone that the prediction log's put entries may hold beyond its rows


class StoreUnavailable(Exception):
    """The shared store (Redis) cannot be reached; the message says which and why."""


class QualityStore(Protocol):
    kind: str

    def put(self, rows: list[tuple[str, bytes]], now: float, expires: float, max_rows: int) -> None: ...
    def get(self, rids: list[str], now: float) -> list[bytes | None]: ...
    def claim(self, rids: list[str]) -> list[bool]: ...
    def add_labelled(self, entries: list[bytes], window: int) -> int: ...
    def labelled(self) -> list[bytes]: ...
    def add_counts(self, counts: dict[str, int]) -> None: ...
    def counts(self) -> dict[str, int]: ...
    def kept(self, now: float) -> int: ...
    def push_history(self, entry: dict, limit: int = HISTORY) -> None: ...
    def history(self) -> list[dict]: ...
    def set_meta(self, meta: dict) -> None: ...
    def get_meta(self) -> dict | None: ...
    def clear(self) -> None: ...


class MemoryStore:
    """In this process. The prediction log is a plain dict (request id -> (expires, row)) whose
    insertion order is the rows' age, and the ids of each ``put`` in order: inserting is one
    C-level ``update`` per put, and the oldest rows go put by put (an OrderedDict, before, cost
    0.50-0.56 us a row at its bound against 0.36-0.40, and keeps a linked node per row). Each
    put's ``expires`` is one float object of its own, shared by its rows: a row is removed with
    its put only while its entry still holds that object (not claimed meanwhile, not predicted
    again later). Ids whose rows left that way stay in their put's entry until it goes; when
    such ids outnumber the rows kept, the entries are rebuilt from the rows (:meth:`_compact`),
    so memory follows the rows kept, whatever the share of labelled or repeated ids."""

    kind = "memory"

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pred: dict[str, tuple[float, bytes]] = {}  # rid -> (expires, row), oldest first
        # [ids, expires, start] of each put, oldest first: ids[start:] may still be held as its
        self._order: deque[list] = deque()
        self._order_ids = 0  # ids in those entries (from their start)
        self._labelled: deque[bytes] = deque()
        self._labels_total = 0
        self._counts = {"matched": 0, "unmatched": 0, "invalid": 0}
        self._history: deque[dict] = deque(maxlen=HISTORY)
        self._meta: dict | None = None

    def _drop(self, entry: list, limit: int | None = None) -> None:
        """Remove the rows of the put ``entry`` still held as that put's, oldest first (at most
        ``limit``), and move its start past the ids looked at."""
        pred = self._pred
        ids, expires, start = entry
        removed, k = 0, start
        for k in range(start, len(ids)):
            if limit is not None and removed >= limit:
                break
            rid = ids[k]
            item = pred.get(rid)
            if item is not None and item[0] is expires:
                del pred[rid]
                removed += 1
        else:
            k = len(ids)
        self._order_ids -= k - start
        entry[2] = k

    def _expire(self, now: float) -> None:
        order = self._order
        while order and order[0][1] <= now:
            self._drop(order.popleft())

    def _compact(self) -> None:
        """Rebuild the puts' entries from the rows kept (consecutive rows of one ``expires``
        object are one put's): O(rows kept), when the entries hold over twice as many ids."""
        order: deque[list] = deque()
        ids: list[str] = []
        current = None
        for rid, (expires, _) in self._pred.items():
            if expires is not current:
                if ids:
                    order.append([tuple(ids), current, 0])
                ids, current = [], expires
            ids.append(rid)
        if ids:
            order.append([tuple(ids), current, 0])
        self._order, self._order_ids = order, len(self._pred)

    def put(self, rows, now, expires, max_rows):
        if not rows:
            return
        ids, blobs = zip(*rows)
        expires = float(expires) + 0.0  # a float object of this put's own (see the class doc)
        with self._lock:
            pred = self._pred
            before = len(pred)
            pred.update(zip(ids, zip(repeat(expires), blobs)))
            if len(pred) - before != len(ids):  # an id seen again, or twice in this put (rare):
                for rid in dict.fromkeys(ids):  # the put's ids at the end, each its newest prediction
                    pred[rid] = pred.pop(rid)
            order = self._order
            order.append([ids, expires, 0])
            self._order_ids += len(ids)
            excess = len(pred) - max_rows
            while excess > 0 and order:  # the oldest rows beyond the bound
                entry = order[0]
                before = len(pred)
                self._drop(entry, excess)
                excess -= before - len(pred)
                if entry[2] >= len(entry[0]):
                    order.popleft()
            self._expire(now)
            if self._order_ids > 2 * len(pred) + COMPACT_SLACK:
                self._compact()

    def get(self, rids, now):
        with self._lock:
            out = []
            for rid in rids:
                item = self._pred.get(rid)
                out.append(item[1] if item is not None and item[0] > now else None)
            return out

    def claim(self, rids):
        with self._lock:
            return [self._pred.pop(rid, None) is not None for rid in rids]

    def add_labelled(self, entries, window):
        with self._lock:
            self._labelled.extend(entries)
            while len(self._labelled) > window:
                self._labelled.popleft()
            self._labels_total += len(entries)
            return self._labels_total

    def labelled(self):
        with self._lock:
            return list(self._labelled)

    def add_counts(self, counts):
        with self._lock:
            for k, v in counts.items():
                if v:
                    self._counts[k] = self._counts.get(k, 0) + v

    def counts(self):
        with self._lock:
            return {**self._counts, "labels_total": self._labels_total}

    def kept(self, now):
        with self._lock:
            self._expire(now)
            return len(self._pred)

    def push_history(self, entry, limit=HISTORY):
        with self._lock:
            self._history.append(entry)

    def history(self):
        with self._lock:
            return list(self._history)

    def set_meta(self, meta):
        with self._lock:
            self._meta = dict(meta)

    def get_meta(self):
        with self._lock:
            return self._meta

    def clear(self):
        with self._lock:
            self._pred.clear()
            self._order.clear()
            self._order_ids = 0
            self._labelled.clear()


_CLIENTS: dict[str, Any] = {}
_CLIENTS_LOCK = threading.Lock()


def redis_client(url: str, timeout: float = 0.5):
    """One redis-py client (and connection pool) per URL for the whole process."""
    with _CLIENTS_LOCK:
        client = _CLIENTS.get(url)
        if client is None:
            import redis

            client = _CLIENTS[url] = redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout,
                                                          retry_on_timeout=False)
        return client


def _show_url(url: str) -> str:
    """The URL without a password."""
    if "@" in url:
        scheme, _, rest = url.partition("://")
        return f"{scheme}://***@{rest.rpartition('@')[2]}"
    return url


class RedisStore:
    """In Redis, under ``osprey:quality:{model}:{version}:``:

    - ``p:{request id}``: one prediction (string, expires after the TTL);
    - ``idx``: sorted set of kept request ids by expiry time, trimmed to ``max_predictions`` (the
      oldest ids and their keys are dropped) and of expired ids;
    - ``labelled``: list of the last ``quality_window`` labelled predictions;
    - ``counts``: hash matched / unmatched / invalid / labels_total;
    - ``history``: list of closed quality windows (last 200); ``meta``: task and classes.
    """

    kind = "redis"

    def __init__(self, url: str, model: str, version: str, client: Any = None):
        self.url = url
        self.client = client if client is not None else redis_client(url)
        self.prefix = f"osprey:quality:{model}:{version}:"
        self._idx = self.prefix + "idx"
        self._labelled_key = self.prefix + "labelled"
        self._counts_key = self.prefix + "counts"
        self._history_key = self.prefix + "history"
        self._meta_key = self.prefix + "meta"

    def _run(self, fn):
        import redis

        try:
            return fn()
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError) as exc:
            raise StoreUnavailable(f"Redis at {_show_url(self.url)} is unavailable ({type(exc).__name__}: "
                                   f"{str(exc)[:200]})") from None
        except redis.exceptions.RedisError as exc:
            raise StoreUnavailable(f"Redis at {_show_url(self.url)} answered an error ({str(exc)[:200]})") from None

    def _key(self, rid: str) -> str:
        return self.prefix + "p:" + rid

    def put(self, rows, now, expires, max_rows):
        if not rows:
            return
        expires_ms = int(expires * 1000)

        def go():
            pipe = self.client.pipeline(transaction=False)
            for rid, row in rows:
                pipe.set(self._key(rid), row, pxat=expires_ms)
            pipe.zadd(self._idx, {rid: expires for rid, _ in rows})  # scored by expiry: oldest first
            pipe.zremrangebyscore(self._idx, "-inf", now)  # expired
            pipe.zcard(self._idx)
            card = pipe.execute()[-1]
            if card > max_rows:
                old = self.client.zpopmin(self._idx, card - max_rows)
                if old:
                    self.client.delete(*(self._key(rid.decode() if isinstance(rid, bytes) else rid) for rid, _ in old))
        self._run(go)

    def get(self, rids, now):
        if not rids:
            return []
        return self._run(lambda: self.client.mget([self._key(r) for r in rids]))

    def claim(self, rids):
        if not rids:
            return []

        def go():
            pipe = self.client.pipeline(transaction=False)
            for rid in rids:
                pipe.delete(self._key(rid))
            pipe.zrem(self._idx, *rids)
            return [bool(n) for n in pipe.execute()[:-1]]
        return self._run(go)

    def add_labelled(self, entries, window):
        if not entries:
            return self.counts()["labels_total"]

        def go():
            pipe = self.client.pipeline(transaction=True)
            pipe.rpush(self._labelled_key, *entries)
            pipe.ltrim(self._labelled_key, -window, -1)
            pipe.hincrby(self._counts_key, "labels_total", len(entries))
            return int(pipe.execute()[-1])
        return self._run(go)

    def labelled(self):
        return self._run(lambda: self.client.lrange(self._labelled_key, 0, -1))

    def add_counts(self, counts):
        counts = {k: v for k, v in counts.items() if v}
        if not counts:
            return

        def go():
            pipe = self.client.pipeline(transaction=False)
            for k, v in counts.items():
                pipe.hincrby(self._counts_key, k, v)
            pipe.execute()
        self._run(go)

    def counts(self):
        raw = self._run(lambda: self.client.hgetall(self._counts_key))
        out = {"matched": 0, "unmatched": 0, "invalid": 0, "labels_total": 0}
        for k, v in raw.items():
            out[k.decode() if isinstance(k, bytes) else k] = int(v)
        return out

    def kept(self, now):
        return int(self._run(lambda: self.client.zcard(self._idx)) or 0)

    def push_history(self, entry, limit=HISTORY):
        def go():
            pipe = self.client.pipeline(transaction=False)
            pipe.rpush(self._history_key, orjson.dumps(entry))
            pipe.ltrim(self._history_key, -limit, -1)
            pipe.execute()
        self._run(go)

    def history(self):
        return [orjson.loads(x) for x in self._run(lambda: self.client.lrange(self._history_key, 0, -1))]

    def set_meta(self, meta):
        self._run(lambda: self.client.set(self._meta_key, orjson.dumps(meta)))

    def get_meta(self):
        raw = self._run(lambda: self.client.get(self._meta_key))
        return orjson.loads(raw) if raw else None

    def clear(self):
        """Nothing: the shared state belongs to every replica (keys expire on their own)."""

