"""Run a job's attempt on a Ray cluster (``retraining_executor=ray``) instead of a local child.

The job is submitted through the Ray Jobs REST API of the cluster's dashboard (``ray_address``,
``POST /api/jobs/``): its entrypoint is the same one-job command a local run uses,
``{ray_python} -m server.retraining.child --spec FILE``, the spec (the job record, its work
folder) written beside the job records on the model store, which the cluster's nodes mount at
the same path (the pipeline needs the model store there anyway: the champion's archive, the
labelled rows, the challenger it publishes).

The job's **submission id is the Osprey job id** (``{id}-retry{n}`` for the n-th retry after a
RetryableError). Ray refuses a second job with the same submission id, so a job is never run
twice on the cluster: when a worker that was following the job dies or stops, the worker that
takes the job over finds the submission there and follows it (its status and its log) instead
of submitting it again, whether it still runs or has ended in the meantime.

While the job runs, its log (``GET /api/jobs/{id}/logs``) carries the child's events (progress,
steps, phase, the final result) as lines marked ``@osprey-event``; everything else in it is the
job's log, kept in the record's tail. Ray's states map onto Osprey's: SUCCEEDED or FAILED with
a result line -> the task's own verdict (succeeded, rejected, failed, retry); FAILED without one
(the process died, a bad entrypoint, no Python with Osprey on the node) -> failed with Ray's
message; STOPPED (a cancel here, or someone stopping it in Ray) -> cancelled. A cancel or a
timeout here is ``POST /api/jobs/{id}/stop``: Ray sends SIGTERM to the job's process group and
SIGKILL a few seconds later (``RAY_JOB_STOP_WAIT_TIME_S`` on the cluster, 3 s by default). A
worker stopping, or a run taken over by another worker, leaves the Ray job running: the next
run follows it.

Why the REST API through httpx rather than ``ray.job_submission``: the SDK is the ``ray``
package itself (hundreds of MB, pins of its own), and the four calls used here are Ray's
documented, stable REST endpoints.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shlex
import time
from pathlib import Path
from typing import Awaitable, Callable

import httpx

from server.retraining.child import EVENT_MARK
from server.retraining.jobs import JobRecord
from server.retraining.runner import Outcome, apply_event, outcome_of, remote_spec
from server.retraining.queue import state_dir_for

__all__ = ["RayJobs", "RayUnavailable", "run_attempt_ray", "submission_id", "spec_path", "RAY_TERMINAL"]

log = logging.getLogger("osprey.retraining")

RAY_TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
STOP_WAIT_S = 30.0  # how long a stopped Ray job may take to end (Ray's own SIGKILL comes after 3 s)


class RayUnavailable(ConnectionError):
    """The Ray dashboard could not be reached (or answered 5xx)."""


def submission_id(record: JobRecord) -> str:
    """The Ray submission id of the record's current run: the job id, then ``{id}-retry{n}`` once
    n runs have ended in a RetryableError (a rerun after a lost worker keeps the id: it follows
    the run that is already there)."""
    retries = sum(1 for s in record.steps if s.get("step") == "retry")
    return record.id if retries == 0 else f"{record.id}-retry{retries}"


def spec_path(model_store: Path | str, sub_id: str, state_dir: Path | str | None = None) -> Path:
    """Where a Ray job's spec is written: ``run/`` of the state folder (``<model_store>/.osprey``
    by default, which the Ray nodes see on the shared store)."""
    return state_dir_for(model_store, state_dir) / "run" / f"{sub_id}.json"


class RayJobs:
    """The few calls of Ray's Jobs REST API that Osprey uses (an asyncio httpx client)."""

    def __init__(self, address: str, timeout: float = 10.0):
        self.address = address.rstrip("/")
        # trust_env=False: a proxy from the environment must not carry calls to the cluster
        self.http = httpx.AsyncClient(base_url=self.address, timeout=timeout, trust_env=False)

    async def _call(self, method: str, path: str, **kw) -> httpx.Response:
        try:
            r = await self.http.request(method, path, **kw)
        except httpx.HTTPError as exc:
            raise RayUnavailable(f"the Ray dashboard at {self.address} is unreachable: {exc}") from None
        if r.status_code >= 500 and "already exists" not in r.text:
            raise RayUnavailable(f"the Ray dashboard at {self.address} answered {r.status_code} to {method} {path}: "
                                 f"{r.text.strip()[-500:]}")
        return r

    async def submit(self, sub_id: str, entrypoint: str, runtime_env: dict | None = None,
                     metadata: dict | None = None) -> bool:
        """True: submitted; False: Ray already has a job with this submission id (nothing was run)."""
        body = {"entrypoint": entrypoint, "submission_id": sub_id, "runtime_env": runtime_env or {},
                "metadata": {k: str(v) for k, v in (metadata or {}).items()}}
        r = await self._call("POST", "/api/jobs/", json=body)
        if r.status_code == 200:
            return True
        if "already exists" in r.text:
            return False
        raise ValueError(f"Ray refused job {sub_id}: {r.status_code} {r.text.strip()[-1000:]}")

    async def info(self, sub_id: str) -> dict | None:
        r = await self._call("GET", f"/api/jobs/{sub_id}")
        if r.status_code == 404:
            return None
        if r.status_code != 200:
            raise ValueError(f"Ray answered {r.status_code} for job {sub_id}: {r.text.strip()[-500:]}")
        return r.json()

    async def logs(self, sub_id: str) -> str:
        r = await self._call("GET", f"/api/jobs/{sub_id}/logs")
        if r.status_code == 404:
            return ""
        if r.status_code != 200:
            raise ValueError(f"Ray answered {r.status_code} for job {sub_id}'s logs: {r.text.strip()[-500:]}")
        return r.json().get("logs", "") or ""

    async def stop(self, sub_id: str) -> bool:
        r = await self._call("POST", f"/api/jobs/{sub_id}/stop")
        if r.status_code == 404:
            return False
        if r.status_code != 200:
            raise ValueError(f"Ray answered {r.status_code} to stopping job {sub_id}: {r.text.strip()[-500:]}")
        return bool(r.json().get("stopped"))

    async def list(self) -> list[dict]:
        r = await self._call("GET", "/api/jobs/")
        r.raise_for_status()
        return r.json()

    async def close(self) -> None:
        await self.http.aclose()


