"""Labelled production data for retraining: inputs held until their labels come, then kept.

For a model with a ``retraining:`` section, every answered request's inputs (what its handler
received: the TorchServe fields decoded as TorchServe decodes them -- JSON as the object, text
as str, anything else as bytes --, or the Open Inference tensors) are *held* under the
request id for ``monitoring.feedback_ttl``; a feedback label for that id *joins* it, and the
pair becomes a row of the model's training data::

    {"rid": str, "ts": float, "version": str, "inputs": {name: bytes | str | JSON value | numpy array},
     "label": ...}

``hold`` is the request side (the data plane's observer, on the event loop): a ``deque.append``
of a reference to the request, nothing copied. ``process`` (the monitor's background thread)
keeps each held request's inputs as they arrived (bytes and content type, or tensors; pickled
only for Redis) and stores them; ``join`` (the feedback path, a worker thread) decodes the
labelled ones as the handler got them and moves them into the rows: most requests never get a
label, so nothing is decoded or pickled for them in memory. :func:`read_rows` is what a
training job reads, in the server's child process or on a worker machine.

Where it lives: without Redis, held inputs are in this process (bounded by count and bytes per
model, oldest dropped first) and rows in an append-only pickle file per model in the server's
state folder (setting ``state_dir``, by default the model store's ``.osprey``:
``datasets/MODEL.pkl``, trimmed to ``retraining.max_rows``). With Redis
(``redis_url``), held inputs are keys with the TTL (so a label sent to any replica joins) and
rows one capped list per model, so every replica and every worker read the same data. Redis down:
holds are dropped and counted (serving never waits), rows already kept stay.

The rows are pickled by this server and read by its own jobs (same trust as the model store).
"""

from __future__ import annotations

import logging
import os
import pickle
import random
import threading
import time
from collections import OrderedDict, deque
from itertools import repeat
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from server.core.capture import FeedbackItem, HeldInputs, held_inputs, retraining_holds
from server.core.codecs import decode_field
from server.core.types import Field

__all__ = ["LabelledData", "read_rows", "dataset_path", "MAX_HELD"]

log = logging.getLogger("osprey.monitoring.dataset")

MAX_HELD = 20_000  # requests waiting in the hand-over deque before new ones are dropped (counted)
_PREFIX = "osprey:dataset"


def dataset_path(root: str | os.PathLike, model: str, state_dir: str | os.PathLike | None = None) -> Path:
    """The rows file of ``model``: ``datasets/`` in ``state_dir``, by default the model store
    ``root``'s ``.osprey``."""
    return (Path(state_dir) if state_dir else Path(root) / ".osprey") / "datasets" / f"{model}.pkl"


def _decoded(raw: dict[str, Any]) -> dict[str, Any]:
    """Held inputs as the handler got them (when a label joins them, not per request): fields
    decoded as TorchServe decodes them -- JSON as the object, text as str, anything else as
    bytes --, tensors as they are. Raw bytes would lose the content type, and a JSON text request
    (``{"text": ...}``) replayed as bytes would reach a text handler as that JSON text."""
    out = {}
    for name, value in raw.items():
        if isinstance(value, tuple):
            value = decode_field(Field(value[0], value[1]))
            value = bytes(value) if isinstance(value, (bytearray, memoryview)) else value
        out[name] = value
    return out


class _Held:
    """Held inputs of one model in this process: rid -> (expires, version, (ts, raw inputs), size).
    Kept as they arrived; decoded only when a label joins them."""

    def __init__(self) -> None:
        self.items: OrderedDict[str, tuple[float, str, Any, int]] = OrderedDict()
        self.bytes = 0

    def put(self, rid: str, expires: float, version: str, held: Any, size: int, max_count: int,
            max_bytes: int) -> int:
        old = self.items.pop(rid, None)
        if old is not None:
            self.bytes -= old[3]
        self.items[rid] = (expires, version, held, size)
        self.bytes += size
        dropped = 0
        while self.items and (len(self.items) > max_count or self.bytes > max_bytes):
            _, (_, _, _, n) = self.items.popitem(last=False)
            self.bytes -= n
            dropped += 1
        return dropped

    def put_many(self, rids: list[str], values: list, sizes: list[int], expires: float, version: str,
                 max_count: int, max_bytes: int) -> int:
        """:meth:`put` for a batch: one C-level update (a Python call per request cost about a
        fifth of the monitor's time on an image model with retraining)."""
        items = self.items
        if not items.keys().isdisjoint(rids) or len(set(rids)) != len(rids):  # ids seen again (rare)
            return sum(self.put(r, expires, version, v, n, max_count, max_bytes) for r, v, n in zip(rids, values, sizes))
        items.update(zip(rids, zip(repeat(expires), repeat(version), values, sizes)))
        self.bytes += sum(sizes)
        dropped = 0
        while items and (len(items) > max_count or self.bytes > max_bytes):
            _, (_, _, _, n) = items.popitem(last=False)
            self.bytes -= n
            dropped += 1
        return dropped

    def take(self, rid: str, now: float) -> tuple[str, Any] | None:
        item = self.items.pop(rid, None)
        if item is None:
            return None
        self.bytes -= item[3]
        return None if item[0] < now else (item[1], item[2])

    def expire(self, now: float) -> None:
        while self.items:
            rid, (expires, _, _, n) = next(iter(self.items.items()))
            if expires >= now:
                break
            self.items.popitem(last=False)
            self.bytes -= n


