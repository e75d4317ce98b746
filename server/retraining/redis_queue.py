"""Retraining jobs on Redis: records in Redis hashes, jobs on a saq queue, run by ``osprey worker``.

Why saq (issue 12 asked to weigh saq, streaq, dramatiq, taskiq-redis, arq, rq): it is asyncio
native like the server, and it is the one that reruns a job whose worker was SIGKILLed *while
keeping a live long job from running twice*: a running job carries a heartbeat (``touched``); a
sweep, run by any live worker, takes a job whose heartbeat is older than ``heartbeat`` seconds
for lost and queues it again. arq reruns only after its timeout (a long job holds it for
hours), RQ sends a killed worker's job to the failed registry, Celery/Dramatiq/taskiq redeliver
after a visibility timeout that long jobs outlive. saq also has retries with a delay per job,
job keys (idempotent enqueue) and abort.

Keys (all under ``osprey:retraining:``)::

    job:{id}                 hash, one field per JobRecord attribute, each JSON-encoded
    jobs                     sorted set of job ids by creation time (every model)
    model:{model}            sorted set of one model's job ids
    dedup:{model}:{episode}  the id of the job for that episode (SET NX in one script with the record)

What saq does and what this module adds:

- **Dedup**: the record and its ``dedup`` key are written by one Lua script; a second submit
  for the same (model, episode), from any process, gets the first job back. The saq job's key
  is the job id, so enqueuing it again (a submit that finds a queued record re-enqueues it,
  which heals a submit cut off between the two steps) is a no-op while it is queued.
- **State changes are fenced**: a run starts with a script that moves the record to
  ``running`` and increments ``attempts`` (or ends it ``cancelled`` when a cancel came first);
  every later write by that run checks that the record is still ``running`` with the same
  ``attempts``. A run that was given up for lost and started again elsewhere finds its writes
  refused, stops its child process and goes away: two runs never both finish a job.
- **Lost workers**: the worker's sweep (saq) requeues a job whose heartbeat stopped; this
  queue's hooks on saq's retry/finish move the record back to ``queued`` (a step "worker lost")
  or, with no reruns left, to ``failed``. The next run empties the job's work folder first.
- **Retries**: a ``RetryableError`` puts the record back to ``queued`` with ``not_before`` and
  hands saq a retry with exactly that delay (``backoff_s * 2**(attempt-1)``); other errors fail
  the job at once.
- **Cancel**: sets ``cancel_requested``; a queued job is ended at once (and taken off saq's
  queue), a running one is stopped by its worker within a poll (``RUN_POLL_S``), which
  SIGTERMs the child's process group, SIGKILLs it ``retraining_cancel_grace`` seconds later,
  and records ``cancelled``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

from redis.exceptions import ConnectionError as RedisConnectionError, TimeoutError as RedisTimeoutError

from server.core.errors import ErrorKind, OspreyError
from server.retraining.jobs import JobRecord, JobState
from server.retraining.queue import (QueueUnavailable, finished_conflict, new_record, not_found, retry_delay,
                                     timeout_of, work_dir_for)
from server.retraining.runner import attempt_runner, finish_record, runner_name

__all__ = ["RedisJobQueue", "SAQ_QUEUE", "SAQ_FUNCTION", "PREFIX"]

log = logging.getLogger("osprey.retraining")

PREFIX = "osprey:retraining"
SAQ_QUEUE = "osprey-retraining"
SAQ_FUNCTION = "osprey_retraining_job"
LOST_RERUNS = 3  # reruns after lost workers, on top of max_attempts, before a job is failed
RUN_POLL_S = 0.25  # how often a running job's record is written and its cancel flag read
WRITE_EVERY_S = 0.5  # progress/log writes are batched this long
SWEEP_ABORT_WAIT_S = 1.0
# a job a stopping worker hands back waits this long, so that worker (still dequeuing until it
# has stopped) does not take it again
STOPPING_REQUEUE_DELAY_S = 3.0  # the sweep waits this long for a lost job's worker to acknowledge

# the fields a run writes (never cancel_requested, attempts or the identity: those are the scripts')
RUN_FIELDS = ("state", "phase", "progress", "message", "started", "finished", "gate", "challenger", "steps",
              "log_tail", "error", "result", "not_before", "worker")

_SUBMIT = """
local existing = redis.call('GET', KEYS[1])
if existing and redis.call('EXISTS', ARGV[3] .. existing) == 1 then return {0, existing} end
redis.call('SET', KEYS[1], ARGV[1])
redis.call('HSET', KEYS[2], unpack(ARGV, 4))
redis.call('ZADD', KEYS[3], ARGV[2], ARGV[1])
redis.call('ZADD', KEYS[4], ARGV[2], ARGV[1])
return {1, ARGV[1]}
"""

_STEP = """
local function step(key, now, name, detail)
  local steps = cjson.decode(redis.call('HGET', key, 'steps') or '[]')
  table.insert(steps, {ts = tonumber(now), step = name, detail = detail})
  redis.call('HSET', key, 'steps', cjson.encode(steps))
