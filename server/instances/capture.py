"""Capture for the monitor, in the instance's own thread or child process: sampled batches,
amortized into few :class:`~server.core.capture.Observation` objects, handed to ``observe``.

:class:`BatchCapture` sits in a :class:`~server.instances.runner.BatchRunner` (only when the
server setting ``monitoring`` and the model's ``monitoring.enabled`` are on). The handler's
:class:`~handlers.monitoring.Tap` is armed once per *handoff* (:meth:`~BatchCapture.open` and
:meth:`~BatchCapture.close`: the batches an instance runs back to back, up to 32 batches of
one request on the batch-1 path) and keeps references to the model's inputs, outputs and
penultimate activations: no copies. For each batch :meth:`~BatchCapture.begin` draws which
requests are sampled (``monitoring.sample_rate``, per request) and :meth:`~BatchCapture.end`
notes where that batch's references start and end, with its results and request ids; a batch
with none sampled, one that failed as a whole, or a describe, is dropped from the tap's lists.
:meth:`~BatchCapture.close` appends the handoff's batches to a small pending list: a constant
cost per batch, nothing computed.

**Amortized.** :meth:`~BatchCapture.flush` builds ONE observation from all the pending
batches at once (their inference calls' small tensors concatenated, so each handler hook, each
numpy step and the Observation itself run once for all their rows, vectorized). The instance
calls it *after* a handoff's answers were handed back, so features never delay answers:
``flush(force=False)`` builds only when :meth:`~BatchCapture.due` -- :data:`MAX_ROWS` requests
pending, :data:`MAX_BATCHES` batches (checked after each handoff), about :data:`MAX_BYTES` of tensors held, or the oldest
pending batch ended :data:`MAX_DELAY_S` ago -- and the instance's loop flushes everything when
no work came for :data:`IDLE_S` (an idle instance), and when it stops. So a prediction reaches
the monitor (and the feedback join) at most about ``MAX_DELAY_S`` (0.5 s) after its answer,
plus the monitor's own tick (0.1 s); memory held is bounded by those limits. A feedback call
does not wait for that: the data plane first has each instance flush (``flush_capture``: a
job behind a thread instance's queued handoffs, a message a process instance's child reads
after its handoff). A handler that
writes every batch into the same tensor (a static buffer reused in place) is detected (a
batch's tensor shares memory with a pending one, or with an earlier batch of the handoff):
what it overwrote is dropped, and from then on each batch's tensors are copied as it ends
(logged once).

Rows: one per row the model saw. A built-in request holding several examples (a list of
records, texts, images) gives several rows, each carrying that request's id
(``request_ids`` then repeats it). A batch that failed as a whole is not observed (its
requests are re-run one by one, and those are). An observation's ``time`` is when the last
of its batches ended.

Failures never reach a request: a handler hook that raises (or a capture that cannot make
sense of the batches) is logged once per version and handed over as
``Observation(error=...)`` (the monitor then says it is degraded); ``observe`` raising is
logged once and ignored.

:func:`run_reference` runs request bodies through an archive's handler in the calling
thread (sample rate 1) and returns their observations: what ``osprey profile`` and
``osprey package --reference-data`` build a reference profile from.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import orjson

from handlers.monitoring import Tap

from server.core.capture import Observation
from server.core.errors import OspreyError
from server.core.model_config import ModelConfig, MonitoringConfig

__all__ = ["BatchCapture", "run_reference", "reference_ticket", "ReferenceRun", "RowError", "MAX_ROWS", "MAX_DELAY_S", "IDLE_S"]

log = logging.getLogger("osprey.monitoring")

Observe = Callable[[Observation], None]

MAX_ROWS = 256  # requests pending that make a flush due
MAX_BATCHES = 256  # batches pending that make a flush due (= MAX_ROWS: batches of one request amortize as well)
MAX_BYTES = 64 << 20  # bytes of inputs, outputs and activations held (references) that make a flush due
MAX_DELAY_S = 0.5  # the oldest pending batch ended this long ago: a flush is due
IDLE_S = 0.02  # the instance's loop flushes everything when no work came for this long
MERGE_BYTES = 8 << 20  # inference calls' tensors are concatenated (one hook call) up to this size

_WARNED: set[tuple[str, str]] = set()  # versions whose failing hook was logged (once per version in this process)


class BatchCapture:
    """Sampling, arming and the hand-over of one instance's observations."""

    def __init__(self, name: str, version: str, target: Any, config: MonitoringConfig, observe: Observe,
                 seed: int | None = None):
        self.name, self.version, self.config, self.observe = name, version, config, observe
        self.tap = Tap(target, config.layer)
        self.rate = float(config.sample_rate)
        self._rng = np.random.default_rng(seed)
        self._sampled: np.ndarray | None = None  # the batch being run: its sampled requests (None: all)
        self._pending: list[tuple] = []
        self._rows = 0  # requests in the pending batches
        self._bytes = 0  # bytes of the tensors they hold
        self._since = 0.0  # monotonic time the oldest pending batch ended
        self._ptrs: dict[int, int] = {}  # data pointer of a held tensor -> its pending batch's index
        self._eager = False  # the handler reuses its buffers in place: copy each batch's tensors as it ends
        self._open = False  # the tap is armed for a handoff (see open)
        self._single = False  # ... opened by begin for one batch: end closes it
        self._kept: tuple[int, int] = (0, 0)  # the tap's (calls, activations) up to the last kept batch
        self._batches: list[tuple] = []  # the open handoff's kept batches
        self._warned = False
        self._observe_failed = False
        self._setup_error = self.tap.layer_error
        if self._setup_error:
            log.warning("model %s version %s: %s; the penultimate layer is looked for instead", name, version,
                        self._setup_error)

    # --- on the batch's way (the instance thread) -------------------------------------
    def open(self) -> bool:
        """Install the tap for a whole handoff (the batches an instance runs back to back, up
        to 32 batches of one request on the batch-1 path): one hook and one :meth:`close` for
        them all. It keeps only while a sampled batch runs (:meth:`begin` to :meth:`end`), and
        each batch only notes where its references start and end in the tap's lists. False
        when the tap cannot be installed (said once); the batches then run as they are."""
        if self._open:
            return True
        try:
            self.tap.arm()
        except Exception as exc:  # a hook that cannot be registered: say so, run the batches as they are
            self.tap.disarm()
            self._fail(exc, None)
            return False
        self._open, self._kept = True, (0, 0)
        return True

    def begin(self, n: int) -> bool:
        """Draw the batch's sample; when any of its ``n`` requests is sampled, keep what the
        batch runs and say True (then :meth:`end` must follow). Outside a handoff
        (:meth:`open`), the batch is a handoff of its own."""
        if self.rate >= 1.0:
            sampled = None
        else:
            sampled = self._rng.random(n) < self.rate
            if not sampled.any():
                return False
        tap = self.tap
        if self._open:
            c, a = self._kept
            if len(tap.calls) != c:  # what a batch that failed as a whole kept
                del tap.calls[c:]
            if len(tap.activations) != a:
                del tap.activations[a:]
        elif self.open():
            self._single = True
        else:
            return False
        self._sampled = sampled
        tap.armed = True
        return True

    def end(self, results: list | None, request_ids: list[str]) -> None:
        """The handler returned (``results``, one per request) or failed (None): stop keeping,
        and note the batch's place in the tap's lists, its results and ids (constant cost; a
        failed batch's references are dropped by the next :meth:`begin` or :meth:`close`).
        Never raises."""
        tap = self.tap
        tap.armed = False
        sampled, self._sampled = self._sampled, None
        try:
            if results is not None:
                start = self._kept
                if self._eager:  # the handler reuses its tensors in place: keep copies
                    _copy_tail(tap.calls, start[0]), _copy_tail(tap.activations, start[1])
                self._kept = kept = (len(tap.calls), len(tap.activations))
                self._batches.append((start, kept, results, request_ids, sampled, tap.row_map()))
        except Exception as exc:  # (a handler's monitor_rows, say): this batch is not observed
            self._fail(exc, None)
        finally:
            if self._single:
                self.close()

    def close(self) -> None:
        """Remove the tap after a handoff (:meth:`open`) and add its kept batches to what is
        pending. Never raises."""
        if not self._open:
            return
        batches, self._batches = self._batches, []
        (c, a), self._kept = self._kept, (0, 0)
        self._open = self._single = False
        calls, acts = self.tap.disarm()
        if not batches:
            return
        try:
            del calls[c:], acts[a:]
            eager = self._eager
            batches = self._unshared(calls, acts, batches)
            if self._eager and not eager and batches:  # found just now: what is kept of this handoff is copied too
                _copy_tail(calls, batches[0][0][0]), _copy_tail(acts, batches[0][0][1])
        except Exception as exc:  # capture never fails serving: these batches are not observed
            self._fail(exc, None)
            return
        ended = time.time()
        if not self._pending:
            self._since = time.monotonic()
        pending = self._pending
        for (c0, a0), (c1, a1), results, ids, sampled, row_map in batches:
            pending.append((calls[c0:c1], acts[a0:a1], row_map, results, ids, sampled, ended))
            self._rows += len(ids)

    def _unshared(self, calls: list, acts: list, batches: list) -> list:
        """The handoff's kept batches, after the check that none of their tensors is one a
        pending batch or an earlier batch of the handoff holds: a buffer the handler reuses in
        place, so what held it before was overwritten and is dropped (:meth:`_reused`).
        Counts the bytes they hold and notes their tensors' addresses (none once the handler
        was found reusing its buffers: batches are then copies)."""
        check = not self._eager
        held, mine, first, lost = self._ptrs, {}, None, 0
        sizes = [0] * len(batches)
        for k, batch in enumerate(batches):
            (c0, a0), (c1, a1) = batch[0], batch[1]
            for t in (_tensors(calls[c0:c1], acts[a0:a1]) if c1 > c0 else acts[a0:a1]):
                try:
                    ptr, n = _pointer(t)
                except Exception:  # something tensor-like that cannot say: count nothing
                    continue
                sizes[k] += n
                if ptr and check:
                    at = held.get(ptr)
                    if at is not None and (first is None or at < first):
                        first = at
                    if mine.setdefault(ptr, k) != k:
                        lost, mine[ptr] = k, k
        if first is not None or lost:
            self._reused(len(self._pending) if first is None else first, lost)
            self._bytes += sum(sizes[lost:])
            return batches[lost:]  # (from now on batches are copied: no addresses to note)
        base = len(self._pending)  # batch k's pending index will be base + k
        for ptr, k in mine.items():
            held[ptr] = base + k
        self._bytes += sum(sizes)
        return batches

    def _reused(self, first: int, dropped: int) -> None:
        """A kept tensor shares memory with one pending item ``first`` holds, or with an
        earlier batch of the same handoff (``dropped`` of them): the handler reuses a buffer in
        place, so what held it before was overwritten. Drop that, build what is pending before
        it now, and copy each batch's tensors as it ends from then on."""
        lost = len(self._pending) - first + dropped
        del self._pending[first:]
        if not self._pending:  # (flush below then has nothing to build, and resets nothing)
            self._rows = self._bytes = 0
            self._ptrs = {}
        if not self._eager:
            self._eager = True
            log.warning("model %s version %s: the handler reuses its tensors in place across batches; monitoring "
                        "copies each batch's tensors from now on (%d earlier batch(es) dropped)",
                        self.name, self.version, lost)
        self.flush()

    def due(self) -> bool:
        """Enough is pending (rows, batches, bytes held, or age) for :meth:`flush` to build now."""
        return bool(self._pending) and (
            self._rows >= MAX_ROWS or len(self._pending) >= MAX_BATCHES or
            self._bytes >= MAX_BYTES or time.monotonic() - self._since >= MAX_DELAY_S)

    def wait(self) -> float | None:
        """Seconds until what is pending is due by age (0: due now); None when nothing is."""
        if not self._pending:
            return None
        return max(0.0, self._since + MAX_DELAY_S - time.monotonic())

    # --- after the answers were handed back -------------------------------------------
    def flush(self, force: bool = True) -> None:
        """Build and hand over one observation from the batches run since the last flush
        (``force=False``: only when :meth:`due`)."""
        if not self._pending or not (force or self.due()):
            return
        pending, self._pending = self._pending, []
        small = self._bytes <= MERGE_BYTES  # (every join is under the limit)
        self._rows = self._bytes = 0
        self._ptrs = {}
        if self._setup_error:  # said once, beside the first observation
            why, self._setup_error = self._setup_error, None
            self._hand_over(Observation(self.name, self.version, [], pending[0][-1], error=why))
        if len(pending) == 1:
            groups = pending
        elif all(item[0] for item in pending) or not any(item[0] for item in pending):
            merged = _merge(pending, small)  # alike: one observation for all ...
            groups = pending if merged is None else [merged]  # ... unless their tensors' shapes differ
        else:  # some batches called inference, others not: each on its own (rare)
            groups = pending
        for item in groups:
            obs = self._observation(item)
            if obs is not None:
                self._hand_over(obs)

    def _observation(self, item: tuple) -> Observation | None:
        calls, acts, row_map, results, ids, sampled, ended = item
        try:
            return self._build(calls, acts, row_map, results, ids, sampled, ended)
        except Exception as exc:
            kept = ids if sampled is None else [i for i, s in zip(ids, sampled) if s]
            return self._fail(exc, kept, ended)

    def _fail(self, exc: BaseException, ids: list | None, ended: float | None = None) -> Observation | None:
        why = f"monitoring hook failed: {type(exc).__name__}: {exc}"
        if not self._warned and (self.name, self.version) not in _WARNED:
            self._warned = True
            _WARNED.add((self.name, self.version))
            log.warning("model %s version %s: %s (logged once; monitoring is degraded, answers are not affected)",
                        self.name, self.version, why, exc_info=True)
        obs = Observation(self.name, self.version, list(ids or []), ended or time.time(), error=why)
        if ids is None:
            self._hand_over(obs)
            return None
        return obs

    def _hand_over(self, obs: Observation) -> None:
        try:
            self.observe(obs)
        except Exception:
            if not self._observe_failed:
                self._observe_failed = True
                log.exception("model %s version %s: the monitor refused an observation (logged once)",
                              self.name, self.version)

    def _build(self, calls: list, acts: list, row_map: Any, results: list, ids: list[str],
               sampled: np.ndarray | None, ended: float) -> Observation | None:
        cap = self.tap.collect(calls, acts, row_map, results, len(ids))
        if cap is None:
            return None
        req = cap.row_requests
        if sampled is None:
            sel = None
            row_ids = list(ids) if req is None else [ids[i] for i in req.tolist()]
            request_rows = req
        else:
            given = req is not None
            if req is None:
                req = np.arange(cap.rows)
            sel = np.flatnonzero(sampled[req])
            if not len(sel):
                return None
            row_ids = [ids[i] for i in req[sel].tolist()]
            request_rows = req[sel] if given else None
        wanted = set(self.config.features)
        categorical = set()

        def rows(a: np.ndarray, numeric: Any = np.float64) -> np.ndarray:
            a = a if sel is None else a[sel]
            return a.astype(numeric, copy=False) if numeric is not None else a

        def named(values: dict[str, np.ndarray], only: set) -> dict[str, np.ndarray]:
            out = {}
            for k, v in values.items():
                if only and k not in only:
                    continue
                if v.dtype.kind in "OUS":
                    categorical.add(k)
                    out[k] = rows(v, None).astype(str).astype(object)
                else:
                    out[k] = rows(v)
            return out

        features = named(cap.features, wanted)
        predictions = named(cap.predictions, set())
        embedding = None if cap.embedding is None else rows(cap.embedding, np.float32)
        outputs = None if cap.outputs is None else rows(cap.outputs, np.float32)
        if not features and not predictions and embedding is None:
            return None
        return Observation(self.name, self.version, row_ids, ended, features=features, predictions=predictions,
                           categorical=frozenset(categorical), embedding=embedding, task=cap.task,
                           outputs=outputs, classes=cap.classes, request_rows=request_rows)


