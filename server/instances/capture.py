"""Capture for the monitor, in the instance's own thread or child process: sampled batches,
amortized into few :class:`~server.core.capture.Observation` objects, handed to ``observe``.

:class:`BatchCapture` sits in a :class:`~server.instances.runner.BatchRunner` (only when the
server setting ``monitoring`` and the model's ``monitoring.enabled`` are on). For each batch
the handler runs, :meth:`~BatchCapture.begin` draws which requests are sampled
(``monitoring.sample_rate``, per request); a batch with none sampled runs untouched. For a
sampled one the handler's :class:`~handlers.monitoring.Tap` is armed while ``handle`` runs
(references to the model's inputs, outputs and penultimate activations: no copies), and
:meth:`~BatchCapture.end` appends those references to a small pending list: a constant cost
per batch, nothing computed.

**Amortized.** :meth:`~BatchCapture.flush` builds ONE observation from all the pending
batches at once (their inference calls' small tensors concatenated, so each handler hook, each
numpy step and the Observation itself run once for all their rows, vectorized). The instance
calls it *after* a handoff's answers were handed back, so features never delay answers:
``flush(force=False)`` builds only when :meth:`~BatchCapture.due` -- :data:`MAX_ROWS` requests
pending, :data:`MAX_BATCHES` batches, about :data:`MAX_BYTES` of tensors held, or the oldest
pending batch ended :data:`MAX_DELAY_S` ago -- and the instance's loop flushes everything when
no work came for :data:`IDLE_S` (an idle instance), and when it stops. So a prediction reaches
the monitor (and the feedback join) at most about ``MAX_DELAY_S`` (0.5 s) after its answer,
plus the monitor's own tick (0.1 s); memory held is bounded by those limits. A handler that
writes every batch into the same tensor (a static buffer reused in place) is detected (the
new batch's tensor shares memory with a pending one): the pending batches it overwrote are
dropped and that capture builds every batch right after it from then on (logged once).

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
MAX_BATCHES = 64  # batches pending that make a flush due
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
        self._eager = False  # the handler reuses its buffers in place: build every batch at once
        self._warned = False
        self._observe_failed = False
        self._setup_error = self.tap.layer_error
        if self._setup_error:
            log.warning("model %s version %s: %s; the penultimate layer is looked for instead", name, version,
                        self._setup_error)

    # --- on the batch's way (the instance thread) -------------------------------------
    def begin(self, n: int) -> bool:
        """Draw the batch's sample; arm the tap when any of its ``n`` requests is sampled."""
        if self.rate >= 1.0:
            self._sampled = None
        else:
            mask = self._rng.random(n) < self.rate
            if not mask.any():
                return False
            self._sampled = mask
        try:
            self.tap.arm()
        except Exception as exc:  # a hook that cannot be registered: say so, run the batch as it is
            self.tap.disarm()
            self._fail(exc, None)
            return False
        return True

    def end(self, results: list | None, request_ids: list[str]) -> None:
        """The handler returned (``results``, one per request) or failed (None): disarm, and
        keep references to what the tap kept for :meth:`flush` (constant cost)."""
        calls, acts, row_map = self.tap.disarm()
        sampled, self._sampled = self._sampled, None
        if results is None:
            return
        if not self._pending:
            self._since = time.monotonic()
        index = len(self._pending)
        self._pending.append((calls, acts, row_map, results, request_ids, sampled, time.time()))
        self._rows += len(request_ids)
        size = 0
        for t in _tensors(calls, acts):
            try:
                ptr, n = _pointer(t)
            except Exception:  # something tensor-like that cannot say: count nothing
                continue
            size += n
            if ptr:
                seen = self._ptrs.get(ptr)
                if seen is not None and seen != index:
                    self._reused(seen)
                    return
                self._ptrs[ptr] = index
        self._bytes += size

    def _reused(self, first: int) -> None:
        """A batch's tensor shares memory with pending batch ``first``'s: the handler reuses a
        buffer in place, so the pending batches from ``first`` on (all but the new one) were
        overwritten. Drop them; from now on build each batch right after it ran."""
        new = self._pending.pop()
        lost = len(self._pending) - first
        del self._pending[first:]
        if not self._eager:
            self._eager = True
            log.warning("model %s version %s: the handler reuses its tensors in place across batches; monitoring "
                        "builds each batch's observation right after it (%d pending batch(es) dropped)",
                        self.name, self.version, lost)
        self.flush()
        self._pending.append(new)
        self._rows = len(new[4])
        self._since = time.monotonic()

    def due(self) -> bool:
        """Enough is pending (rows, batches, bytes held, or age) for :meth:`flush` to build now."""
        return bool(self._pending) and (
            self._eager or self._rows >= MAX_ROWS or len(self._pending) >= MAX_BATCHES or
            self._bytes >= MAX_BYTES or time.monotonic() - self._since >= MAX_DELAY_S)

    def wait(self) -> float | None:
        """Seconds until what is pending is due by age (0: due now); None when nothing is."""
        if not self._pending:
            return None
        return 0.0 if self._eager else max(0.0, self._since + MAX_DELAY_S - time.monotonic())

    # --- after the answers were handed back -------------------------------------------
    def flush(self, force: bool = True) -> None:
        """Build and hand over one observation from the batches run since the last flush
        (``force=False``: only when :meth:`due`)."""
        if not self._pending or not (force or self.due()):
            return
        pending, self._pending = self._pending, []
        self._rows = self._bytes = 0
        self._ptrs = {}
        if self._setup_error:  # said once, beside the first observation
            why, self._setup_error = self._setup_error, None
            self._hand_over(Observation(self.name, self.version, [], pending[0][-1], error=why))
        if len(pending) == 1:
            groups = pending
        elif all(item[0] for item in pending) or not any(item[0] for item in pending):
            merged = _merge(pending)  # alike: one observation for all ...
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
    n = t.numel() * t.element_size()
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


def _merge(items: list[tuple]) -> tuple | None:
    """Several pending batches as one: their inference calls (inputs and outputs of one row
    shape concatenated into one call, so each hook runs once), activations, row maps (shifted
    to the joined requests), results, request ids and samples, and the last end time. None
    when their tensors cannot be joined (e.g. texts padded to a different length per batch):
    then each batch is built on its own, as hooks expect one call's tensors per batch."""
    calls = [c for item in items for c in item[0]]
    acts = [a for item in items for a in item[1]]
    try:
        if len(calls) > 1:
            ins, outs = [c[0] for c in calls], [c[1] for c in calls]
            if not (_same_rows(ins) and _same_rows(outs)):
                return None
            calls = [(_join(ins), _join(outs))]
        if len(acts) > 1:
            if not _same_rows(acts):
                return None
            acts = [_join(acts)]
    except RuntimeError:  # tensors on different devices (a model split across GPUs): not joined
        return None
    row_map = None
    if any(item[2] is not None for item in items):
        maps, offset = [], 0
        for item in items:
            n = len(item[4])
            maps.append(np.arange(n, dtype=np.int64) + offset if item[2] is None
                        else np.asarray(item[2], dtype=np.int64) + offset)
            offset += n
        row_map = np.concatenate(maps)
    results = [r for item in items for r in item[3]]
    ids = [i for item in items for i in item[4]]
    if all(item[5] is None for item in items):
        sampled = None
    else:
        sampled = np.concatenate([np.ones(len(item[4]), dtype=bool) if item[5] is None else item[5]
                                  for item in items])
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
