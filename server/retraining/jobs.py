"""The job record: what a retraining job is, where it stands, and what it did.

A record is plain data, JSON-safe both ways (``as_dict`` / ``from_dict``): the Redis queue keeps
it in a hash (one field per attribute), the embedded queue in a JSON file, the REST API and
``osprey jobs`` show it as is. Its log tail and its list of steps are bounded, so a chatty job
cannot grow its record without limit.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import time
from dataclasses import dataclass, field
from typing import Any

__all__ = ["JobState", "JobRecord", "TERMINAL", "LOG_TAIL_LINES", "MAX_STEPS", "MAX_LINE_CHARS"]

LOG_TAIL_LINES = 100  # lines of the job's log kept in its record
MAX_STEPS = 200  # steps kept (the first ones and the latest are what matter; the oldest after the first go)
MAX_LINE_CHARS = 2000  # a longer log line is cut


class JobState(str, enum.Enum):
    QUEUED = "queued"        # waiting for a worker (also between retries)
    RUNNING = "running"
    SUCCEEDED = "succeeded"  # the job ran and its result was kept (e.g. a challenger promoted)
    REJECTED = "rejected"    # the job ran and its result was refused (e.g. by the gate); nothing changed
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL


TERMINAL = frozenset({JobState.SUCCEEDED, JobState.REJECTED, JobState.FAILED, JobState.CANCELLED})


def _line(text: Any) -> str:
    s = str(text).rstrip("\n")
    return s if len(s) <= MAX_LINE_CHARS else s[:MAX_LINE_CHARS] + " [cut]"


@dataclass
class JobRecord:
    id: str
    model: str
    version: str                      # the champion when the job was triggered
    trigger: str                      # drift | quality | latency | manual | alert
    episode: str                      # with model, the dedup key: one job per (model, episode)
    state: JobState = JobState.QUEUED
    phase: str = ""                   # free text: training, gating, packaging, promoting, canary, probation
    progress: float = 0.0             # 0..1
    message: str = ""
    attempts: int = 0                 # runs started (a rerun after a lost worker counts)
    max_attempts: int = 3
    created: float = field(default_factory=time.time)  # epoch seconds
    started: float | None = None      # start of the latest run
    finished: float | None = None
    gate: dict = field(default_factory=dict)         # the gate's numbers
    challenger: str | None = None     # the version the job made, if any
    steps: list = field(default_factory=list)        # [{"ts", "step", "detail"}]
    log_tail: list = field(default_factory=list)     # the last LOG_TAIL_LINES lines
    error: str | None = None          # the failure (a traceback's last lines)
    params: dict = field(default_factory=dict)       # what the task was given (task, timeout_s, ...)
    result: dict = field(default_factory=dict)       # what the task returned beyond state/gate/challenger/message
    not_before: float = 0.0           # a retry waits until then (epoch seconds)
    worker: str = ""                  # host:pid of the process that ran the latest attempt
    cancel_requested: bool = False

    # ------------------------------------------------------------------ changes
    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL

    def add_step(self, step: str, detail: str = "", ts: float | None = None) -> None:
        self.steps.append({"ts": round(time.time() if ts is None else float(ts), 3), "step": _line(step),
                           "detail": _line(detail)})
        if len(self.steps) > MAX_STEPS:
            del self.steps[1:len(self.steps) - MAX_STEPS + 1]  # keep the first step

    def add_log(self, line: str) -> None:
        for part in str(line).splitlines() or [""]:
            self.log_tail.append(_line(part))
        if len(self.log_tail) > LOG_TAIL_LINES:
            del self.log_tail[:len(self.log_tail) - LOG_TAIL_LINES]

    # ------------------------------------------------------------------ JSON
    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["state"] = self.state.value
        return d

    def to_json(self) -> str:
        return json.dumps(self.as_dict(), separators=(",", ":"))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "JobRecord":
        """A record from ``as_dict`` output; unknown keys (a newer writer's) are ignored."""
        if not isinstance(data, dict):
            raise ValueError(f"a job record must be a JSON object, got {type(data).__name__}")
        missing = [k for k in ("id", "model", "version", "trigger", "episode") if k not in data]
        if missing:
            raise ValueError(f"job record {data.get('id', '?')!r} lacks {', '.join(missing)}")
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        try:
            values["state"] = JobState(values.get("state", "queued"))
        except ValueError:
            raise ValueError(f"job record {data['id']!r}: unknown state {data.get('state')!r}") from None
        record = cls(**values)
        record.log_tail = list(record.log_tail)[-LOG_TAIL_LINES:]
        return record

    @classmethod
    def from_json(cls, text: str | bytes) -> "JobRecord":
        return cls.from_dict(json.loads(text))

    def summary(self) -> dict[str, Any]:
        """The record without its log and steps (lists of jobs)."""
        d = self.as_dict()
        d.pop("log_tail")
        d["steps"] = len(self.steps)
        return d
