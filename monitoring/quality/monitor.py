"""Live quality of one model version: the prediction log, the label join and quality windows.

The drift Monitor owns one :class:`QualityMonitor` per version (made by
:func:`quality_factory`) and delegates to it (the plan's QualityPart):

- :meth:`QualityMonitor.record` (the monitor's background thread): keeps each request id's
  prediction (its ``outputs`` row) for ``feedback_ttl`` seconds, at most ``max_predictions``;
- :meth:`QualityMonitor.feedback` (blocking where the store is Redis: from the event loop
  ``await qm.afeedback(items)``, which runs it in a worker thread): joins labels by request id;
- :meth:`QualityMonitor.status`: the ``"quality"`` part of ``GET /monitoring`` (blocking
  where the store is Redis, like feedback);
- :meth:`QualityMonitor.render_lines` / :func:`render_many`: Prometheus lines from what this
  process last computed (never touches the store, safe on the event loop);
- :meth:`QualityMonitor.tick`: refresh that cache and flush what was buffered while Redis was
  down (the background thread calls it now and then; ``record`` does it every few seconds).

Labels: a classification label is a class, by name (``obs.classes``; a number matches the
class named by its decimal form first) or by index; a regression label is a number (a list of
numbers for a model with several outputs). A request that held several examples (a list of
records, texts or images) is labelled with a list of as many labels, one per example, each
joined to its own prediction; live quality counts examples, the feedback answer requests. For
a conditional generator (task ``generator``:
its outputs are the asked classes, one-hot) a label is the class a viewer (or a downstream
classifier) recognised in the sample; quality is accuracy, precision, recall and F1 of the
recognised classes against the asked ones. Wrong-type labels are counted invalid with an error
line naming the item; labels for unknown, expired or already labelled ids are counted
unmatched. Nothing a client sends is fatal.

Redis down: predictions are buffered in this process (bounded, oldest dropped and counted)
and written when Redis answers again; feedback answers 503 ("monitoring state is
unavailable") rather than buffering labels: a label can only be joined against the shared
prediction log, and a client told 503 knows to send it again, where a buffered label could
later turn out unmatched with nobody to tell. ``status()["unavailable"]`` says why.
"""

from __future__ import annotations

import asyncio
import logging
import math
import struct
import threading
import time
from collections import deque
from typing import Any, Callable, Iterable, Protocol, Sequence

import numpy as np
import orjson

from monitoring.quality.metrics import (are_probabilities, classification_metrics,
                                        confidence_estimate, judge, load_baseline, regression_metrics)
from monitoring.quality.store import HISTORY, MemoryStore, QualityStore, RedisStore, StoreUnavailable
from server.core.capture import FeedbackItem, FeedbackResult, Observation
from server.core.errors import ErrorKind, OspreyError, show
from server.core.model_config import MonitoringConfig

__all__ = ["QualityPart", "QualityMonitor", "quality_factory", "render_many", "resolve_label", "resolve_labels"]

log = logging.getLogger("osprey.monitoring.quality")

BUFFER_ROWS = 10_000  # predictions kept in this process while Redis is down
RETRY_S = 2.0  # after a Redis failure, do not try again for this long (buffer meanwhile)
REFRESH_S = 5.0  # record() refreshes the cached metrics at most this often
RESULTS = ("matched", "unmatched", "invalid")
FLOAT32_MAX = 3.4028234663852886e38
_CLASSIFICATION, _REGRESSION, _GENERATOR = b"c", b"r", b"g"
# a conditional generator: its "prediction" is the asked class (one-hot), a label the class a
# viewer recognised in the sample; the metrics are the ones that mean something there
GENERATOR_METRICS = ("accuracy", "precision", "recall", "f1")


class QualityPart(Protocol):
    """What the drift Monitor calls on a version's quality part."""

    def record(self, obs: Observation) -> None: ...
    def feedback(self, items: Sequence[FeedbackItem]) -> FeedbackResult: ...
    def status(self) -> dict[str, Any]: ...
    def render_lines(self) -> list[str]: ...
    def tick(self) -> None: ...
    def close(self) -> None: ...