class _LogReader:
    """Turns the growing text of a Ray job's log into events and log lines, once each."""

    def __init__(self, record: JobRecord, attached: bool):
        self.record = record
        self.offset = 0
        self.final: dict | None = None
        # following a job an earlier run followed: what it already put in the record is not added again
        self.seen_steps = {(s.get("ts"), s.get("step")) for s in record.steps} if attached else set()
        self.seen_log = set(record.log_tail) if attached else set()

    def feed(self, text: str, final: bool = False) -> None:
        if len(text) < self.offset:  # the log was rotated or cut: read it again from its start
            self.offset = 0
        chunk = text[self.offset:]
        end = len(chunk) if final else chunk.rfind("\n") + 1  # whole lines only, until the job has ended
        if end <= 0:
            return
        self.offset += end
        for line in chunk[:end].splitlines():
            self._line(line)

    def _line(self, line: str) -> None:
        if line.startswith(EVENT_MARK):
            try:
                event = json.loads(line[len(EVENT_MARK):])
            except ValueError:
                event = None
            if isinstance(event, dict):
                if "result" in event or "error" in event:
                    self.final = event
                elif "step" in event:
                    key = (round(float(event.get("ts") or 0), 3), str(event["step"]))
                    if key not in self.seen_steps:
                        apply_event(self.record, event)
                elif "log" in event:
                    self._log(str(event["log"]))
                else:
                    apply_event(self.record, event)
                return
        self._log(line)

    def _log(self, line: str) -> None:
        if line in self.seen_log:
            self.seen_log.discard(line)
            return
        self.record.add_log(line)