def _copy_tail(items: list, start: int) -> None:
    """Replace ``items[start:]`` (inference calls or activations) with copies of their tensors."""
    for i in range(start, len(items)):
        items[i] = _copied(items[i])


def _copied(x: Any) -> Any:
    """``x`` with its tensors and arrays copied, containers kept as their own type (a
    namedtuple, a dict subclass such as a model-output class); anything else as it is."""
    if isinstance(x, np.ndarray):
        return x.copy()
    try:
        if isinstance(x, tuple):
            items = [_copied(v) for v in x]
            return type(x)(*items) if hasattr(x, "_fields") else type(x)(items)
        if isinstance(x, list):
            out = copy.copy(x)
            out[:] = [_copied(v) for v in x]
            return out
        if isinstance(x, dict):
            out = copy.copy(x)
            for k, v in x.items():
                out[k] = _copied(v)
            return out
    except Exception:  # a container that cannot be rebuilt so: kept as it is
        return x
    detach = getattr(x, "detach", None)  # a torch tensor
    return detach().clone() if callable(detach) and hasattr(x, "clone") else x


def _samples(parts: list[tuple[int, np.ndarray | None]]) -> np.ndarray | None:
    """The sample masks of consecutive batches (rows, mask or None for all) as one, or None."""
    if all(mask is None for _, mask in parts):
        return None
    return np.concatenate([np.ones(n, dtype=bool) if mask is None else mask for n, mask in parts])


