"""Run one attempt of a job in a child process and say how it ended (both backends use it).

The child (child.py) runs in its own session, so stopping it (cancel, timeout, a run taken
over elsewhere) signals its whole process group: SIGTERM, then SIGKILL after ``grace_s``.
Events it reports are applied to the record as they come; ``tick`` is called every ``poll_s``
while it runs: the backend writes the record there, beats its heartbeat and answers whether
the run must stop (a reason string) or go on (None).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Awaitable, Callable

from server.core import cpus
from server.retraining.jobs import JobRecord, JobState

__all__ = ["Outcome", "run_attempt", "attempt_runner", "remote_spec", "prepare_work_dir", "runner_name"]

log = logging.getLogger("osprey.retraining")

RESULT_KEYS = ("gate", "challenger", "message", "phase")


@dataclass
class Outcome:
    """How an attempt ended. ``kind``: succeeded | rejected | failed | retry | stopped."""

    kind: str
    message: str = ""
    error: str | None = None
    result: dict = field(default_factory=dict)
    reason: str = ""  # for "stopped": what stopped it (cancelled, timeout, superseded, shutdown)
    returned: bool = False  # the task returned (its result says succeeded, rejected or failed)


def runner_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def prepare_work_dir(path: Path) -> Path:
    """The job's work folder, emptied: what an earlier (dead) run left is gone."""
    if path.exists():
        shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True, exist_ok=True)
    return path


def apply_event(record: JobRecord, event: dict) -> None:
    if "progress" in event:
        record.progress = float(event["progress"])
        if event.get("message"):
            record.message = str(event["message"])
    elif "step" in event:
        record.add_step(event["step"], event.get("detail", ""), event.get("ts"))
    elif "log" in event:
        record.add_log(event["log"])
    elif "phase" in event:
        record.phase = str(event["phase"])


def outcome_of(final: dict | None, returncode: int | None) -> Outcome:
    if final is not None and "result" in final:
        result = dict(final["result"])
        state = result.pop("state", "succeeded")
        if state not in ("succeeded", "rejected", "failed"):
            return Outcome("failed", message=f"the job returned state {state!r}; it must be succeeded, rejected "
                                             "or failed", error=f"bad state {state!r}")
        message = str(result.get("message") or state)
        return Outcome(state, message=message, result=result, error=message if state == "failed" else None,
                       returned=True)
    if final is not None and "error" in final:
        return Outcome("retry" if final.get("retryable") else "failed", message=str(final.get("message", "")),
                       error=str(final.get("error", "")))
    how = (f"was killed by signal {-returncode}" if returncode is not None and returncode < 0
           else f"exited with code {returncode}")
    return Outcome("failed", message=f"the job's process {how} before it returned", error=f"process {how}")


async def _stop(proc: asyncio.subprocess.Process, grace_s: float) -> None:
    """SIGTERM to the child's process group, SIGKILL after grace_s; returns once it has exited."""
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 30.0)):
        if proc.returncode is not None:
            break
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            await asyncio.wait_for(proc.wait(), wait)
        except asyncio.TimeoutError:
            continue
    try:  # whatever else is left in its group
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