def _write_spec(path: Path, spec: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(spec, fh)
    os.replace(tmp, path)


def entrypoint_for(settings, spec: Path) -> str:
    return f"{settings.ray_python} -m server.retraining.child --spec {shlex.quote(str(spec))}"


async def run_attempt_ray(record: JobRecord, work_dir: Path, model_store: Path, *, settings,
                          tick: Callable[[], Awaitable[str | None]], timeout_s: float, grace_s: float,
                          poll_s: float = 0.25, **_ignored) -> Outcome:
    """Run (or follow) the job's attempt on the Ray cluster; the record's progress, steps and log
    change as it runs. Same contract as runner.run_attempt."""
    ray = RayJobs(settings.ray_address)
    try:
        return await _run(ray, record, Path(work_dir), Path(model_store), settings, tick, timeout_s, grace_s, poll_s)
    finally:
        await ray.close()


async def _submit(ray: RayJobs, record: JobRecord, sub_id: str, spec: Path, work_dir: Path, model_store: Path,
                  settings) -> tuple[Outcome | None, bool]:
    """Submit the job, or find it submitted already: (an Outcome if that failed, whether it was there)."""
    try:
        attached = await ray.info(sub_id) is not None
        if not attached:
            _write_spec(spec, remote_spec(record, work_dir, model_store))
            runtime_env = json.loads(settings.ray_runtime_env) if settings.ray_runtime_env else {}
            submitted = await ray.submit(sub_id, entrypoint_for(settings, spec), runtime_env,
                                         {"osprey_job": record.id, "model": record.model, "trigger": record.trigger})
            attached = not submitted  # another run submitted it between the two calls
    except RayUnavailable as exc:
        return Outcome("retry", message=str(exc), error=str(exc)), False
    except ValueError as exc:
        return Outcome("failed", message=str(exc), error=str(exc)), False
    if attached:
        record.add_step("ray", f"following Ray job {sub_id}, submitted earlier (a job id runs once on Ray)")
    else:
        record.add_step("ray", f"submitted to the Ray cluster at {settings.ray_address} as job {sub_id}")
    log.info("retraining job %s: %s Ray job %s", record.id, "following" if attached else "submitted", sub_id)
    return None, attached


class _Follow:
    """Submits (or finds) the Ray job, then reads its status and log until it has ended. It runs
    beside the loop that calls ``tick``, so a slow dashboard never holds up the job's heartbeat."""

    def __init__(self, ray: RayJobs, record: JobRecord, sub_id: str, settings):
        self.ray, self.record, self.sub_id, self.settings = ray, record, sub_id, settings
        self.status, self.message = "PENDING", ""
        self.started: float | None = None  # when the run began on Ray (epoch s), once known
        self.reader: _LogReader | None = None
        self.failed: Outcome | None = None

    async def run(self, work_dir: Path, model_store: Path, spec: Path) -> None:
        self.failed, attached = await _submit(self.ray, self.record, self.sub_id, spec, work_dir, model_store,
                                              self.settings)
        if self.failed is not None:
            return
        self.reader = _LogReader(self.record, attached)
        while True:
            try:
                info = await self.ray.info(self.sub_id) or {}
                self.message = str(info.get("message") or "")
                if info.get("start_time"):
                    self.started = float(info["start_time"]) / 1000.0
                status = str(info.get("status", "PENDING"))
                self.reader.feed(await self.ray.logs(self.sub_id), final=status in RAY_TERMINAL)
                self.status = status  # after the log: a terminal status comes with the result line read
            except (RayUnavailable, ValueError) as exc:  # the dashboard away a moment: the job goes on
                log.warning("retraining job %s: cannot read Ray job %s (%s)", self.record.id, self.sub_id, exc)
            if self.status in RAY_TERMINAL:
                return
            await asyncio.sleep(self.settings.ray_poll_interval)


async def _run(ray: RayJobs, record: JobRecord, work_dir: Path, model_store: Path, settings, tick,
               timeout_s: float, grace_s: float, poll_s: float) -> Outcome:
    sub_id = submission_id(record)
    spec = spec_path(model_store, sub_id, getattr(settings, "state_dir", "") or None)
    follow = _Follow(ray, record, sub_id, settings)
    follower = asyncio.ensure_future(follow.run(work_dir, model_store, spec))
    began = time.time()
    reason = ""
    try:
        while not follower.done():
            await asyncio.wait([follower], timeout=poll_s)
            if follower.done():
                break
            if time.time() - (follow.started or began) >= timeout_s:
                reason = "timeout"
            else:
                reason = await tick() or ""
            if reason:
                break
    finally:
        follower.cancel()
        await asyncio.gather(follower, return_exceptions=True)
    if follow.failed is not None:
        return follow.failed
    reader = follow.reader or _LogReader(record, True)
    if reason in ("cancelled", "timeout"):
        await _stop(ray, sub_id, record, reader, grace_s)
        spec.unlink(missing_ok=True)
        if reason == "timeout":
            return Outcome("failed", message=f"timed out after {timeout_s:g} s (params timeout_s); "
                                             f"Ray job {sub_id} was stopped", error="timeout")
        return Outcome("stopped", reason="cancelled", message="cancelled")
    if reason:  # superseded or shutdown: the Ray job goes on; whoever runs the job next follows it
        return Outcome("stopped", reason=reason, message=reason)
    spec.unlink(missing_ok=True)
    if follow.status == "STOPPED" and reader.final is None:
        return Outcome("stopped", reason="cancelled", message=f"Ray job {sub_id} was stopped")
    if reader.final is not None:
        return outcome_of(reader.final, 0)
    return Outcome("failed", message=f"Ray job {sub_id} {follow.status.lower()} before it returned: "
                                     f"{follow.message}".strip(), error=follow.message or follow.status)


async def _stop(ray: RayJobs, sub_id: str, record: JobRecord, reader: _LogReader, grace_s: float) -> None:
    """Stop the Ray job and wait (a bounded time) until Ray says it has ended."""
    deadline = time.monotonic() + max(grace_s, 3.0) + STOP_WAIT_S
    stopped_asked = False
    while time.monotonic() < deadline:
        try:
            if not stopped_asked:
                await ray.stop(sub_id)
                stopped_asked = True
            info = await ray.info(sub_id) or {}
            if info.get("status") in RAY_TERMINAL or not info:
                reader.feed(await ray.logs(sub_id), final=True)
                return
        except (RayUnavailable, ValueError) as exc:
            log.warning("retraining job %s: stopping Ray job %s: %s", record.id, sub_id, exc)
        await asyncio.sleep(0.2)
    log.error("retraining job %s: Ray job %s did not end within %.0f s of being stopped", record.id, sub_id,
              STOP_WAIT_S)