def resolve_label(label: Any, kind: bytes, width: int, classes: Sequence[str] | None) -> tuple[Any, str | None]:
    """(the label as stored: a class index or the value(s), None) or (None, why it is invalid)."""
    if kind == _REGRESSION:
        values = label if isinstance(label, list) else [label]
        if isinstance(label, str):
            return None, f"label {show(label)} is a string; this model is a regression, send a number"
        if isinstance(label, list) and width == 1:
            return None, f"label {show(label)} is a list; this model predicts one value, send a number"
        if len(values) != width:
            return None, f"label {show(label)} has {len(values)} values; this model predicts {width}"
        for v in values:
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                return None, f"label {show(label)} is not a number; this model is a regression"
            if not math.isfinite(v):
                return None, f"label {show(label)} is not a finite number"
            if abs(v) > FLOAT32_MAX:  # squared errors of such values overflow: a window's metrics would be lost
                return None, (f"label {show(label)} is out of range: a regression label must be within "
                              f"+/-{FLOAT32_MAX:.4g} (float32, as the model's predictions are)")
        return ([float(v) for v in values] if isinstance(label, list) else float(label)), None
    # classification: a class by name or by index
    names = list(classes) if classes else None
    if isinstance(label, list):
        return None, f"label {show(label)} is a list; this model is a classifier, send one class"
    if isinstance(label, str):
        if names is not None and label in names:
            return names.index(label), None
        if names is None and label.strip().isdigit() and int(label) < width:
            return int(label), None
        which = f"one of {show(names, 200)}" if names else f"a class index 0..{width - 1}"
        return None, f"label {show(label)} is not a class of this model ({which})"
    if isinstance(label, bool):
        if names is not None:
            lowered = [n.lower() for n in names]
            if str(label).lower() in lowered:
                return lowered.index(str(label).lower()), None
        if width == 2:
            return int(label), None
        return None, f"label {label!r} is a boolean; this model has {width} classes, send a class"
    if isinstance(label, float):
        if not label.is_integer():
            return None, f"label {label!r} is not a class (a class index is a whole number)"
        label = int(label)
    if isinstance(label, int):
        if names is not None and str(label) in names:
            return names.index(str(label)), None
        if 0 <= label < width:
            return label, None
        which = f" ({show(names, 200)})" if names else ""
        return None, f"label {label} is not a class of this model: it has {width} classes{which}"
    return None, f"label {show(label)} must be a class name, a class index or a number"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _num(x: float) -> str:
    return repr(float(x)) if math.isfinite(x) else ("+Inf" if x > 0 else "-Inf" if x < 0 else "NaN")


FAMILIES = (
    ("osprey_feedback_total", "counter", "Feedback labels this process answered, by result (matched, unmatched, invalid)."),
    ("osprey_quality", "gauge", "Live quality of the last window of labelled predictions, per metric "
                                 "(estimated_accuracy, from confidence, until labels arrive)."),
    ("osprey_quality_degraded", "gauge", "1 when a live quality metric is worse than its held-out baseline by more "
                                         "than the tolerance (over at least min_labels labels), else 0."),
)


def _rows(request_ids: Sequence[str], kind: bytes, outputs: np.ndarray,
          request_rows: np.ndarray | None = None) -> list[tuple[str, bytes]]:
    """(request id, kind byte + the row's float32 outputs) per request with an id: every row's
    bytes made in one numpy pass (a (n, 1 + 4C) byte matrix viewed as n fixed-size records), not
    a slice and a concatenation per row.

    A request of several examples (a list of records, texts, images: ``request_rows`` says
    which request each row came from) is kept as one entry: the kind byte in upper case, the
    number of examples (uint32, little-endian) and their rows' float32 outputs (:func:`_unpack`)."""
    n, width = outputs.shape
    ids = [rid if type(rid) is str else str(rid) for rid in request_ids]
    if request_rows is not None and n > 1 and bool((request_rows[1:] == request_rows[:-1]).any()):
        return _grouped(ids, kind, np.ascontiguousarray(outputs, dtype=np.float32), request_rows)
    packed = np.empty((n, 1 + 4 * width), dtype=np.uint8)
    packed[:, 0] = kind[0]
    packed[:, 1:] = np.ascontiguousarray(outputs, dtype=np.float32).view(np.uint8).reshape(n, 4 * width)
    blobs = packed.view(np.dtype((np.void, packed.shape[1]))).reshape(n).tolist()
    if all(ids):
        return list(zip(ids, blobs))
    return [(rid, blob) for rid, blob in zip(ids, blobs) if rid]