async def run_attempt(record: JobRecord, work_dir: Path, model_store: Path, *,
                      tick: Callable[[], Awaitable[str | None]], timeout_s: float, grace_s: float,
                      poll_s: float = 0.25, on_start: Callable[[int], None] | None = None, nice: int = 0) -> Outcome:
    """Run the job once in a child process; the record's progress, steps and log change as it runs.
    The work folder is emptied first (what an earlier, dead run left is gone).
    ``nice``: added to the child's niceness, so that serving on the same machine goes first."""
    prepare_work_dir(work_dir)
    spec = {"record": record.as_dict(), "work_dir": str(work_dir), "model_store": str(model_store),
            "parent": os.getpid(), "nice": int(nice)}
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])  # the child imports server.* like this process
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("PYTHONUNBUFFERED", "1")
    with cpus.unpinned():  # training computes: not on the event loop's one CPU (server/core/cpus.py)
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "server.retraining.child", stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=str(work_dir), env=env,
            start_new_session=True, limit=1 << 22)
    if on_start is not None:
        on_start(proc.pid)
    final: dict | None = None

    async def events() -> None:
        nonlocal final
        async for raw in proc.stdout:
            try:
                event = json.loads(raw)
            except ValueError:
                record.add_log(raw.decode(errors="replace"))
                continue
            if "result" in event or "error" in event:
                final = event
            else:
                apply_event(record, event)

    async def stderr() -> None:
        async for raw in proc.stderr:
            record.add_log(raw.decode(errors="replace"))

    readers = [asyncio.ensure_future(events()), asyncio.ensure_future(stderr())]
    reason = ""
    try:
        proc.stdin.write(json.dumps(spec).encode())
        await proc.stdin.drain()
        proc.stdin.close()
    except (BrokenPipeError, ConnectionResetError):
        pass
    deadline = time.monotonic() + timeout_s
    waiter = asyncio.ensure_future(proc.wait())
    try:
        while not waiter.done():
            await asyncio.wait([waiter], timeout=poll_s)
            if waiter.done():
                break
            if time.monotonic() >= deadline:
                reason = "timeout"
            else:
                reason = await tick() or ""
            if reason:
                await _stop(proc, grace_s)
                break
    except BaseException:  # cancelled (worker shutting down) or a bug: the child must not outlive this run
        await asyncio.shield(_stop(proc, grace_s))
        raise
    finally:
        await asyncio.wait(readers, timeout=5.0)
        for r in readers:
            r.cancel()
        waiter.cancel()
    if reason == "timeout":
        return Outcome("failed", message=f"timed out after {timeout_s:g} s (params timeout_s); its process was stopped",
                       error="timeout")
    if reason:
        return Outcome("stopped", reason=reason, message=reason)
    return outcome_of(final, proc.returncode)


def remote_spec(record: JobRecord, work_dir: Path | str, model_store: Path | str) -> dict:
    """What ``python -m server.retraining.child --spec FILE`` reads: the job (without its log and
    steps: the task needs the job, not its history), its work folder and the model store."""
    slim = record.as_dict()
    slim["log_tail"], slim["steps"] = [], []
    return {"record": slim, "work_dir": str(work_dir), "model_store": str(model_store), "nice": 0}


def attempt_runner(settings) -> Callable[..., Awaitable[Outcome]]:
    """The function that runs one attempt, by ``settings.retraining_executor``: ``run_attempt``
    (a local child process) or the Ray cluster's (ray_runner.py); both take the same arguments."""
    if settings.retraining_executor == "ray":
        import functools

        from server.retraining.ray_runner import run_attempt_ray

        return functools.partial(run_attempt_ray, settings=settings)
    return run_attempt


def finish_record(record: JobRecord, outcome: Outcome, now: float | None = None) -> None:
    """Apply a final outcome (succeeded, rejected, failed) to the record."""
    now = time.time() if now is None else now
    record.finished = now
    if outcome.returned:  # succeeded, rejected, or failed by the task's own judgement
        record.state = JobState(outcome.kind)
        result = dict(outcome.result)
        if isinstance(result.get("gate"), dict):
            record.gate = result.pop("gate")
        if result.get("challenger") is not None:
            record.challenger = str(result.pop("challenger"))
        if result.get("phase"):
            record.phase = str(result.pop("phase"))
        record.message = str(result.pop("message", "") or outcome.kind)
        record.result = result
        if outcome.kind == "succeeded":
            record.progress = 1.0
        record.error = outcome.error
    else:
        record.state = JobState.FAILED
        record.message = outcome.message
        record.error = outcome.error
    record.add_step(record.state.value, record.message)