end
local function state_of(key)
  local raw = redis.call('HGET', key, 'state')
  if not raw then return nil end
  return cjson.decode(raw)
end
"""

# a run begins: queued (or running, when the run before it was lost) -> running, attempts + 1
_START = _STEP + """
local state = state_of(KEYS[1])
if not state then return {'missing'} end
if state ~= 'queued' and state ~= 'running' then return {'terminal', state} end
if cjson.decode(redis.call('HGET', KEYS[1], 'cancel_requested') or 'false') then
  redis.call('HSET', KEYS[1], 'state', '"cancelled"', 'finished', ARGV[1], 'message', '"cancelled before it ran"')
  step(KEYS[1], ARGV[1], 'cancelled', 'cancelled before it ran')
  return {'cancelled'}
end
local attempts = tonumber(redis.call('HGET', KEYS[1], 'attempts') or '0') + 1
redis.call('HSET', KEYS[1], 'state', '"running"', 'attempts', tostring(attempts), 'started', ARGV[1],
           'finished', 'null', 'progress', '0', 'not_before', '0', 'worker', cjson.encode(ARGV[2]),
           'message', cjson.encode('running (attempt ' .. attempts .. ')'))
local detail = 'attempt ' .. attempts .. ' on ' .. ARGV[2]
if state == 'running' then detail = detail .. ' (the run before it was lost)' end
step(KEYS[1], ARGV[1], 'started', detail)
return {'run', tostring(attempts)}
"""

# a write by the run with this attempt number, only while it is still the record's run
_UPDATE = _STEP + """
local cancel = redis.call('HGET', KEYS[1], 'cancel_requested') or 'false'
if state_of(KEYS[1]) ~= 'running' or tonumber(redis.call('HGET', KEYS[1], 'attempts')) ~= tonumber(ARGV[1]) then
  return {0, cancel}
end
if #ARGV > 1 then redis.call('HSET', KEYS[1], unpack(ARGV, 2)) end
return {1, cancel}
"""

_CANCEL = _STEP + """
local state = state_of(KEYS[1])
if not state then return {'missing'} end
if state ~= 'queued' and state ~= 'running' then return {'terminal', state} end
redis.call('HSET', KEYS[1], 'cancel_requested', 'true')
if state == 'queued' then
  redis.call('HSET', KEYS[1], 'state', '"cancelled"', 'finished', ARGV[1], 'message', '"cancelled before it ran"')
  step(KEYS[1], ARGV[1], 'cancelled', 'cancelled before it ran')
  return {'cancelled'}
end
return {'running'}
"""

# saq gave a run up for lost: back to queued (requeued) or, with no reruns left, failed/cancelled
_LOST = _STEP + """
local state = state_of(KEYS[1])
if state ~= 'queued' and state ~= 'running' then return 0 end
if ARGV[2] == '1' then
  if state == 'running' then
    redis.call('HSET', KEYS[1], 'state', '"queued"', 'message', cjson.encode(ARGV[3]))
    step(KEYS[1], ARGV[1], 'worker lost', ARGV[3])
  end
  return 1
end
local final = 'failed'
if cjson.decode(redis.call('HGET', KEYS[1], 'cancel_requested') or 'false') then final = 'cancelled' end
redis.call('HSET', KEYS[1], 'state', cjson.encode(final), 'finished', ARGV[1], 'message', cjson.encode(ARGV[3]),
           'error', cjson.encode(ARGV[4]))