def _grouped(ids: list[str], kind: bytes, outputs: np.ndarray, request_rows: np.ndarray) -> list[tuple[str, bytes]]:
    """:func:`_rows` where a request gave several rows: one entry per run of its consecutive rows."""
    starts = [0, *(np.flatnonzero(request_rows[1:] != request_rows[:-1]) + 1).tolist()]
    out = []
    for start, end in zip(starts, starts[1:] + [len(ids)]):
        rid = ids[start]
        if not rid:
            continue
        if end - start == 1:
            out.append((rid, kind + outputs[start].tobytes()))
        else:
            out.append((rid, kind.upper() + struct.pack("<I", end - start) + outputs[start:end].tobytes()))
    return out


def _unpack(row: bytes) -> tuple[bytes, np.ndarray]:
    """(kind byte, outputs of shape (examples, width)) of a kept prediction (:func:`_rows`)."""
    kind = bytes(row[:1])
    if kind.isupper():
        (count,) = struct.unpack_from("<I", row, 1)
        return kind.lower(), np.frombuffer(row, dtype=np.float32, offset=5).reshape(count, -1)
    return kind, np.frombuffer(row, dtype=np.float32, offset=1).reshape(1, -1)


def resolve_labels(label: Any, kind: bytes, examples: int, width: int,
                   classes: Sequence[str] | None) -> tuple[list | None, str | None]:
    """(one stored label per example, None) or (None, why it is invalid), for a request that
    held ``examples`` examples: one label for one, a list of as many labels for several (a list
    of one label also stands for one example)."""
    if examples == 1:
        value, why = resolve_label(label, kind, width, classes)
        if why is not None and isinstance(label, list) and len(label) == 1:
            value, inner = resolve_label(label[0], kind, width, classes)
            why = why if inner is not None else None
        return ([value], None) if why is None else (None, why)
    if not isinstance(label, list):
        return None, f"its request held {examples} examples; send a list of {examples} labels, one per example"
    if len(label) != examples:
        return None, f"its request held {examples} examples; the label is a list of {len(label)}"
    values = []
    for i, y in enumerate(label):
        value, why = resolve_label(y, kind, width, classes)
        if why is not None:
            return None, f"example {i}: {why}"
        values.append(value)
    return values, None