def _row_map(parts: list[tuple[int, Any]]) -> np.ndarray | None:
    """The row maps of consecutive batches (requests, map or None for one row each) as one
    map onto their requests joined, or None when every batch has one row per request."""
    if all(rows is None for _, rows in parts):
        return None
    maps, offset = [], 0
    for n, rows in parts:
        maps.append(np.arange(n, dtype=np.int64) + offset if rows is None else np.asarray(rows, dtype=np.int64) + offset)
        offset += n
    return np.concatenate(maps)


def _tensors(calls: list, acts: list):
    """The top-level tensors/arrays a batch's references hold (inputs, outputs, activations)."""
    for inputs, outputs in calls:
        if hasattr(inputs, "shape"):
            yield inputs
        if hasattr(outputs, "shape"):
            yield outputs
    for a in acts:
        if hasattr(a, "shape"):
            yield a


def _pointer(t: Any) -> tuple[int, int]:
    """(address of the first element, bytes) of a tensor or array (address 0 when empty)."""
    if isinstance(t, np.ndarray):
        return (t.__array_interface__["data"][0] if t.size else 0), t.nbytes
    n = t.nbytes  # a torch tensor
    return (t.data_ptr() if n else 0), n


def _same_rows(parts: list) -> bool:
    """Tensors (or arrays) of one kind, dtype and row shape, small enough to join (devices are
    checked by the join itself). One pass of attribute reads per part: this runs on the
    instance thread for every part of every flush."""
    first = parts[0]
    shape = getattr(first, "shape", None)
    if shape is None or len(shape) < 1:
        return False
    kind, row, dtype = type(first), tuple(shape[1:]), first.dtype
    rows = 0
    for p in parts:
        if type(p) is not kind:
            return False
        s = p.shape
        if len(s) < 1 or tuple(s[1:]) != row or p.dtype != dtype:
            return False
        rows += s[0]
    itemsize = first.itemsize if isinstance(first, np.ndarray) else first.element_size()
    return rows * math.prod(row) * itemsize <= MERGE_BYTES