step(KEYS[1], ARGV[1], final, ARGV[3])
return 1
"""


# saq's sweep listing, also saying whether this worker got the sweep lock
_SWEEP_LIST = """
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('SETEX', KEYS[1], ARGV[1], 1)
  local out = {}
  for i, v in ipairs(redis.call('LRANGE', KEYS[2], 0, -1)) do out[i] = {v, redis.call('GET', v)} end
  return {1, out}
end
return {0, {}}
"""


def job_key(job_id: str) -> str:
    return f"{PREFIX}:job:{job_id}"


def model_index(model: str) -> str:
    return f"{PREFIX}:model:{quote(model, safe='')}"


def dedup_key(model: str, episode: str) -> str:
    return f"{PREFIX}:dedup:{quote(model, safe='')}:{episode}"


ALL_JOBS = f"{PREFIX}:jobs"
REDIS_DOWN = (OSError, ConnectionError, RedisConnectionError, RedisTimeoutError)


def _encode(record: JobRecord, fields=None) -> list[str]:
    d = record.as_dict()
    out: list[str] = []
    for name in d if fields is None else fields:
        out += [name, json.dumps(d[name], separators=(",", ":"))]
    return out


def _decode(raw: dict) -> JobRecord | None:
    if not raw:
        return None
    return JobRecord.from_dict({(k.decode() if isinstance(k, bytes) else k): json.loads(v) for k, v in raw.items()})


def _unavailable(exc: Exception) -> OspreyError:
    return OspreyError(ErrorKind.UNAVAILABLE, f"the retraining queue's Redis is unreachable: {exc}", retry_after=5)


class RedisJobQueue:
    """The JobQueue on Redis (server side: submit, read, cancel) and the worker's job body."""

    def __init__(self, redis_url: str, model_store: Path | str, *, settings=None):
        from redis import asyncio as aioredis

        from server.settings import Settings

        self.settings = settings or Settings()
        self._run_attempt = attempt_runner(self.settings)
        self.url = redis_url
        self.model_store = Path(model_store)
        self.redis = aioredis.from_url(redis_url)
        self._scripts = {name: self.redis.register_script(src) for name, src in
                         (("submit", _SUBMIT), ("start", _START), ("update", _UPDATE), ("cancel", _CANCEL),
                          ("lost", _LOST))}
        self._saq = None
        self.stopping = False  # the worker is stopping: running jobs are requeued, none is started
        self._executing: set[asyncio.Task] = set()

    # ------------------------------------------------------------------ saq
    @property
    def saq(self):
        if self._saq is None:
            self._saq = _make_saq_queue(self)
        return self._saq

    def _saq_job(self, record: JobRecord):
        from saq.job import Job

        timeout = timeout_of(record.params) + self.settings.retraining_cancel_grace + 60
        return Job(function=SAQ_FUNCTION, kwargs={"job_id": record.id}, key=record.id, timeout=int(timeout),
                   heartbeat=max(1, round(self.settings.retraining_heartbeat)),
                   retries=record.max_attempts + LOST_RERUNS, ttl=3600, queue=self.saq)

    # ------------------------------------------------------------------ JobQueue
    async def start(self) -> None:
        """Nothing runs here: ``osprey worker`` processes run the jobs."""

    async def submit(self, model: str, version: str, trigger: str, episode: str,
                     params: dict) -> tuple[JobRecord, bool]:
        record = new_record(model, version, trigger, episode, params)
        record.add_step("queued", f"trigger {trigger}, episode {episode}")
        try:
            created, job_id = await self._scripts["submit"](
                keys=[dedup_key(model, episode), job_key(record.id), ALL_JOBS, model_index(model)],
                args=[record.id, record.created, f"{PREFIX}:job:", *_encode(record)])
            job_id = job_id.decode() if isinstance(job_id, bytes) else job_id
            if not created:
                existing = await self.get(job_id)
                if existing is None:
                    raise OspreyError(ErrorKind.INTERNAL, f"job {job_id} vanished while it was submitted")
                if existing.state is JobState.QUEUED and existing.not_before == 0:
                    await self.saq.enqueue(self._saq_job(existing))  # no-op unless an earlier submit was cut off
                return existing, False
            await self.saq.enqueue(self._saq_job(record))
        except OspreyError:
            raise
        except REDIS_DOWN as exc:
            raise QueueUnavailable(f"the retraining queue's Redis is unreachable: {exc}") from None
        log.info("retraining job %s queued: model %s, trigger %s, episode %s", record.id, model, trigger, episode)
        return record, True

    async def get(self, job_id: str) -> JobRecord | None:
        try:
            return _decode(await self.redis.hgetall(job_key(job_id)))
        except REDIS_DOWN as exc:
            raise _unavailable(exc) from None

    async def list(self, model: str | None = None, limit: int = 100) -> list[JobRecord]:
        index = model_index(model) if model else ALL_JOBS
        try:
            ids = await self.redis.zrevrange(index, 0, max(0, limit - 1))
            async with self.redis.pipeline(transaction=False) as pipe:
                for job_id in ids:
                    pipe.hgetall(job_key(job_id.decode()))
                raws = await pipe.execute()
            gone = [i for i, raw in zip(ids, raws) if not raw]
            if gone:  # expired records
                await self.redis.zrem(index, *gone)
        except REDIS_DOWN as exc:
            raise _unavailable(exc) from None
        return [r for r in (_decode(raw) for raw in raws) if r is not None]

    async def cancel(self, job_id: str) -> JobRecord:
        try:
            answer = await self._scripts["cancel"](keys=[job_key(job_id)], args=[json.dumps(time.time())])
        except REDIS_DOWN as exc:
            raise _unavailable(exc) from None
        what = answer[0].decode()
        if what == "missing":
            raise not_found(job_id)
        if what == "terminal":
            raise finished_conflict(await self.get(job_id))
        if what == "cancelled":  # it was queued: take it off saq's queue too
            job = await self.saq.job(job_id)
            if job is not None:
                await self.saq.abort(job, "cancelled")
                job = await self.saq.job(job_id)
                if job is not None and job.status.value == "aborting":
                    # it was waiting for a retry (not on the queue list): end saq's copy too
                    from saq.job import Status

                    await self.saq.finish(job, Status.ABORTED, error="cancelled")
            await self._expire(job_id)
            return await self.get(job_id)
        # running: its worker stops the child within a poll and records it
        deadline = time.monotonic() + self.settings.retraining_cancel_grace + 10.0
        while time.monotonic() < deadline:
            record = await self.get(job_id)
            if record is None or record.terminal:
                break
            await asyncio.sleep(0.1)
        return await self.get(job_id)

    async def close(self) -> None:
        if self._saq is not None:
            await self._saq.disconnect()
            self._saq = None
        else:
            await self.redis.aclose()

    # ------------------------------------------------------------------ helpers
    async def _expire(self, job_id: str) -> None:
        record = await self.get(job_id)
        if record is None:
            return
        ttl = int(self.settings.retraining_job_ttl)
        if ttl > 0:
            await self.redis.expire(job_key(job_id), ttl)
            await self.redis.expire(dedup_key(record.model, record.episode), ttl)

    async def _lost(self, job, requeued: bool, error: str | None) -> None:
        """saq's sweep (or its error path) gave a run up: say so in the record."""
        if requeued:
            message = (f"its worker was lost (no heartbeat for {job.heartbeat} s); queued to run again")
        else:
            message = f"gave up: the job's worker was lost or failed ({(error or '').strip().splitlines()[-1:]})"
        try:
            await self._scripts["lost"](keys=[job_key(job.key)],
                                        args=[json.dumps(time.time()), "1" if requeued else "0", message,
                                              (error or "")[-2000:]])
            if not requeued:
                await self._expire(job.key)
        except Exception:  # noqa: BLE001 - the sweep must go on
            log.exception("could not record that job %s was lost", job.key)

    # ------------------------------------------------------------------ the worker's job body
    async def stop_running(self, timeout: float) -> None:
        """Stop the jobs this worker runs and queue them again (worker shutdown)."""
        self.stopping = True
        if self._executing:
            await asyncio.wait(list(self._executing), timeout=timeout)

    async def execute(self, saq_ctx: dict, *, job_id: str) -> dict:
        """Run one attempt of job ``job_id`` (called by saq in ``osprey worker``)."""
        task = asyncio.current_task()
        self._executing.add(task)
        try:
            return await self._execute(saq_ctx, job_id)
        finally:
            self._executing.discard(task)

    async def _execute(self, saq_ctx: dict, job_id: str) -> dict:
        saq_job = saq_ctx["job"]
        if self.stopping:
            saq_job.retry_delay = STOPPING_REQUEUE_DELAY_S
            raise _RetryLater("the worker is stopping")
        answer = await self._scripts["start"](keys=[job_key(job_id)],
                                              args=[json.dumps(time.time()), runner_name()])
        what = answer[0].decode()
        if what != "run":
            log.info("job %s not run: %s", job_id, what)
            if what == "cancelled":
                await self._expire(job_id)
            return {"skipped": what}
        attempt = int(answer[1])
        record = await self.get(job_id)
        work = work_dir_for(self.model_store, job_id, self.settings.state_dir or None)  # emptied by the run (on the cluster, by the job)
        log.info("job %s: attempt %d (model %s, trigger %s)", job_id, attempt, record.model, record.trigger)
        heartbeat_every = max(0.2, (saq_job.heartbeat or 30) / 3)
        last_beat = last_write = time.monotonic()
        superseded = False

        async def write(fields=RUN_FIELDS) -> tuple[bool, bool]:
            ok, cancel = await self._scripts["update"](keys=[job_key(job_id)],
                                                       args=[attempt, *_encode(record, fields)])
            return bool(ok), json.loads(cancel)

        async def tick() -> str | None:
            nonlocal last_beat, last_write, superseded
            now = time.monotonic()
            try:
                fields = RUN_FIELDS if now - last_write >= WRITE_EVERY_S else ()
                ok, cancel = await write(fields)  # refused once another run has taken the job over
                if fields:
                    last_write = now
                if ok and now - last_beat >= heartbeat_every:
                    await saq_job.update()  # the heartbeat: saq's sweep leaves a job with a fresh one alone
                    last_beat = now
            except Exception as exc:  # noqa: BLE001 - Redis away: the job goes on; the sweep decides
                log.warning("job %s: cannot reach Redis (%s); the run goes on", job_id, exc)
                return None
            if not ok:
                superseded = True
                return "superseded"
            if cancel:
                return "cancelled"
            return "shutdown" if self.stopping else None

        try:
            outcome = await self._run_attempt(record, work, self.model_store, tick=tick, timeout_s=timeout_of(record.params),
                                        grace_s=self.settings.retraining_cancel_grace, poll_s=RUN_POLL_S,
                                        nice=self.settings.retraining_nice)
        except asyncio.CancelledError:  # the worker is stopping (SIGTERM): the job goes back to the queue
            record.state = JobState.QUEUED
            record.message = "its worker stopped; queued to run again"
            record.add_step("requeued", record.message)
            await asyncio.shield(write())
            raise
        if outcome.kind == "stopped":
            if outcome.reason == "superseded" or superseded:
                log.warning("job %s: attempt %d was taken over by another run; stopped", job_id, attempt)
                return {"superseded": attempt}
            if outcome.reason == "shutdown":
                record.state = JobState.QUEUED
                record.message = "its worker stopped; queued to run again"
                record.add_step("requeued", record.message)
                await write()
                saq_job.retry_delay = STOPPING_REQUEUE_DELAY_S
                raise _RetryLater(record.message)
            record.state = JobState.CANCELLED
            record.finished = time.time()
            record.message = "cancelled while running; its process was stopped"
            record.add_step("cancelled", record.message)
        elif outcome.kind == "retry":
            if attempt < record.max_attempts:
                delay = retry_delay(record.params, attempt)
                record.state = JobState.QUEUED
                record.not_before = time.time() + delay
                record.error = outcome.error
                record.message = f"attempt {attempt} failed ({outcome.message}); retrying in {delay:g} s"
                record.add_step("retry", record.message)
                ok, _ = await write()
                if ok:
                    saq_job.retry_delay = delay
                    raise _RetryLater(record.message)
                return {"superseded": attempt}
            outcome.kind = "failed"
            outcome.message = f"gave up after {attempt} attempts: {outcome.message}"
            finish_record(record, outcome)
        else:
            finish_record(record, outcome)
        ok, _ = await write()
        if ok and record.terminal:
            await self._expire(job_id)
        log.info("job %s: %s (%s)", job_id, record.state.value, record.message)
        return {"state": record.state.value}