class QualityMonitor:
    """One model version's prediction log, label join and live quality (see the module doc)."""

    def __init__(self, model: str, version: str, config: MonitoringConfig | None = None, *,
                 baseline: dict[str, float] | None = None, baseline_source: str | None = None,
                 store: QualityStore | None = None, clock: Callable[[], float] = time.time):
        self.model, self.version = model, version
        self.config = config or MonitoringConfig()
        self.baseline = dict(baseline or {})
        self.baseline_source = baseline_source
        self.store: QualityStore = store if store is not None else MemoryStore()
        self.clock = clock
        # the labelled window judged: quality_window labels, but never fewer than min_labels
        self.window = max(int(self.config.quality_window), int(self.config.min_labels))
        self._lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self._meta: dict | None = None  # task, classes, width last written to the store
        self._confidence: deque[float] = deque(maxlen=self.window)  # top-class probabilities (estimate)
        self._local = dict.fromkeys(RESULTS, 0)  # this process's answers (Prometheus counters)
        self._buffer: deque[tuple[float, list[tuple[str, bytes]], dict]] = deque()
        self._buffered_rows = 0
        self.dropped = 0  # predictions lost: buffer full while Redis was down
        self.unavailable: str | None = None  # why the store cannot be reached, or None
        self._retry_at = 0.0
        self._cache: dict[str, Any] = {"labels_total": -1, "metrics": {}, "degraded": False, "worse": [],
                                       "window_labels": 0}
        self._refreshed = 0.0
        self._warned_shape = False
        self._unjoinable: str | None = None  # the task of outputs seen that labels cannot be joined to

    # --- the prediction log ------------------------------------------------------------
    def record(self, obs: Observation) -> None:
        """Keep the sampled rows' predictions for the join (background thread; never raises)."""
        try:
            self._record(obs)
        except Exception:  # never take the monitor's thread down
            log.exception("quality record failed for %s/%s", self.model, self.version)

    def _record(self, obs: Observation) -> None:
        if obs.error or obs.outputs is None or not obs.request_ids:
            return
        kind = {"classification": _CLASSIFICATION, "regression": _REGRESSION,
                "generator": _GENERATOR}.get(obs.task or "")
        if kind is None:
            self._unjoinable = obs.task or "unknown"  # said to whoever sends labels (_feedback)
            return  # autoencoders, embeddings: nothing a label can be checked against
        outputs = np.asarray(obs.outputs, dtype=np.float32)
        n = len(obs.request_ids)
        if outputs.ndim == 1:
            outputs = outputs.reshape(n, 1) if kind == _REGRESSION else np.stack([1 - outputs, outputs], axis=1)
        if outputs.ndim != 2 or outputs.shape[0] != n:
            if not self._warned_shape:
                log.warning("%s/%s: outputs of shape %s for %d request ids; predictions not kept for feedback",
                            self.model, self.version, outputs.shape, n)
                self._warned_shape = True
            return
        rows = _rows(obs.request_ids, kind, outputs, obs.request_rows)
        width = outputs.shape[1]
        classes = list(obs.classes) if obs.classes and len(obs.classes) == width else None  # else: by index only
        meta = {"task": obs.task, "classes": classes, "width": width}
        if kind == _CLASSIFICATION and are_probabilities(outputs):
            self._confidence.extend(outputs.max(axis=1).tolist())
        now = obs.time or self.clock()
        with self._lock:
            self._buffer.append((now, rows, meta))
            self._buffered_rows += len(rows)
            while self._buffered_rows > BUFFER_ROWS and len(self._buffer) > 1:
                _, old, _ = self._buffer.popleft()
                self._buffered_rows -= len(old)
                self.dropped += len(old)
        self._flush(raising=False)
        if time.monotonic() - self._refreshed > REFRESH_S:
            self.tick()

    def _flush(self, raising: bool) -> bool:
        """Write buffered predictions; False (or StoreUnavailable if ``raising``) while the store is down.

        One thread at a time: two writing the same rows could put back a prediction that a
        label claimed in between. ``raising`` (feedback) waits for its turn; the others skip."""
        if not raising and self.unavailable is not None and time.monotonic() < self._retry_at:
            return False
        if not self._flush_lock.acquire(blocking=raising):
            return self.unavailable is None
        try:
            return self._flush_locked(raising)
        finally:
            self._flush_lock.release()

    def _flush_locked(self, raising: bool) -> bool:
        wrote = False
        while True:
            with self._lock:
                if not self._buffer:
                    break
                now, rows, meta = self._buffer[0]
            try:
                if meta != self._meta:
                    self.store.set_meta(meta)
                    self._meta = meta
                expires, current = now + float(self.config.feedback_ttl), self.clock()
                if expires > current:  # (buffered while Redis was down: may have expired meanwhile)
                    self.store.put(rows, current, expires, int(self.config.max_predictions))
            except StoreUnavailable as exc:
                self._down(str(exc))
                if raising:
                    raise
                return False
            wrote = True
            with self._lock:
                if self._buffer and self._buffer[0][1] is rows:
                    self._buffer.popleft()
                    self._buffered_rows -= len(rows)
        if wrote:  # an empty buffer says nothing about the store (tick's refresh finds out)
            self._up()
        return True

    def _down(self, why: str) -> None:
        if self.unavailable is None:
            log.warning("%s/%s: monitoring state unavailable: %s", self.model, self.version, why)
        self.unavailable = why
        self._retry_at = time.monotonic() + RETRY_S

    def _up(self) -> None:
        if self.unavailable is not None:
            log.info("%s/%s: monitoring state available again", self.model, self.version)
        self.unavailable = None

    # --- the join ------------------------------------------------------------------------
    def feedback(self, items: Sequence[FeedbackItem]) -> FeedbackResult:
        """Join labels to kept predictions by request id. Counts every item; raises only
        OspreyError UNAVAILABLE (503) when the shared store cannot be reached."""
        try:
            return self._feedback(items)
        except StoreUnavailable as exc:
            self._down(str(exc))
            raise OspreyError(ErrorKind.UNAVAILABLE,
                              f"monitoring state is unavailable for model {self.model} version {self.version}: "
                              f"{exc}; no label was recorded, send them again later", retry_after=RETRY_S) from None

    def holds(self, rids: Sequence[str]) -> list[bool]:
        """Whether this version's prediction log holds each request id (unexpired, unlabelled):
        which version a label sent without one is for. Raises StoreUnavailable."""
        self._flush(raising=True)
        return [row is not None for row in self.store.get(list(rids), self.clock())]

    def check_labels(self, items: Sequence[FeedbackItem]) -> dict[int, str] | None:
        """{item index: why} for labels this model cannot take as training rows, judged by what
        its predictions look like (task, classes, width), not by a kept prediction (which may
        have expired while the held inputs have not): a list whose every element is a label is
        one label per example of a request that held several. None when it cannot tell: no
        prediction seen yet, the shared store down, a task labels do not fit."""
        try:
            meta = self._meta or self.store.get_meta() or {}
        except StoreUnavailable:
            return None
        kind = {"classification": _CLASSIFICATION, "regression": _REGRESSION,
                "generator": _GENERATOR}.get(meta.get("task") or "")
        width = meta.get("width")
        if kind is None or not isinstance(width, int):
            return None
        classes = meta.get("classes")
        out = {}
        for item in items:
            _, why = resolve_label(item.label, kind, width, classes)
            if why is not None and isinstance(item.label, list) and item.label and all(
                    resolve_label(y, kind, width, classes)[1] is None for y in item.label):
                why = None  # one label per example
            if why is not None:
                out[item.index] = why
        return out

    def _feedback(self, items: Sequence[FeedbackItem]) -> FeedbackResult:
        result = FeedbackResult()
        self._flush(raising=True)  # predictions of this process first: a label may be for one of them
        rids = [str(item.request_id) for item in items]
        rows = self.store.get(rids, self.clock()) if rids else []
        meta = self._meta or self.store.get_meta() or {}
        classes = meta.get("classes")
        joined: list[tuple[int, bytes]] = []  # (item position, labelled entry)
        for pos, (item, row) in enumerate(zip(items, rows)):
            if row is None:
                result.add_unmatched([rids[pos]])
                continue
            kind, outputs = _unpack(row)
            values, why = resolve_labels(item.label, kind, *outputs.shape, classes)
            if why is not None:
                result.invalid += 1
                result.rejected.add(item.index)
                result.errors.append(f"feedback[{item.index}] (request_id {show(item.request_id)}): {why}")
                continue
            k = kind.decode()  # one labelled entry per example: quality is judged over examples
            joined.append((pos, [orjson.dumps({"k": k, "y": y, "o": o}) for y, o in zip(values, outputs.tolist())]))
        claimed = self.store.claim([rids[pos] for pos, _ in joined]) if joined else []
        entries = [entry for (_, examples), won in zip(joined, claimed) if won for entry in examples]
        result.accepted = sum(claimed)
        # labelled meanwhile (twice in one request, another replica)
        result.add_unmatched([rids[pos] for (pos, _), won in zip(joined, claimed) if not won])
        closed = 0
        if entries:
            total = self.store.add_labelled(entries, self.window)
            size = int(self.config.quality_window)
            closed = total // size if total // size > (total - len(entries)) // size else 0
        if result.unmatched:
            why = self._why_unmatched(meta)
            if why:
                result.errors.append(why)
        self.store.add_counts({"matched": result.accepted, "unmatched": result.unmatched, "invalid": result.invalid})
        with self._lock:
            self._local["matched"] += result.accepted
            self._local["unmatched"] += result.unmatched
            self._local["invalid"] += result.invalid
        if closed:  # a quality window closed with these labels: judge it now (metrics otherwise on status/tick)
            self._close_window(closed)
        return result

    def _why_unmatched(self, meta: dict) -> str | None:
        """A line for the answer when labels go unmatched for a reason other than their ids:
        outputs no label can be joined to, or predictions kept only for the sampled share."""
        if not meta and self._unjoinable is not None:
            return (f"model {self.model} version {self.version} keeps no predictions for labels: its outputs "
                    f"({self._unjoinable}) are not classes or values a label can be compared with, so live "
                    f"quality is not measured (labels still become training rows where retraining is on)")
        rate = float(self.config.sample_rate)
        if rate < 1.0:
            return (f"monitoring.sample_rate is {rate:g} for model {self.model} version {self.version}: only the "
                    f"sampled share of predictions is kept for labels, the others' labels count as unmatched")
        return None

    async def afeedback(self, items: Sequence[FeedbackItem]) -> FeedbackResult:
        """:meth:`feedback` from the event loop (in a worker thread: it may wait on Redis)."""
        return await asyncio.to_thread(self.feedback, items)

    # --- quality -------------------------------------------------------------------------
    def _compute(self) -> tuple[dict[str, Any], int, str | None]:
        """(metrics over the labelled window, labels in it, task)."""
        raw = self.store.labelled()
        if not raw:
            return {}, 0, None
        entries = [orjson.loads(e) for e in raw]
        kind = entries[-1]["k"]
        width = len(entries[-1]["o"])
        entries = [e for e in entries if e["k"] == kind and len(e["o"]) == width]
        outputs = np.array([e["o"] for e in entries], dtype=np.float64)
        if kind == "c":
            y = np.array([e["y"] for e in entries], dtype=np.int64)
            return classification_metrics(y, outputs), len(entries), "classification"
        if kind == "g":  # asked class (one-hot) vs the class recognised
            y = np.array([e["y"] for e in entries], dtype=np.int64)
            metrics = classification_metrics(y, outputs)
            return {k: metrics[k] for k in GENERATOR_METRICS}, len(entries), "generator"
        y = np.array([e["y"] for e in entries], dtype=np.float64).reshape(len(entries), -1)
        return regression_metrics(y, outputs), len(entries), "regression"

    def _refresh(self) -> dict[str, Any]:
        """Recompute the window's metrics if labels arrived since (about 20 ms for 500 labels
        of 10 classes: done on status, tick and window close, not on every feedback)."""
        counts = self.store.counts()
        cache = self._cache
        if counts.get("labels_total", 0) != cache["labels_total"]:
            metrics, n, task = self._compute()
            degraded, worse = judge(metrics, self.baseline, n, int(self.config.min_labels),
                                    float(self.config.quality_tolerance))
            cache = {"labels_total": counts.get("labels_total", 0), "metrics": metrics, "degraded": degraded,
                     "worse": worse, "window_labels": n, "task": task}
        cache = {**cache, "counts": counts}
        self._cache = cache
        self._refreshed = time.monotonic()
        return cache

    def _close_window(self, number: int) -> None:
        """Record closed window ``number`` (the last one, when one request closed several)."""
        cache = self._refresh()
        self.store.push_history({"window": number, "ended": self.clock(), "labels": cache["window_labels"],
                                 "metrics": cache["metrics"], "degraded": cache["degraded"]}, HISTORY)

    def tick(self) -> None:
        """Flush buffered predictions and refresh the cached quality (background thread)."""
        try:
            if self._flush(raising=False):
                self._refresh()
                self._up()
        except StoreUnavailable as exc:
            self._down(str(exc))
        except Exception:
            log.exception("quality refresh failed for %s/%s", self.model, self.version)

    def estimated(self) -> dict[str, Any] | None:
        """Expected accuracy from the confidence of recent predictions (before labels)."""
        return confidence_estimate(np.fromiter(self._confidence, dtype=np.float64))

    def status(self) -> dict[str, Any]:
        """The ``"quality"`` object of the monitoring JSON."""
        try:
            self._flush(raising=False)
            cache = self._refresh() if self.unavailable is None else self._cache
            kept = self.store.kept(self.clock()) if self.unavailable is None else None
            history = self.store.history() if self.unavailable is None else []
        except StoreUnavailable as exc:
            self._down(str(exc))
            cache, kept, history = self._cache, None, []
        counts = cache.get("counts") or {**self._local, "labels_total": 0}
        return {
            "labels": counts.get("matched", 0), "unmatched": counts.get("unmatched", 0),
            "invalid": counts.get("invalid", 0),
            "metrics": cache["metrics"], "baseline": self.baseline, "baseline_source": self.baseline_source,
            "degraded": cache["degraded"], "degraded_metrics": cache["worse"],
            "window": {"labels": cache["window_labels"], "size": self.window},
            "windows": counts.get("labels_total", 0) // max(1, int(self.config.quality_window)),
            "min_labels": int(self.config.min_labels),
            "tolerance": float(self.config.quality_tolerance), "task": cache.get("task") or (self._meta or {}).get("task"),
            "estimated": self.estimated(), "predictions_kept": kept, "store": self.store.kind,
            "unavailable": self.unavailable, "dropped": self.dropped,
            "history": history[-20:],
        }

    def history(self) -> list[dict]:
        """Closed quality windows (last 200), oldest first."""
        try:
            return self.store.history()
        except StoreUnavailable as exc:
            self._down(str(exc))
            return []

    # --- Prometheus --------------------------------------------------------------------
    def samples(self) -> dict[str, list[str]]:
        """This version's sample lines per metric family, from the cache (no store access)."""
        labels = f'model="{_escape(self.model)}",version="{_escape(self.version)}"'
        with self._lock:
            local = dict(self._local)
        cache = self._cache
        out: dict[str, list[str]] = {name: [] for name, _, _ in FAMILIES}
        for result in RESULTS:
            out["osprey_feedback_total"].append(f'osprey_feedback_total{{{labels},result="{result}"}} {local[result]}')
        for metric, value in sorted(cache["metrics"].items()):
            if value is not None:
                out["osprey_quality"].append(f'osprey_quality{{{labels},metric="{metric}"}} {_num(value)}')
        est = self.estimated()
        if est is not None and not cache["metrics"]:
            out["osprey_quality"].append(f'osprey_quality{{{labels},metric="estimated_accuracy"}} '
                                         f'{_num(est["accuracy"])}')
        out["osprey_quality_degraded"].append(f'osprey_quality_degraded{{{labels}}} {int(bool(cache["degraded"]))}')
        return out

    def render_lines(self) -> list[str]:
        """This version's sample lines, no HELP/TYPE: the Monitor writes those once per family
        across versions (:func:`render_many` writes a whole exposition on its own)."""
        per = self.samples()
        return [line for name, _, _ in FAMILIES for line in per[name]]

    def close(self) -> None:
        """The version was released: drop what this process keeps (shared Redis state stays)."""
        with self._lock:
            self._buffer.clear()
            self._buffered_rows = 0
        self.store.clear()


def render_many(monitors: Iterable[QualityMonitor]) -> list[str]:
    """Prometheus lines of several versions: each family's HELP and TYPE once, then its samples."""
    per = [m.samples() for m in monitors]
    lines: list[str] = []
    for name, kind, text in FAMILIES:
        samples = [line for s in per for line in s[name]]
        if not samples:
            continue
        lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}", *samples]
    return lines


def quality_factory(model: str, version: str, config: MonitoringConfig | None, model_dir: Any,
                    redis_url: str | None) -> QualityMonitor:
    """A version's QualityMonitor: baseline from the model dir (profile ``quality``, else
    ``training.json`` ``heldout_metrics``), state in Redis when ``redis_url`` is set."""
    baseline, source = load_baseline(model_dir)
    store: QualityStore = RedisStore(redis_url, model, version) if redis_url else MemoryStore()
    return QualityMonitor(model, version, config, baseline=baseline, baseline_source=source, store=store)
