"""Retraining jobs without Redis: run by the server itself, records in files in its state folder.

Layout under ``<state_dir>/jobs/`` (setting ``state_dir``, by default ``<model_store>/.osprey``)::

    {id}.json        the JobRecord (written whole: a temporary file, then os.replace)
    {id}.lock        flock'ed by the process running the job (the kernel drops it when that process dies)
    {id}.cancel      a cancel asked for by a process that does not run the job
    dedup/{digest}   the id of the job for (model, episode): made with os.link, which fails if it exists

Only the process holding a job's lock writes its record (and the submitter, before anyone can
hold it). A dispatcher task claims jobs whose state is ``queued`` (and whose ``not_before`` has
come) or ``running`` with a free lock: the process that ran it died, so it runs again; its work
folder is emptied first. That is restart-after-crash: a server that starts on the same model
store finds the jobs the dead one left and runs them. Several processes on one store are safe
(a job is run by whoever takes its lock), though each notices jobs others submitted only at
its next scan (``EMBEDDED_SCAN_S``).

At most ``retraining_concurrency`` jobs run at once in one process (default 1); each in a child
process (runner.py), so a cancel stops it and a crash of the job is a failed job, not a crash
of the server.
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import logging
import os
import time
from pathlib import Path

from server.retraining.jobs import JobRecord, JobState
from server.retraining.queue import (finished_conflict, jobs_dir_for, new_record, not_found, retry_delay,
                                     timeout_of, work_dir_for)
from server.retraining.runner import attempt_runner, finish_record, runner_name

__all__ = ["EmbeddedJobQueue"]

log = logging.getLogger("osprey.retraining")

EMBEDDED_SCAN_S = 2.0  # how often the job files are scanned for work (a local submit wakes it at once)
RUN_POLL_S = 0.25
WRITE_EVERY_S = 0.5


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{id(text)}.tmp")
    with open(tmp, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


class _Run:
    def __init__(self, job_id: str, lock_fd: int):
        self.job_id = job_id
        self.lock_fd = lock_fd
        self.cancel = asyncio.Event()
        self.task: asyncio.Task | None = None


class EmbeddedJobQueue:
    def __init__(self, model_store: Path | str, *, settings=None, concurrency: int | None = None):
        from server.settings import Settings

        self.settings = settings or Settings()
        self._run_attempt = attempt_runner(self.settings)
        self.model_store = Path(model_store)
        self.state_dir = self.settings.state_dir or None  # None: <model_store>/.osprey
        self.dir = jobs_dir_for(self.model_store, self.state_dir)
        self.concurrency = max(1, concurrency or self.settings.retraining_concurrency)
        self.grace_s = self.settings.retraining_cancel_grace
        self._runs: dict[str, _Run] = {}
        self._terminal: set[str] = set()  # ids whose records are final (never read again by the scan)
        self._wake: asyncio.Event | None = None
        self._dispatcher: asyncio.Task | None = None
        self._closing = False

    # ------------------------------------------------------------------ files
    def _path(self, job_id: str, suffix: str = ".json") -> Path:
        if not job_id or "/" in job_id or job_id.startswith("."):
            raise not_found(job_id)
        return self.dir / f"{job_id}{suffix}"

    def _read(self, job_id: str) -> JobRecord | None:
        try:
            return JobRecord.from_json(self._path(job_id).read_text())
        except FileNotFoundError:
            return None
        except ValueError as exc:
            log.error("job file %s is unreadable: %s", self._path(job_id), exc)
            return None

    def _write(self, record: JobRecord) -> None:
        _write_atomic(self._path(record.id), record.to_json())

    def _dedup_path(self, model: str, episode: str) -> Path:
        digest = hashlib.sha256(f"{model}\0{episode}".encode()).hexdigest()[:40]
        return self.dir / "dedup" / digest

    def _try_lock(self, job_id: str) -> int | None:
        fd = os.open(self._path(job_id, ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        return fd

    @staticmethod
    def _unlock(fd: int) -> None:
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    # ------------------------------------------------------------------ JobQueue
    async def start(self) -> None:
        if self._dispatcher is not None:
            return
        (self.dir / "dedup").mkdir(parents=True, exist_ok=True)
        self._wake = asyncio.Event()
        self._dispatcher = asyncio.ensure_future(self._dispatch())

    async def submit(self, model: str, version: str, trigger: str, episode: str,
                     params: dict) -> tuple[JobRecord, bool]:
        record = new_record(model, version, trigger, episode, params)
        record.add_step("queued", f"trigger {trigger}, episode {episode}")
        (self.dir / "dedup").mkdir(parents=True, exist_ok=True)
        pointer = self._dedup_path(model, episode)
        for _ in range(2):
            existing = await self._existing(pointer)
            if existing is not None:
                return existing, False
            tmp_record = self.dir / f".{record.id}.json.new"
            tmp_pointer = pointer.with_name(f".{pointer.name}.{record.id}")
            tmp_record.write_text(record.to_json())
            tmp_pointer.write_text(record.id)
            try:
                os.link(tmp_pointer, pointer)  # atomic: exactly one submitter makes the pointer
            except FileExistsError:
                tmp_record.unlink()
                continue
            finally:
                tmp_pointer.unlink()
            os.replace(tmp_record, self._path(record.id))
            if self._wake is not None:
                self._wake.set()
            log.info("retraining job %s queued: model %s, trigger %s, episode %s", record.id, model, trigger, episode)
            return record, True
        existing = await self._existing(pointer)
        if existing is None:
            raise RuntimeError(f"job dedup pointer {pointer} points at no job")
        return existing, False

    async def _existing(self, pointer: Path) -> JobRecord | None:
        """The job the dedup pointer names; a pointer left by a submitter that died is removed."""
        try:
            job_id = pointer.read_text().strip()
        except FileNotFoundError:
            return None
        for _ in range(50):  # the other submitter moves its record in right after making the pointer
            record = self._read(job_id)
            if record is not None:
                return record
            await asyncio.sleep(0.02)
        log.warning("dedup pointer %s names job %s, which does not exist: removed", pointer, job_id)
        pointer.unlink(missing_ok=True)
        return None

    async def get(self, job_id: str) -> JobRecord | None:
        try:
            return self._read(job_id)
        except Exception:  # noqa: BLE001 - a malformed id is simply no job
            return None

    async def list(self, model: str | None = None, limit: int = 100) -> list[JobRecord]:
        records = []
        for path in self.dir.glob("*.json") if self.dir.is_dir() else ():
            record = self._read(path.stem)
            if record is not None and (model is None or record.model == model):
                records.append(record)
        records.sort(key=lambda r: r.created, reverse=True)
        return records[:limit]

    async def cancel(self, job_id: str) -> JobRecord:
        record = await self.get(job_id)
        if record is None:
            raise not_found(job_id)
        if record.terminal:
            raise finished_conflict(record)
        run = self._runs.get(job_id)
        if run is not None:  # this process runs it
            run.cancel.set()
            if run.task is not None:
                await asyncio.wait([run.task], timeout=self.grace_s + 10)
            return await self.get(job_id)
        self._path(job_id, ".cancel").touch()
        fd = self._try_lock(job_id)
        if fd is not None:  # nobody runs it: end it here
            try:
                record = self._read(job_id)
                if record is not None and not record.terminal:
                    self._cancelled(record, "cancelled before it ran" if record.state is JobState.QUEUED
                                    else "cancelled (the process that ran it is gone)")
                    self._write(record)
            finally:
                self._unlock(fd)
            return record
        deadline = time.monotonic() + self.grace_s + 10  # another process runs it: it stops it
        while time.monotonic() < deadline:
            record = self._read(job_id)
            if record is None or record.terminal:
                break
            await asyncio.sleep(0.1)
        return self._read(job_id)

    async def close(self) -> None:
        """Stop dispatching; running jobs are stopped and left queued: they run again at the next start."""
        self._closing = True
        if self._dispatcher is not None:
            self._dispatcher.cancel()
            await asyncio.gather(self._dispatcher, return_exceptions=True)
        tasks = [run.task for run in self._runs.values() if run.task is not None]
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    # ------------------------------------------------------------------ running
    @staticmethod
    def _cancelled(record: JobRecord, message: str) -> None:
        record.state = JobState.CANCELLED
        record.cancel_requested = True
        record.finished = time.time()
        record.message = message
        record.add_step("cancelled", message)

    async def _dispatch(self) -> None:
        while not self._closing:
            next_due = EMBEDDED_SCAN_S
            try:
                next_due = self._claim_due()
            except Exception:  # noqa: BLE001 - a bad file must not stop the dispatcher
                log.exception("retraining dispatcher: scan failed")
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=max(0.05, next_due))
            except asyncio.TimeoutError:
                pass

    def _claim_due(self) -> float:
        """Start the jobs that are due (as many as concurrency allows); seconds until the next check."""
        now = time.time()
        next_due = EMBEDDED_SCAN_S
        due = []
        for path in self.dir.glob("*.json"):
            job_id = path.stem
            if job_id in self._terminal or job_id in self._runs:
                continue
            record = self._read(job_id)
            if record is None:
                continue
            if record.terminal:
                self._terminal.add(job_id)
            elif record.not_before > now:
                next_due = min(next_due, record.not_before - now)
            else:
                due.append(record)
        for record in sorted(due, key=lambda r: r.created):
            if len(self._runs) >= self.concurrency:
                break
            fd = self._try_lock(record.id)
            if fd is None:
                continue  # another process runs it
            current = self._read(record.id)  # read again under the lock
            if current is None or current.terminal or current.not_before > time.time():
                self._unlock(fd)
                continue
            run = self._runs[record.id] = _Run(record.id, fd)
            run.task = asyncio.ensure_future(self._run(run, current))
        return next_due

    async def _run(self, run: _Run, record: JobRecord) -> None:
        try:
            await self._attempt(run, record)
        except Exception:  # noqa: BLE001
            log.exception("retraining job %s: the queue failed while running it", record.id)
            record.state = JobState.FAILED
            record.finished = time.time()
            record.message = "the job queue failed while running it; see the server log"
            self._write(record)
        finally:
            self._runs.pop(run.job_id, None)
            self._unlock(run.lock_fd)
            if self._wake is not None:
                self._wake.set()

    async def _attempt(self, run: _Run, record: JobRecord) -> None:
        cancel_file = self._path(record.id, ".cancel")
        if record.cancel_requested or cancel_file.exists():
            self._cancelled(record, "cancelled before it ran")
            self._write(record)
            return
        lost = record.state is JobState.RUNNING
        record.state = JobState.RUNNING
        record.attempts += 1
        record.started = time.time()
        record.finished = None
        record.progress = 0.0
        record.not_before = 0.0
        record.worker = runner_name()
        record.message = f"running (attempt {record.attempts})"
        record.add_step("started", f"attempt {record.attempts} on {record.worker}"
                        + (" (the process that ran it before died)" if lost else ""))
        self._write(record)
        work = work_dir_for(self.model_store, record.id, self.state_dir)  # emptied by the run (on the cluster, by the job)
        last_write = time.monotonic()

        async def tick() -> str | None:
            nonlocal last_write
            if time.monotonic() - last_write >= WRITE_EVERY_S:
                self._write(record)
                last_write = time.monotonic()
            if run.cancel.is_set() or cancel_file.exists():
                return "cancelled"
            if self._closing:
                return "shutdown"
            return None

        outcome = await self._run_attempt(record, work, self.model_store, tick=tick, timeout_s=timeout_of(record.params),
                                    grace_s=self.grace_s, poll_s=RUN_POLL_S, nice=self.settings.retraining_nice)
        if outcome.kind == "stopped" and outcome.reason == "cancelled":
            self._cancelled(record, "cancelled while running; its process was stopped")
        elif outcome.kind == "stopped":  # the server is stopping
            record.state = JobState.QUEUED
            record.message = "the server stopped; the job runs again when it starts"
            record.add_step("requeued", record.message)
        elif outcome.kind == "retry" and record.attempts < record.max_attempts:
            delay = retry_delay(record.params, record.attempts)
            record.state = JobState.QUEUED
            record.not_before = time.time() + delay
            record.error = outcome.error
            record.message = f"attempt {record.attempts} failed ({outcome.message}); retrying in {delay:g} s"
            record.add_step("retry", record.message)
        else:
            if outcome.kind == "retry":
                outcome.kind = "failed"
                outcome.message = f"gave up after {record.attempts} attempts: {outcome.message}"
            finish_record(record, outcome)
        self._write(record)
        log.info("retraining job %s: %s (%s)", record.id, record.state.value, record.message)
