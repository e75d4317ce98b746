"""Capture for the monitor, in the instance's own thread or child process: per sampled batch,
one :class:`~server.core.capture.Observation`, handed to ``observe``.

:class:`BatchCapture` sits in a :class:`~server.instances.runner.BatchRunner` (only when the
server setting ``monitoring`` and the model's ``monitoring.enabled`` are on). For each batch
the handler runs, :meth:`~BatchCapture.begin` draws which requests are sampled
(``monitoring.sample_rate``, per request); a batch with none sampled runs untouched. For a
sampled one the handler's :class:`~handlers.monitoring.Tap` is armed while ``handle`` runs
(references to the model's inputs, outputs and penultimate activations: no copies), and
what it kept is queued. :meth:`~BatchCapture.flush` -- called by the instance *after* the
batch's answers were handed back, so the features never delay them -- computes the
features vectorized on the whole batch, keeps the sampled rows and calls ``observe``.

Rows: one per row the model saw. A built-in request holding several examples (a list of
records, texts, images) gives several rows, each carrying that request's id
(``request_ids`` then repeats it). A batch that failed as a whole is not observed (its
requests are re-run one by one, and those are).

Failures never reach a request: a handler hook that raises (or a capture that cannot make
sense of the batch) is logged once per version and handed over as
``Observation(error=...)`` (the monitor then says it is degraded); ``observe`` raising is
logged once and ignored.

:func:`run_reference` runs request bodies through an archive's handler in the calling
thread (sample rate 1) and returns their observations: what ``osprey profile`` and
``osprey package --reference-data`` build a reference profile from.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import orjson

from handlers.monitoring import Tap

from server.core.capture import Observation
from server.core.errors import OspreyError
from server.core.model_config import ModelConfig, MonitoringConfig

__all__ = ["BatchCapture", "run_reference", "ReferenceRun", "RowError"]

log = logging.getLogger("osprey.monitoring")

Observe = Callable[[Observation], None]

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
        queue what the tap kept for :meth:`flush`."""
        calls, acts, row_map = self.tap.disarm()
        if results is not None:
            self._pending.append((calls, acts, row_map, results, request_ids, self._sampled, time.time()))
        self._sampled = None

    # --- after the answers were handed back -------------------------------------------
    def flush(self) -> None:
        """Compute and hand over the observations of the batches run since the last flush."""
        pending, self._pending = self._pending, []
        if self._setup_error and pending:  # said once, beside the first observation
            why, self._setup_error = self._setup_error, None
            self._hand_over(Observation(self.name, self.version, [], pending[0][-1], error=why))
        for item in pending:
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
        else:
            if req is None:
                req = np.arange(cap.rows)
            sel = np.flatnonzero(sampled[req])
            if not len(sel):
                return None
            row_ids = [ids[i] for i in req[sel].tolist()]
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
                           outputs=outputs, classes=cap.classes)


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


def _request(i: int, rid: str, body: Any, model: str):
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
        batch = [_request(i, names[i], bodies[i], archive.name) for i in range(start, min(start + size, len(bodies)))]
        outcomes = runner.run(batch)
        runner.flush()
        for i, outcome in enumerate(outcomes, start):
            if isinstance(outcome, OspreyError):
                run.errors.append(RowError(i, names[i], outcome.message))
            else:
                run.rows += 1
    return run