def _join(parts: list) -> Any:
    if isinstance(parts[0], np.ndarray):
        return np.concatenate(parts)
    import torch

    with torch.no_grad():
        return torch.cat(parts)


def _joined(parts: list, small: bool) -> Any:
    """Tensors (or arrays) of one kind and row shape joined along their rows, or None when
    they are not alike or (unless ``small``: all of them together are under
    :data:`MERGE_BYTES`) too big to join. The join itself checks the row shapes: this runs on
    the instance thread for every flush, over up to :data:`MAX_BATCHES` parts."""
    if not small:
        if not _same_rows(parts):
            return None
    else:
        first = parts[0]
        kind, dtype = type(first), getattr(first, "dtype", None)
        if dtype is None or any(type(p) is not kind or p.dtype != dtype for p in parts):
            return None  # (the join would promote a different dtype)
    try:
        return _join(parts)
    except (TypeError, ValueError, RuntimeError):  # row shapes differ, 0-d, or tensors on different devices
        return None


def _merge(items: list[tuple], small: bool = False) -> tuple | None:
    """Several pending batches as one: their inference calls (inputs and outputs of one row
    shape concatenated into one call, so each hook runs once), activations, row maps (shifted
    to the joined requests), results, request ids and samples, and the last end time. None
    when their tensors cannot be joined (e.g. texts padded to a different length per batch,
    or tensors on different devices): then each batch is built on its own, as hooks expect
    one call's tensors per batch. ``small``: their tensors together are under
    :data:`MERGE_BYTES`."""
    calls = [c for item in items for c in item[0]]
    acts = [a for item in items for a in item[1]]
    if len(calls) > 1:
        ins = _joined([c[0] for c in calls], small)
        outs = None if ins is None else _joined([c[1] for c in calls], small)
        if outs is None:
            return None
        calls = [(ins, outs)]
    if len(acts) > 1:
        joined = _joined(acts, small)
        if joined is None:
            return None
        acts = [joined]
    row_map = _row_map([(len(item[4]), item[2]) for item in items])
    results = [r for item in items for r in item[3]]
    ids = [i for item in items for i in item[4]]
    sampled = _samples([(len(item[4]), item[5]) for item in items])
    return calls, acts, row_map, results, ids, sampled, max(item[6] for item in items)


