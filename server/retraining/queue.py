"""The job queue's contract, the job's context, and the factory that picks a backend.

Two backends keep the same promises (states, one job per model and episode, retries with
backoff, cancel, a rerun of a job whose runner died):

- :class:`~server.retraining.redis_queue.RedisJobQueue` (``redis_url`` set): records in Redis,
  jobs on a saq queue, run by ``osprey worker`` processes on any machine that sees Redis and
  the model store;
- :class:`~server.retraining.embedded.EmbeddedJobQueue` (the default): records in files under
  ``<state_dir>/jobs/`` (setting ``state_dir``, by default ``<model_store>/.osprey``), jobs run
  by the server itself.

Either way a job runs in a child process (``server.retraining.child``) so that a cancel or a
timeout can stop it, and a child that dies is a failed job, not a dead worker. The job body is
the function named by ``params["task"]`` (``"module:function"``), called in the child as
``fn(job: JobContext) -> dict``. It returns ``{"state": "succeeded" | "rejected", ...}`` (the
keys ``gate``, ``challenger``, ``message`` and ``phase`` go into the record, the rest into
``record.result``); raising fails the job, and raising :class:`RetryableError` retries it with
backoff (``backoff_s``, doubled each time) until ``max_attempts`` runs have been made.

Parameters the queue itself reads from ``params``: ``task``, ``max_attempts`` (3),
``backoff_s`` (10), ``timeout_s`` (3600: the run is stopped and the job fails).
"""

from __future__ import annotations

import importlib
import json
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Protocol

from server.core.errors import ErrorKind, OspreyError
from server.retraining.jobs import JobRecord

__all__ = ["JobQueue", "JobContext", "RetryableError", "QueueUnavailable", "job_queue", "resolve_task", "work_dir_for",
           "jobs_dir_for", "state_dir_for", "DEFAULT_TASK", "new_record", "retry_delay", "not_found", "finished_conflict",
           "TRIGGERS"]

DEFAULT_TASK = "server.retraining.pipeline:run"
DEFAULT_MAX_ATTEMPTS = 3
DEFAULT_BACKOFF_S = 10.0
DEFAULT_TIMEOUT_S = 3600.0
MAX_BACKOFF_S = 3600.0
TRIGGERS = ("drift", "quality", "latency", "manual", "alert")


class RetryableError(Exception):
    """Raised by a job for a failure that may pass (a busy resource, a flaky download): the job
    is run again after a backoff, up to ``max_attempts`` runs in all."""


class QueueUnavailable(ConnectionError):
    """``submit`` could not reach the queue's store (Redis): nothing was queued. A plain exception,
    not an OspreyError, so a caller that keeps triggers (triggers.py) keeps this one and submits it
    again later; the episode dedups. ``get``/``list``/``cancel`` raise OspreyError UNAVAILABLE (503)."""


class JobQueue(Protocol):
    async def start(self) -> None:
        """Begin running jobs (embedded: resumes the jobs a crashed server left); idempotent."""

    async def submit(self, model: str, version: str, trigger: str, episode: str,
                     params: dict) -> tuple[JobRecord, bool]:
        """(record, created): the job for (model, episode), created and queued unless one exists.
        QueueUnavailable when the store cannot be reached; OspreyError BAD_INPUT for bad arguments."""

    async def get(self, job_id: str) -> JobRecord | None: ...

    async def list(self, model: str | None = None, limit: int = 100) -> list[JobRecord]:
        """The newest jobs first."""

    async def cancel(self, job_id: str) -> JobRecord:
        """A queued job never runs; a running one's process is stopped. OspreyError NOT_FOUND for an
        unknown id, CONFLICT for a job that has already finished."""

    async def close(self) -> None: ...


class JobContext:
    """What a job's function is given, in its child process.

    ``record`` (the JobRecord as the run began), ``params``, ``work_dir`` (this job's folder,
    emptied before each run), ``model_store``; ``progress(fraction, message)``, ``step(name,
    detail)``, ``log(line)`` go to the record while the job runs; ``cancelled()`` is True once
    the job has been asked to stop (the process is killed ``retraining_cancel_grace`` seconds
    later if it has not ended).
    """

    def __init__(self, record: JobRecord, work_dir: Path, model_store: Path, emit: Callable[[dict], None],
                 cancelled: Callable[[], bool] = lambda: False):
        self.record = record
        self.params = record.params
        self.work_dir = Path(work_dir)
        self.model_store = Path(model_store)
        self._emit = emit
        self._cancelled = cancelled

    def progress(self, fraction: float, message: str = "") -> None:
        fraction = min(1.0, max(0.0, float(fraction)))
        self._emit({"progress": fraction, "message": str(message)})

    def step(self, name: str, detail: str = "") -> None:
        self._emit({"step": str(name), "detail": str(detail), "ts": time.time()})

    def log(self, line: str) -> None:
        self._emit({"log": str(line)})

    def phase(self, name: str) -> None:
        self._emit({"phase": str(name)})

    def cancelled(self) -> bool:
        return self._cancelled()


