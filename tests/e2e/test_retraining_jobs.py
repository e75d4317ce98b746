"""The retraining job queue against real processes: redis-server, `osprey worker`, job children.

Timing is gated by files (the tasks in tests/retraining_tasks.py wait on a gate file the test
creates) and by polling for states with a deadline; nothing sleeps to synchronise.
Workers run with a 2 s heartbeat and a 1 s sweep, so a lost job is rerun within seconds.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from server.core.errors import ErrorKind, OspreyError
from server.retraining.embedded import EmbeddedJobQueue
from server.retraining.jobs import JobState
from server.retraining.queue import QueueUnavailable
from server.retraining.redis_queue import RedisJobQueue
from server.settings import Settings

from ..conftest import ROOT, free_port
from ..gates import alive, wait_for
from ..redis_server import redis_server  # noqa: F401 - fixture
from ..worker_process import WorkerProcess

FAST = {"OSPREY_RETRAINING_HEARTBEAT": "2", "OSPREY_RETRAINING_SWEEP_INTERVAL": "1",
        "OSPREY_RETRAINING_CANCEL_GRACE": "1"}
SETTINGS = Settings(retraining_heartbeat=2, retraining_sweep_interval=1, retraining_cancel_grace=1)
TASKS = "tests.retraining_tasks"


async def await_for(check, timeout: float = 60.0, what: str = "condition", poll: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = await check()
        if value:
            return value
        await asyncio.sleep(poll)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def runs(d: Path) -> list[dict]:
    path = d / "runs.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), **FAST}


@pytest.fixture
def workers(tmp_path, redis_server):
    started: list[WorkerProcess] = []
    store = tmp_path / "store"
    store.mkdir(exist_ok=True)

    def start(name: str = "w", concurrency: int = 1) -> WorkerProcess:
        w = WorkerProcess(tmp_path, redis_server.url, store, name, concurrency=concurrency, env=FAST).wait_ready()
        started.append(w)
        return w

    start.store = store
    yield start
    for w in started:
        w.stop()


@pytest.fixture
async def rq(redis_server, tmp_path):
    store = tmp_path / "store"
    store.mkdir(exist_ok=True)
    q = RedisJobQueue(redis_server.url, store, settings=SETTINGS)
    yield q
    await q.close()


def params(d: Path, task: str = "record", **extra) -> dict:
    return {"task": f"{TASKS}:{task}", "dir": str(d), **extra}


# ---------------------------------------------------------------------------- Redis


async def test_redis_job_runs_and_records_progress_steps_and_log(tmp_path, rq, workers):
    workers("a")
    d, gate = tmp_path / "m", tmp_path / "gate"
    record, created = await rq.submit("digits", "1.0", "drift", "drift:1", params(d, gate=str(gate)))
    assert created and record.state is JobState.QUEUED
    running = await await_for(lambda: _state_with(rq, record.id, lambda r: r.progress == 0.5), 60, "progress 0.5")
    assert running.state is JobState.RUNNING and running.phase == "training" and running.attempts == 1
    assert running.message == "half way"
    assert any(s["step"] == "training" and s["detail"] == "on 3 rows" for s in running.steps)
    await await_for(lambda: _state_with(rq, record.id, lambda r: {"hello from the job", "printed by the job"}
                                        <= set(r.log_tail)), 30, "log lines")
    gate.touch()
    done = await await_for(lambda: _state_with(rq, record.id, lambda r: r.terminal), 60, "the job to finish")
    assert done.state is JobState.SUCCEEDED, done
    assert done.gate == {"accuracy": 0.91, "champion_accuracy": 0.8} and done.challenger == "2.0"
    assert done.result == {"extra": 7} and done.message == "challenger 2.0 passed" and done.progress == 1.0
    assert done.started and done.finished >= done.started >= done.created
    assert [s["step"] for s in done.steps][:2] == ["queued", "started"] and done.steps[-1]["step"] == "succeeded"
    assert len(runs(d)) == 1
    assert runs(d)[0]["cwd"] == str(workers.store / ".osprey" / "work" / record.id)
    listed = await rq.list("digits")
    assert [r.id for r in listed] == [record.id]
    assert await rq.list("other") == []


async def _state_with(q, job_id, cond):
    r = await q.get(job_id)
    return r if r is not None and cond(r) else None


async def test_redis_dedup_by_model_and_episode(tmp_path, rq, redis_server):
    a, created_a = await rq.submit("digits", "1.0", "drift", "drift:7", params(tmp_path))
    b, created_b = await rq.submit("digits", "1.0", "quality", "drift:7", params(tmp_path))
    assert created_a and not created_b and a.id == b.id
    other, created = await rq.submit("tabular", "1.0", "drift", "drift:7", params(tmp_path))
    assert created and other.id != a.id
    # two processes at once, released by one file
    go = tmp_path / "go"
    cmd = [sys.executable, "-m", "tests.retraining_host", "submit", "--store", str(tmp_path / "store"),
           "--redis", redis_server.url, "--model", "digits", "--episode", "drift:8",
           "--params", json.dumps(params(tmp_path)), "--go", str(go)]
    procs = [subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for _ in range(2)]
    go.touch()
    answers = [json.loads(p.communicate(timeout=60)[0]) for p in procs]
    assert answers[0]["id"] == answers[1]["id"], answers
    assert sorted(a["created"] for a in answers) == [False, True]
    assert len([r for r in await rq.list("digits") if r.episode == "drift:8"]) == 1


async def test_redis_sigkilled_worker_job_reruns_once_on_a_live_worker(tmp_path, rq, workers):
    first = workers("first")
    d, gate = tmp_path / "m", tmp_path / "gate"
    record, _ = await rq.submit("digits", "1.0", "drift", "drift:1", params(d, gate=str(gate)))
    await await_for(lambda: _state_with(rq, record.id, lambda r: r.progress == 0.5), 60, "the first run")
    child = int((d / "pid-1").read_text())
    assert (await rq.get(record.id)).worker.endswith(f":{first.pid}")
    second = workers("second")
    first.kill()
    wait_for(lambda: not alive(child), 10, "the dead worker's job process to die with it")
    rerun = await await_for(lambda: _state_with(rq, record.id, lambda r: r.attempts == 2 and r.progress == 0.5),
                            60, "the rerun on the live worker")
    assert rerun.worker.endswith(f":{second.pid}")
    assert any(s["step"] == "worker lost" for s in rerun.steps), rerun.steps
    assert [r["found_partial"] for r in runs(d)] == [False, False]  # the dead run's work folder was wiped
    gate.touch()
    done = await await_for(lambda: _state_with(rq, record.id, lambda r: r.terminal), 60, "the job to finish")
    assert done.state is JobState.SUCCEEDED and done.attempts == 2

    async def saq_complete():  # saq marks its own job complete just after the record is final
        return (await rq.saq.job(record.id)).status.value == "complete"
    await await_for(saq_complete, 30, "saq to mark the job complete")
    assert len(runs(d)) == 2


async def test_redis_live_long_job_is_not_run_twice(tmp_path, rq, workers):
    workers("a")
    workers("b")
    d, gate = tmp_path / "m", tmp_path / "gate"
    record, _ = await rq.submit("digits", "1.0", "drift", "drift:1", params(d, gate=str(gate)))
    await await_for(lambda: _state_with(rq, record.id, lambda r: r.progress == 0.5), 60, "the run")
    started = time.time()

    async def outlived_heartbeats():  # sweeps ran every second meanwhile, on both workers
        job = await rq.saq.job(record.id)
        return job.touched / 1000 - started > 3 * job.heartbeat

    await await_for(outlived_heartbeats, 60, "the job to live three heartbeat periods")
    assert len(runs(d)) == 1 and (await rq.get(record.id)).attempts == 1
    gate.touch()
    done = await await_for(lambda: _state_with(rq, record.id, lambda r: r.terminal), 60, "the job to finish")
    assert done.state is JobState.SUCCEEDED and done.attempts == 1 and len(runs(d)) == 1


async def test_redis_retryable_error_retries_with_backoff_then_succeeds(tmp_path, rq, workers):
    workers("a")
    d = tmp_path / "m"
    record, _ = await rq.submit("digits", "1.0", "drift", "drift:1",
                                params(d, "flaky", succeed_on=3, backoff_s=1, max_attempts=3))
    done = await await_for(lambda: _state_with(rq, record.id, lambda r: r.terminal), 90, "the job to finish")
    assert done.state is JobState.SUCCEEDED and done.attempts == 3, done
    assert done.message == "worked on attempt 3"
    gaps = [b["ts"] - a["ts"] for a, b in zip(runs(d), runs(d)[1:])]
    assert gaps[0] >= 1.0 and gaps[1] >= 2.0, gaps  # backoff_s, then doubled
    assert [s["step"] for s in done.steps].count("retry") == 2


async def test_redis_retries_exhaust_to_failed_and_plain_errors_fail_at_once(tmp_path, rq, workers):
    workers("a")
    d1, d2, d3 = tmp_path / "m1", tmp_path / "m2", tmp_path / "m3"
    flaky, _ = await rq.submit("digits", "1.0", "drift", "drift:1",
                               params(d1, "flaky", succeed_on=99, backoff_s=0.5, max_attempts=2))
    failing, _ = await rq.submit("digits", "1.0", "drift", "drift:2", params(d2, "failing", max_attempts=3))
    crashing, _ = await rq.submit("digits", "1.0", "drift", "drift:3", params(d3, "crashing", max_attempts=3))
    f = await await_for(lambda: _state_with(rq, flaky.id, lambda r: r.terminal), 90, "flaky to end")
    assert f.state is JobState.FAILED and f.attempts == 2 and len(runs(d1)) == 2
    assert f.message.startswith("gave up after 2 attempts: RetryableError: resource busy on attempt 2"), f.message
    g = await await_for(lambda: _state_with(rq, failing.id, lambda r: r.terminal), 60, "failing to end")
    assert g.state is JobState.FAILED and g.attempts == 1 and len(runs(d2)) == 1
    assert "ValueError: the training data has no labels" in g.message and "Traceback" in g.error
    assert any("ValueError" in line for line in g.log_tail)
    c = await await_for(lambda: _state_with(rq, crashing.id, lambda r: r.terminal), 60, "crashing to end")
    assert c.state is JobState.FAILED and c.attempts == 1 and "killed by signal 9" in c.message, c.message


async def test_redis_cancel_queued_and_running(tmp_path, rq, workers):
    workers("a")  # one job at a time: the second waits in the queue
    d1, d2, gate = tmp_path / "m1", tmp_path / "m2", tmp_path / "gate"
    running, _ = await rq.submit("digits", "1.0", "drift", "drift:1", params(d1, gate=str(gate), ignore_term=True))
    queued, _ = await rq.submit("digits", "1.0", "drift", "drift:2", params(d2))
    await await_for(lambda: _state_with(rq, running.id, lambda r: r.progress == 0.5), 60, "the first job to run")
    c = await rq.cancel(queued.id)
    assert c.state is JobState.CANCELLED and c.message == "cancelled before it ran" and c.cancel_requested
    child = int((d1 / "pid-1").read_text())
    c = await rq.cancel(running.id)  # its process ignores SIGTERM: SIGKILL after the grace
    assert c.state is JobState.CANCELLED, c
    assert c.message == "cancelled while running; its process was stopped"
    assert not alive(child)
    with pytest.raises(OspreyError) as err:
        await rq.cancel(running.id)
    assert err.value.kind is ErrorKind.CONFLICT and "already cancelled" in err.value.message
    with pytest.raises(OspreyError) as err:
        await rq.cancel("nope")
    assert err.value.kind is ErrorKind.NOT_FOUND
    # the worker is free again: a later job runs, the cancelled one never did
    d3 = tmp_path / "m3"
    later, _ = await rq.submit("digits", "1.0", "drift", "drift:3", params(d3))
    done = await await_for(lambda: _state_with(rq, later.id, lambda r: r.terminal), 60, "a later job")
    assert done.state is JobState.SUCCEEDED
    assert not (d2 / "runs.jsonl").exists() and (await rq.get(queued.id)).state is JobState.CANCELLED


# ---------------------------------------------------------------------------- embedded


async def test_embedded_states_dedup_retry_and_cancel(tmp_path):
    store = tmp_path / "store"
    q = EmbeddedJobQueue(store, settings=SETTINGS)
    await q.start()
    try:
        d1, d2, d3, gate = tmp_path / "m1", tmp_path / "m2", tmp_path / "m3", tmp_path / "gate"
        first, created = await q.submit("digits", "1.0", "drift", "drift:1", params(d1, gate=str(gate)))
        again, created_again = await q.submit("digits", "1.0", "drift", "drift:1", params(d1))
        assert created and not created_again and again.id == first.id
        queued, _ = await q.submit("digits", "1.0", "drift", "drift:2", params(d2))
        r = await await_for(lambda: _state_with(q, first.id, lambda r: r.progress == 0.5), 60, "the first run")
        assert r.state is JobState.RUNNING and r.attempts == 1
        c = await q.cancel(queued.id)  # concurrency 1: it is still queued
        assert c.state is JobState.CANCELLED and c.message == "cancelled before it ran"
        gate.touch()
        done = await await_for(lambda: _state_with(q, first.id, lambda r: r.terminal), 60, "the first job")
        assert done.state is JobState.SUCCEEDED and done.gate["accuracy"] == 0.91 and done.challenger == "2.0"
        assert {"hello from the job", "printed by the job"} <= set(done.log_tail)
        with pytest.raises(OspreyError) as err:
            await q.cancel(first.id)
        assert err.value.kind is ErrorKind.CONFLICT
        flaky, _ = await q.submit("digits", "1.0", "drift", "drift:3",
                                  params(d3, "flaky", succeed_on=2, backoff_s=0.5))
        done = await await_for(lambda: _state_with(q, flaky.id, lambda r: r.terminal), 60, "the flaky job")
        assert done.state is JobState.SUCCEEDED and done.attempts == 2
        assert runs(d3)[1]["ts"] - runs(d3)[0]["ts"] >= 0.5
        d4, gate4 = tmp_path / "m4", tmp_path / "gate4"
        long, _ = await q.submit("digits", "1.0", "drift", "drift:4", params(d4, gate=str(gate4), ignore_term=True))
        await await_for(lambda: _state_with(q, long.id, lambda r: r.progress == 0.5), 60, "the long job")
        child = int((d4 / "pid-1").read_text())
        c = await q.cancel(long.id)
        assert c.state is JobState.CANCELLED and not alive(child)
        assert not (d2 / "runs.jsonl").exists()
        assert [j.episode for j in await q.list("digits")] == ["drift:4", "drift:3", "drift:2", "drift:1"]
        with pytest.raises(OspreyError) as err:
            await q.cancel("unknown")
        assert err.value.kind is ErrorKind.NOT_FOUND
    finally:
        await q.close()


def test_embedded_dedup_across_two_processes(tmp_path):
    go = tmp_path / "go"
    cmd = [sys.executable, "-m", "tests.retraining_host", "submit", "--store", str(tmp_path / "store"),
           "--episode", "drift:9", "--params", json.dumps(params(tmp_path)), "--go", str(go)]
    procs = [subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for _ in range(2)]
    go.touch()
    answers = [json.loads(p.communicate(timeout=60)[0]) for p in procs]
    assert answers[0]["id"] == answers[1]["id"] and sorted(a["created"] for a in answers) == [False, True]
    assert len(list((tmp_path / "store" / ".osprey" / "jobs").glob("*.json"))) == 1


def _host(tmp_path: Path, name: str, *extra: str) -> tuple[subprocess.Popen, Path]:
    log = tmp_path / f"host-{name}.log"
    proc = subprocess.Popen([sys.executable, "-m", "tests.retraining_host", "serve", "--store", str(tmp_path / "store"),
                             *extra], cwd=ROOT, env=env(), stdout=open(log, "wb"), stderr=subprocess.STDOUT)
    wait_for(lambda: proc.poll() is not None or b"ready" in log.read_bytes(), 60, f"host {name}")
    assert proc.poll() is None, log.read_text()
    return proc, log


def test_embedded_restart_after_crash_runs_the_job_again(tmp_path):
    d, gate = tmp_path / "m", tmp_path / "gate"
    first, log = _host(tmp_path, "first", "--params", json.dumps(params(d, gate=str(gate))))
    job_id = json.loads(log.read_text().splitlines()[0])["id"]
    wait_for(lambda: (d / "pid-1").exists(), 60, "the first run")
    child = int((d / "pid-1").read_text())
    first.kill()  # SIGKILL: the server dies mid-job
    first.wait(10)
    wait_for(lambda: not alive(child), 10, "the job's process to die with its server")
    second, _ = _host(tmp_path, "second")
    try:
        wait_for(lambda: (d / "pid-2").exists(), 60, "the rerun after the restart")
        assert [r["found_partial"] for r in runs(d)] == [False, False]
        gate.touch()
        path = tmp_path / "store" / ".osprey" / "jobs" / f"{job_id}.json"
        done = wait_for(lambda: (r := json.loads(path.read_text()))["state"] in ("succeeded", "failed") and r,
                        60, "the job to finish")
        assert done["state"] == "succeeded" and done["attempts"] == 2
        assert "the process that ran it before died" in " ".join(s["detail"] for s in done["steps"])
        assert len(runs(d)) == 2
    finally:
        second.terminate()
        second.wait(20)


def test_rest_routes_and_osprey_jobs_cli(tmp_path):
    port = free_port()
    d, gate = tmp_path / "m", tmp_path / "gate"
    host, log = _host(tmp_path, "api", "--port", str(port), "--params", json.dumps(params(d, gate=str(gate))))
    job_id = json.loads(log.read_text().splitlines()[0])["id"]
    url = f"http://127.0.0.1:{port}"

    def osprey(*args):
        return subprocess.run([sys.executable, "-m", "server.cli", "jobs", *args, "--management", url], cwd=tmp_path,
                              env=env(), capture_output=True, text=True, timeout=60)

    try:
        wait_for(lambda: (d / "pid-1").exists(), 60, "the job to run")
        out = osprey("list")
        assert out.returncode == 0 and job_id in out.stdout and "running" in out.stdout, out
        out = osprey("list", "--model", "other", "--json")
        assert json.loads(out.stdout) == {"jobs": []}
        out = osprey("show", job_id)
        assert out.returncode == 0 and "trigger:     manual, episode drift:1" in out.stdout, out.stdout
        out = osprey("show", "nope")
        assert out.returncode == 1 and "HTTP 404: no retraining job 'nope'" in out.stderr, out.stderr
        out = osprey("cancel", job_id, "--json")
        assert out.returncode == 0 and json.loads(out.stdout)["state"] == "cancelled", out
        out = osprey("cancel", job_id)
        assert out.returncode == 1 and "HTTP 409" in out.stderr and "already cancelled" in out.stderr, out.stderr
        import urllib.error
        import urllib.request

        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(f"{url}/retraining/jobs?limit=0")
        assert err.value.code == 400 and b"limit must be" in err.value.read()
    finally:
        host.terminate()
        host.wait(20)


async def test_redis_worker_sigterm_requeues_its_job_for_another_worker(tmp_path, rq, workers):
    first = workers("first")
    d, gate = tmp_path / "m", tmp_path / "gate"
    record, _ = await rq.submit("digits", "1.0", "drift", "drift:1", params(d, gate=str(gate)))
    await await_for(lambda: _state_with(rq, record.id, lambda r: r.progress == 0.5), 60, "the first run")
    child = int((d / "pid-1").read_text())
    first.stop()  # SIGTERM: its job is stopped and queued again
    assert first.proc.returncode == 0 and not alive(child)
    requeued = await rq.get(record.id)
    assert requeued.state is JobState.QUEUED and requeued.message == "its worker stopped; queued to run again"
    second = workers("second")
    rerun = await await_for(lambda: _state_with(rq, record.id, lambda r: r.attempts == 2 and r.progress == 0.5),
                            60, "the rerun")
    assert rerun.worker.endswith(f":{second.pid}")
    gate.touch()
    done = await await_for(lambda: _state_with(rq, record.id, lambda r: r.terminal), 60, "the job to finish")
    assert done.state is JobState.SUCCEEDED and len(runs(d)) == 2


async def test_redis_job_past_its_timeout_is_stopped_and_failed(tmp_path, rq, workers):
    workers("a")
    d, gate = tmp_path / "m", tmp_path / "never"
    record, _ = await rq.submit("digits", "1.0", "drift", "drift:1",
                                params(d, gate=str(gate), timeout_s=1.5, ignore_term=True))
    done = await await_for(lambda: _state_with(rq, record.id, lambda r: r.terminal), 60, "the timeout")
    assert done.state is JobState.FAILED and done.attempts == 1
    assert done.message == "timed out after 1.5 s (params timeout_s); its process was stopped"
    assert not alive(int((d / "pid-1").read_text()))


async def test_redis_down_is_a_clear_unavailable_error(tmp_path, rq, redis_server):
    record, _ = await rq.submit("digits", "1.0", "drift", "drift:1", params(tmp_path))
    redis_server.stop()
    with pytest.raises(QueueUnavailable, match="Redis is unreachable"):  # a plain error: triggers keep it
        await rq.submit("digits", "1.0", "drift", "drift:2", params(tmp_path))
    for call in (rq.get(record.id), rq.list(), rq.cancel(record.id)):
        with pytest.raises(OspreyError) as err:
            await call
        assert err.value.kind is ErrorKind.UNAVAILABLE and "Redis is unreachable" in err.value.message
    redis_server.start()  # an empty Redis (the test's keeps nothing on disk): submits work again
    again, created = await rq.submit("digits", "1.0", "drift", "drift:1", params(tmp_path))
    assert created and (await rq.get(again.id)).state is JobState.QUEUED


def test_worker_command_refuses_bad_arguments(tmp_path):
    def worker(*args):
        return subprocess.run([sys.executable, "-m", "server.cli", "worker", *args], cwd=tmp_path, env=env(),
                              capture_output=True, text=True, timeout=60)

    out = worker("--redis", "localhost:6379", "--model-store", str(tmp_path))
    assert out.returncode == 2 and "must be a URL like redis://HOST:6379/0" in out.stderr
    out = worker("--redis", "redis://127.0.0.1:1/0", "--concurrency", "0", "--model-store", str(tmp_path))
    assert out.returncode == 2 and "--concurrency must be at least 1" in out.stderr
    out = worker("--redis", "redis://127.0.0.1:1/0", "--model-store", str(tmp_path / "nope"))
    assert out.returncode == 2 and "is not a folder" in out.stderr


async def test_redis_a_run_given_up_for_lost_that_comes_back_is_stopped_not_doubled(tmp_path, rq, workers):
    """A worker frozen (SIGSTOP) past its heartbeat: its job reruns elsewhere; thawed, the stale
    run finds its writes refused, stops its process and leaves the record to the new run."""
    frozen = workers("frozen")
    d, gate = tmp_path / "m", tmp_path / "gate"
    record, _ = await rq.submit("digits", "1.0", "drift", "drift:1", params(d, gate=str(gate)))
    await await_for(lambda: _state_with(rq, record.id, lambda r: r.progress == 0.5), 60, "the first run")
    stale_child = int((d / "pid-1").read_text())
    live = workers("live")
    os.kill(frozen.pid, signal.SIGSTOP)
    try:
        rerun = await await_for(lambda: _state_with(rq, record.id, lambda r: r.attempts == 2 and r.progress == 0.5),
                                60, "the rerun while the first worker is frozen")
        assert rerun.worker.endswith(f":{live.pid}") and alive(stale_child)
    finally:
        os.kill(frozen.pid, signal.SIGCONT)
    wait_for(lambda: not alive(stale_child), 30, "the stale run to stop its process")
    assert (await rq.get(record.id)).state is JobState.RUNNING  # the live run's, untouched
    gate.touch()
    done = await await_for(lambda: _state_with(rq, record.id, lambda r: r.terminal), 60, "the job to finish")
    assert done.state is JobState.SUCCEEDED and done.attempts == 2 and done.worker.endswith(f":{live.pid}")
    assert len(runs(d)) == 2
    assert b"was taken over by another run" in frozen.log_path.read_bytes()

    async def saq_complete():  # saq marks its own job complete just after the record is final
        return (await rq.saq.job(record.id)).status.value == "complete"
    await await_for(saq_complete, 30, "saq to mark the live run's job complete (not the stale run's)")


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def test_redis_down_the_worker_waits_quietly_and_takes_jobs_when_it_is_back(tmp_path, rq, workers,
                                                                                 redis_server):
    w = workers("a")
    redis_server.stop()
    before = _cpu_seconds(w.pid)
    wait_for(lambda: b"Redis is unreachable" in w.log_path.read_bytes(), 30, "the worker to notice")
    time.sleep(2)  # a measuring window, not synchronisation: saq's loop would spin here without the pause
    assert _cpu_seconds(w.pid) - before < 1.0
    redis_server.start()
    d = tmp_path / "m"
    record, _ = await rq.submit("digits", "1.0", "drift", "drift:1", params(d))
    done = await await_for(lambda: _state_with(rq, record.id, lambda r: r.terminal), 60, "the job after Redis is back")
    assert done.state is JobState.SUCCEEDED