class LabelledData:
    """Held inputs and labelled rows for every model with ``retraining`` (see the module doc).

    ``root`` is the model store and ``state_dir`` the server's state folder (rows files go under
    it; default ``root/.osprey``); ``redis`` a Redis client or None."""

    def __init__(self, root: str | os.PathLike, redis: Any = None, clock=time.time, rng: random.Random | None = None,
                 state_dir: str | os.PathLike | None = None):
        self.root, self.redis, self.clock = Path(root), redis, clock
        self.state_dir = state_dir
        self._rng = rng or random.Random()
        self._queue: deque = deque()
        self._held: dict[str, _Held] = {}
        self._lock = threading.Lock()  # process / join / rows-file writes
        self.dropped = 0  # holds dropped: hand-over full, over the bounds, or Redis down
        self.rows_added: dict[str, int] = {}

    # -- request side (event loop) ------------------------------------------------------------
    def hold(self, model_version: Any, request: Any) -> None:
        """Keep a reference to an answered request of a model with retraining: O(1)."""
        if not retraining_holds(model_version.config.retraining, self._rng):
            return
        if len(self._queue) >= MAX_HELD:
            self.dropped += 1
            return
        self._queue.append((model_version.name, model_version.version, model_version.config, request, self.clock()))

    def hold_inputs(self, model_version: Any, inputs: list[HeldInputs], ts: float | None = None) -> None:
        """Inputs already taken out of their requests (a process instance's child, for a monitor
        in its own process): kept as ``hold`` keeps a request's. ``capture_share`` was applied
        where they were taken."""
        cfg = model_version.config.retraining
        if cfg is None or not cfg.enabled:
            return
        ts = self.clock() if ts is None else ts
        for item in inputs:
            if len(self._queue) >= MAX_HELD:
                self.dropped += 1
                continue
            self._queue.append((model_version.name, model_version.version, model_version.config, item, ts))

    # -- background thread -----------------------------------------------------------------------
    def pending(self) -> int:
        return len(self._queue)

    def process(self) -> None:
        """Store what ``hold`` queued (the monitor's background thread, and before a join)."""
        with self._lock:
            batch = []
            while True:
                try:
                    batch.append(self._queue.popleft())
                except IndexError:
                    break
            if not batch:
                return
            now = self.clock()
            pipe = self.redis.pipeline(transaction=False) if self.redis is not None else None
            groups: dict[tuple[str, str], tuple[Any, list, list, list]] = {}  # in memory: one put per version
            for model, version, config, request, ts in batch:
                try:
                    held = request if type(request) is HeldInputs else held_inputs(request)
                    if pipe is not None:  # Redis holds bytes: pickled, still undecoded
                        blob = pickle.dumps({"ts": ts, "raw": held.raw}, protocol=5)
                except Exception as exc:  # an input that cannot be kept is not worth failing anything
                    log.warning("event=dataset_hold_failed model=%s reason=%s", model, exc)
                    self.dropped += 1
                    continue
                if pipe is not None:
                    ttl = float(config.monitoring.feedback_ttl)
                    pipe.set(f"{_PREFIX}:held:{model}:{held.request_id}", version.encode() + b"\0" + blob,
                             px=max(int(ttl * 1000), 1))
                    continue
                group = groups.get((model, version))
                if group is None:
                    group = groups[(model, version)] = (config, [], [], [])
                group[1].append(held.request_id)
                group[2].append((ts, held.raw))
                group[3].append(held.size)
            for (model, version), (config, rids, values, sizes) in groups.items():
                kept = self._held.get(model)
                if kept is None:
                    kept = self._held[model] = _Held()
                cfg = config.retraining
                self.dropped += kept.put_many(rids, values, sizes, now + float(config.monitoring.feedback_ttl), version,
                                              cfg.max_held, int(cfg.max_held_mb * 1024 * 1024))
            if pipe is not None:
                try:
                    pipe.execute()
                except Exception as exc:
                    self.dropped += len(batch)
                    log.warning("event=dataset_redis_down dropped=%d reason=%s", len(batch), exc)
            else:
                for held in self._held.values():
                    held.expire(now)

    def join(self, model: str, version: str | None, items: Sequence[FeedbackItem], max_rows: int) -> int:
        """Labels for held inputs become rows; returns how many joined (a worker thread)."""
        self.process()
        now = self.clock()
        rows = []
        if self.redis is not None:
            keys = [f"{_PREFIX}:held:{model}:{it.request_id}" for it in items]
            try:
                pipe = self.redis.pipeline(transaction=False)
                for k in keys:
                    pipe.getdel(k)
                found = pipe.execute()
            except Exception as exc:
                log.warning("event=dataset_join_failed model=%s reason=%s", model, exc)
                return 0
            for it, value in zip(items, found):
                if value:
                    served, _, blob = value.partition(b"\0")
                    rows.append(self._row(it, served.decode(), blob))
        else:
            with self._lock:
                held = self._held.get(model)
                for it in items:
                    got = held.take(it.request_id, now) if held is not None else None
                    if got is not None:
                        rows.append(self._row(it, got[0], got[1]))
        if rows:
            self._append(model, rows, max_rows)
            self.rows_added[model] = self.rows_added.get(model, 0) + len(rows)
        return len(rows)

    @staticmethod
    def _row(item: FeedbackItem, version: str, held: bytes | tuple) -> dict[str, Any]:
        """A training row: ``held`` is this process's ``(ts, raw inputs)`` or Redis's pickled
        ``{"ts", "raw"}`` (``{"ts", "inputs"}``: held decoded, by an earlier Osprey)."""
        if isinstance(held, tuple):
            ts, raw = held
            inputs = _decoded(raw)
        else:
            d = pickle.loads(held)
            ts, inputs = d["ts"], (_decoded(d["raw"]) if "raw" in d else d["inputs"])
        return {"rid": item.request_id, "ts": ts, "version": version, "inputs": inputs, "label": item.label}

    def _append(self, model: str, rows: list[dict], max_rows: int) -> None:
        if self.redis is not None:
            key = f"{_PREFIX}:rows:{model}"
            try:
                pipe = self.redis.pipeline(transaction=True)
                pipe.rpush(key, *[pickle.dumps(r, protocol=5) for r in rows])
                pipe.ltrim(key, -max_rows, -1)
                pipe.execute()
            except Exception as exc:
                log.warning("event=dataset_rows_lost model=%s rows=%d reason=%s", model, len(rows), exc)
            return
        path = dataset_path(self.root, model, self.state_dir)
        with self._lock:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "ab") as f:
                for r in rows:
                    pickle.dump(r, f, protocol=5)
            count = self.rows_added.get(model, 0) + len(rows)
            if count > max_rows * 1.25:  # trim now and then, not per join
                kept = read_rows(model, root=self.root, state_dir=self.state_dir)[-max_rows:]
                tmp = path.with_suffix(".tmp")
                with open(tmp, "wb") as f:
                    for r in kept:
                        pickle.dump(r, f, protocol=5)
                os.replace(tmp, path)
                self.rows_added[model] = len(kept) - len(rows)


def read_rows(model: str, *, root: str | os.PathLike | None = None, redis: Any = None,
              limit: int | None = None, state_dir: str | os.PathLike | None = None) -> list[dict[str, Any]]:
    """The model's labelled rows, oldest first (the last ``limit`` when given)."""
    if redis is not None:
        start = -limit if limit else 0
        return [pickle.loads(b) for b in redis.lrange(f"{_PREFIX}:rows:{model}", start, -1)]
    path = dataset_path(root, model, state_dir)
    out: list[dict[str, Any]] = []
    if not path.exists():
        return out
    with open(path, "rb") as f:
        while True:
            try:
                out.append(pickle.load(f))
            except EOFError:
                break
            except (pickle.UnpicklingError, ValueError):  # a torn last record (killed mid-write)
                break
    return out[-limit:] if limit else out