def make_capture(name: str, version: str, target: Any, config: ModelConfig, observe: Observe | None) -> BatchCapture | None:
    """The capture of a loaded handler, or None (monitoring off, or it cannot be set up:
    logged, serving goes on)."""
    if observe is None or not config.monitoring.enabled or config.monitoring.sample_rate <= 0:
        return None
    try:
        return BatchCapture(name, version, target, config.monitoring, observe)
    except Exception:
        log.exception("model %s version %s: monitoring could not be set up; the model is served unmonitored",
                      name, version)
        return None


# --- reference data: run bodies through a handler here ----------------------------------
@dataclass
class RowError:
    index: int
    name: str  # the row as the caller named it (file and row)
    message: str

    def __str__(self) -> str:
        return f"{self.name}: {self.message}"


@dataclass
class ReferenceRun:
    observations: list[Observation] = field(default_factory=list)
    errors: list[RowError] = field(default_factory=list)  # rows the handler refused (or failed on)
    rows: int = 0  # rows answered


def reference_ticket(rid: str, body: Any, model: str):
    """A ticket holding ``body`` as a client sends it: tensors, bytes, text, or JSON."""
    from server.core.types import Field, InferenceRequest, Protocol, Ticket

    if isinstance(body, dict) and body and all(isinstance(v, np.ndarray) for v in body.values()):
        return Ticket(InferenceRequest(model, None, rid, Protocol.REST, tensors=dict(body)))
    if isinstance(body, (bytes, bytearray, memoryview)):
        f = Field(bytes(body), "application/octet-stream")
    elif isinstance(body, str):
        f = Field(body.encode("utf-8"), "text/plain; charset=utf-8")
    else:
        f = Field(orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY), "application/json")
    return Ticket(InferenceRequest(model, None, rid, Protocol.REST, fields={"body": f}))