def resolve_task(name: str) -> Callable[[JobContext], Any]:
    """The function ``"module:function"`` names, or ValueError saying what is wrong."""
    if not isinstance(name, str) or name.count(":") != 1:
        raise ValueError(f"params['task'] must be 'module:function', got {name!r}")
    module_name, _, attr = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"task {name!r}: cannot import module {module_name!r}: {exc}") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"task {name!r}: module {module_name!r} has no function {attr!r}")
    return fn


def _positive(params: dict, key: str, default: float, kind=float) -> Any:
    value = params.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise OspreyError(ErrorKind.BAD_INPUT, f"params[{key!r}] must be a positive number, got {value!r}")
    return kind(value)


def new_record(model: str, version: str, trigger: str, episode: str, params: dict) -> JobRecord:
    """A queued record for a new job, its params checked (BAD_INPUT naming what is wrong)."""
    for what, value in (("model", model), ("version", version), ("trigger", trigger), ("episode", episode)):
        if not isinstance(value, str) or not value:
            raise OspreyError(ErrorKind.BAD_INPUT, f"a job's {what} must be a non-empty string, got {value!r}")
    if trigger not in TRIGGERS:
        raise OspreyError(ErrorKind.BAD_INPUT, f"unknown trigger {trigger!r}; one of {', '.join(TRIGGERS)}")
    params = dict(params or {})
    params.setdefault("task", DEFAULT_TASK)
    if not isinstance(params["task"], str) or params["task"].count(":") != 1:
        raise OspreyError(ErrorKind.BAD_INPUT, f"params['task'] must be 'module:function', got {params['task']!r}")
    max_attempts = _positive(params, "max_attempts", DEFAULT_MAX_ATTEMPTS, int)
    _positive(params, "backoff_s", DEFAULT_BACKOFF_S)
    _positive(params, "timeout_s", DEFAULT_TIMEOUT_S)
    try:
        params = json.loads(json.dumps(params))
    except (TypeError, ValueError) as exc:
        raise OspreyError(ErrorKind.BAD_INPUT, f"a job's params must be JSON data: {exc}") from None
    return JobRecord(id=uuid.uuid4().hex[:16], model=model, version=version, trigger=trigger, episode=episode,
                     max_attempts=max_attempts, params=params, message="queued")


def retry_delay(params: dict, attempt: int) -> float:
    """Seconds before run ``attempt + 1``: backoff_s, doubled after each failed run."""
    base = float(params.get("backoff_s", DEFAULT_BACKOFF_S))
    return min(MAX_BACKOFF_S, base * 2 ** max(0, attempt - 1))


def timeout_of(params: dict) -> float:
    return float(params.get("timeout_s", DEFAULT_TIMEOUT_S))


def state_dir_for(model_store: Path | str, state_dir: Path | str | None = None) -> Path:
    """The state folder: ``state_dir`` when set, else ``<model_store>/.osprey`` (server/state.py)."""
    return Path(state_dir) if state_dir else Path(model_store) / ".osprey"


def jobs_dir_for(model_store: Path | str, state_dir: Path | str | None = None) -> Path:
    return state_dir_for(model_store, state_dir) / "jobs"


def work_dir_for(model_store: Path | str, job_id: str, state_dir: Path | str | None = None) -> Path:
    """A job's work folder (emptied before each run), in the state folder: by default on the
    model store, which workers share, so a retrained archive is published with one rename."""
    return state_dir_for(model_store, state_dir) / "work" / job_id


def not_found(job_id: str) -> OspreyError:
    return OspreyError(ErrorKind.NOT_FOUND, f"no retraining job {job_id!r}", type_name="JobNotFoundException")


def finished_conflict(record: JobRecord) -> OspreyError:
    return OspreyError(ErrorKind.CONFLICT, f"retraining job {record.id} has already {record.state.value}; "
                                          "only a queued or running job can be cancelled")


def job_queue(settings, model_store: Path | str) -> JobQueue:
    """RedisJobQueue when ``settings.redis_url`` is set, else EmbeddedJobQueue on the model store."""
    if settings.redis_url:
        from server.retraining.redis_queue import RedisJobQueue

        return RedisJobQueue(settings.redis_url, model_store, settings=settings)
    from server.retraining.embedded import EmbeddedJobQueue

    return EmbeddedJobQueue(model_store, settings=settings)