class _RetryLater(Exception):
    """Raised to saq so that it queues the job again after ``job.retry_delay`` seconds."""





def _make_saq_queue(owner: RedisJobQueue):
    from saq.job import Status
    from saq.queue.redis import RedisQueue

    class OspreySaqQueue(RedisQueue):
        """saq's Redis queue, telling the job records when a sweep gives a run up.

        Its sweep is saq's with one change: saq sweeps every job on the active list whose status
        is not ``active``, which includes a job a worker has just moved there (BLMOVE) and not yet
        marked active: a live job swept and run twice (seen in tests: a worker's first sweep
        met its first dequeue). Here such a job is swept only when this worker's previous sweep
        saw it not started too, a sweep interval earlier. A job whose heartbeat is stale is
        swept at once, as in saq.
        """

        _unstarted: set = set()
        _list_script = None
        _down_since: float | None = None

        async def dequeue(self, timeout: float = 0.0, poll_interval: float = 0.0):
            # saq's worker loop asks again at once when dequeue fails: with Redis away that spins
            try:
                job = await super().dequeue(timeout, poll_interval)
            except REDIS_DOWN as exc:
                if self._down_since is None:
                    self._down_since = time.monotonic()
                    log.warning("the job queue's Redis is unreachable (%s); retrying every second", exc)
                await asyncio.sleep(1.0)
                return None
            if self._down_since is not None:
                log.info("the job queue's Redis is back after %.0f s", time.monotonic() - self._down_since)
                self._down_since = None
            return job

        async def sweep(self, lock: int = 60, abort: float = 5.0) -> list[str]:
            if self._list_script is None:
                self._list_script = self.redis.register_script(_SWEEP_LIST)
            acquired, id_jobs = await self._list_script(keys=[self._sweep, self._active], args=[lock],
                                                        client=self.redis)
            if not acquired:
                return []
            swept, unstarted = [], set()
            for job_id, job_bytes in id_jobs:
                job = self.deserialize(job_bytes)
                if job is None:
                    swept.append(job_id)
                    async with self.redis.pipeline(transaction=True) as pipe:
                        await pipe.lrem(self._active, 0, job_id).zrem(self._incomplete, job_id).execute()
                    continue
                if job.status == Status.ACTIVE and not job.stuck:
                    continue
                if not job.stuck:
                    unstarted.add(job_id)
                    if job_id not in self._unstarted:
                        continue  # its worker may be about to mark it active: look again next time
                log.info("sweeping job %s (%s)", job.key, "no heartbeat" if job.stuck else "never started")
                swept.append(job_id)
                await self.abort(job, error=self.swept_error_message)
                try:
                    await job.refresh(SWEEP_ABORT_WAIT_S)
                except asyncio.TimeoutError:
                    pass
                if job.retryable:
                    await self.retry(job, error=self.swept_error_message)
                else:
                    await self.finish(job, Status.ABORTED, error=self.swept_error_message)
            self._unstarted = unstarted
            return [j.decode() if isinstance(j, bytes) else j for j in swept]

        async def retry(self, job, error: str | None) -> None:
            if error == self.swept_error_message:
                await owner._lost(job, requeued=True, error=error)
            await super().retry(job, error)

        async def finish(self, job, status, *, result: Any = None, error: str | None = None, **kw) -> None:
            if isinstance(result, dict) and "superseded" in result:
                return  # a stale run (given up for lost, yet alive): the saq job is the new run's now
            await super().finish(job, status, result=result, error=error, **kw)
            swept_retry = status == Status.ABORTED and error == self.swept_error_message and job.retryable
            if status in (Status.FAILED, Status.ABORTED) and not swept_retry:
                await owner._lost(job, requeued=False, error=error)

    return OspreySaqQueue(owner.redis, name=SAQ_QUEUE)