def run_reference(archive: Any, bodies: Sequence[Any], *, config: ModelConfig | None = None,
                  names: Sequence[str] | None = None, batch_size: int | None = None,
                  gpu_id: int | None = None) -> ReferenceRun:
    """Load ``archive``'s handler (a :class:`~server.core.archive.ModelArchive`) in the
    calling thread and run ``bodies`` through it in batches, capturing every row.

    A body is what a client would send: bytes (an image, raw data), str (text), anything
    else as JSON (a record, a list of numbers), or ``{name: ndarray}`` for tensor inputs (the
    Open Inference Protocol; arrays with their batch dimension). ``names`` name the rows in
    errors and are the observations' request ids (default ``row N``). Returns the
    observations (an ``Observation(error=...)`` among them when a monitoring hook failed)
    and one :class:`RowError` per row the handler refused, naming it."""
    from server.core.model_config import parse_model_config
    from server.instances.runner import load_runner

    if config is None:
        config = parse_model_config(archive.config)
    config = dataclasses.replace(config, monitoring=dataclasses.replace(config.monitoring, enabled=True,
                                                                         sample_rate=1.0))
    names = list(names) if names is not None else [f"row {i}" for i in range(len(bodies))]
    if len(names) != len(bodies):
        raise ValueError(f"{len(names)} names for {len(bodies)} bodies")
    run = ReferenceRun()
    runner = load_runner(archive.name, archive.version, str(archive.model_dir), archive.handler, archive.manifest,
                         config, gpu_id, None, observe=run.observations.append)
    size = max(1, int(batch_size or config.batch_size or 1))
    for start in range(0, len(bodies), size):
        batch = [reference_ticket(names[i], bodies[i], archive.name) for i in range(start, min(start + size, len(bodies)))]
        outcomes = runner.run(batch)
        runner.flush(force=False)  # a few batches per observation, as an instance does
        for i, outcome in enumerate(outcomes, start):
            if isinstance(outcome, OspreyError):
                run.errors.append(RowError(i, names[i], outcome.message))
            else:
                run.rows += 1
    runner.flush()
    return run
