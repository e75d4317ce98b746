"""Retraining jobs run on a real local Ray cluster (``retraining_executor=ray``).

One Ray head for the module (``ray start --head`` from the Ray virtualenv, every port on
loopback), a real redis-server and real ``osprey worker`` processes per test. The jobs are the
queue tests' bodies (tests/retraining_tasks.py): they leave marker files (one line per run in
``runs.jsonl``) and wait on gate files the test creates, so "it ran once" is counted, not
assumed. Tests wait on observable state with deadlines; nothing sleeps to synchronise.

Skipped, saying why, when the Ray virtualenv is absent (``make test`` creates .venv-ray; or set
OSPREY_RAY_PYTHON to a Python that has ``ray[default]``).
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path

import pytest

from server.retraining.jobs import JobState
from server.retraining.ray_runner import RayJobs
from server.retraining.redis_queue import RedisJobQueue
from server.settings import Settings

from ..conftest import ROOT
from ..gates import alive, wait_for
from ..ray_head import LOOPBACK_ENV, RayHead, non_loopback, ray_python
from ..redis_server import redis_server  # noqa: F401 - fixture
from ..worker_process import WorkerProcess

TASKS = "tests.retraining_tasks"
FAST = {"OSPREY_RETRAINING_HEARTBEAT": "2", "OSPREY_RETRAINING_SWEEP_INTERVAL": "1",
        "OSPREY_RETRAINING_CANCEL_GRACE": "1"}

pytestmark = pytest.mark.skipif(ray_python() is None, reason="the Ray virtualenv is absent (make test creates "
                                                             ".venv-ray; or set OSPREY_RAY_PYTHON)")


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    with RayHead(tmp_path_factory.mktemp("ray"), ray_python()) as head:
        yield head


def ray_settings(head: RayHead) -> dict:
    """The worker's settings (as OSPREY_* variables): jobs go to the Ray head; the job's process
    there runs this checkout's Osprey with this venv's Python, on loopback only."""
    runtime_env = {"env_vars": {"PYTHONPATH": str(ROOT), **LOOPBACK_ENV}}
    return {"OSPREY_RETRAINING_EXECUTOR": "ray", "OSPREY_RAY_ADDRESS": head.address,
            "OSPREY_RAY_PYTHON": sys.executable, "OSPREY_RAY_RUNTIME_ENV": json.dumps(runtime_env),
            "OSPREY_RAY_POLL_INTERVAL": "0.25"}


async def await_record(q: RedisJobQueue, job_id: str, check, timeout: float = 90.0, what: str = "the job"):
    deadline = time.monotonic() + timeout
    record = None
    while time.monotonic() < deadline:
        record = await q.get(job_id)
        if record is not None and check(record):
            return record
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}; the record: "
                         f"{json.dumps(record.as_dict() if record else None, indent=1)[-3000:]}")


def runs(d: Path) -> list[dict]:
    path = d / "runs.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.fixture
async def cluster(tmp_path, redis_server, ray_head):
    """(queue, start_worker, ray client): the server side of a Redis queue whose workers send jobs to Ray."""
    store = tmp_path / "store"
    store.mkdir()
    q = RedisJobQueue(redis_server.url, store, settings=Settings(retraining_heartbeat=2, retraining_sweep_interval=1,
                                                             retraining_cancel_grace=1))
    ray = RayJobs(ray_head.address)
    started: list[WorkerProcess] = []

    def start(name: str = "w") -> WorkerProcess:
        w = WorkerProcess(tmp_path, redis_server.url, store, name, env={**FAST, **ray_settings(ray_head)}).wait_ready()
        started.append(w)
        return w

    yield q, start, ray
    for w in started:
        w.stop()
    await ray.close()
    await q.close()


def params(d: Path, task: str = "record", **extra) -> dict:
    return {"task": f"{TASKS}:{task}", "dir": str(d), **extra}


async def test_a_job_runs_on_ray_once_under_its_job_id(tmp_path, cluster, ray_head):
    q, start, ray = cluster
    start("a")
    d, gate = tmp_path / "m", tmp_path / "gate"
    record, created = await q.submit("digits", "1.0", "drift", "drift:1", params(d, gate=str(gate)))
    assert created
    # running on Ray: progress, phase, steps and the job's own log lines reach the record
    running = await await_record(q, record.id, lambda r: r.progress == 0.5 and "hello from the job" in r.log_tail
                                 and "printed by the job" in r.log_tail, what="progress 0.5 and the log")
    assert running.state is JobState.RUNNING and running.phase == "training" and running.message == "half way"
    assert any(s["step"] == "ray" and f"as job {record.id}" in s["detail"] for s in running.steps), running.steps
    assert any(s["step"] == "training" and s["detail"] == "on 3 rows" for s in running.steps)
    info = await ray.info(record.id)  # Ray knows it under the Osprey job id
    assert info["status"] == "RUNNING" and info["metadata"]["osprey_job"] == record.id
    assert not any(line.startswith("@osprey-event") for line in running.log_tail)

    gate.touch()
    done = await await_record(q, record.id, lambda r: r.terminal, what="the job to end")
    assert done.state is JobState.SUCCEEDED, done.as_dict()
    assert done.challenger == "2.0" and done.gate == {"accuracy": 0.91, "champion_accuracy": 0.8}
    assert done.result == {"extra": 7} and done.progress == 1.0 and done.attempts == 1
    assert (await ray.info(record.id))["status"] == "SUCCEEDED"
    [run] = runs(d)
    assert not alive(run["pid"])
    # a second submission under the same id is refused by Ray: nothing runs again
    assert await ray.submit(record.id, f"{sys.executable} -c 'print(1)'") is False
    assert len(runs(d)) == 1
    assert [j["submission_id"] for j in await ray.list()].count(record.id) == 1


async def test_a_worker_killed_mid_job_is_followed_not_rerun(tmp_path, cluster):
    """The worker following a Ray job dies: another worker takes the Osprey job over and follows
    the same Ray job (Ray refuses a second submission under its id): one run, not two."""
    q, start, ray = cluster
    first = start("first")
    d, gate = tmp_path / "m", tmp_path / "gate"
    record, _ = await q.submit("digits", "1.0", "drift", "drift:2", params(d, gate=str(gate)))
    await await_record(q, record.id, lambda r: r.progress == 0.5, what="the job to run on Ray")
    first.kill()
    second = start("second")
    await await_record(q, record.id, lambda r: sum(s["step"] == "ray" for s in r.steps) == 2,
                       what="the second worker to follow the Ray job")
    gate.touch()
    done = await await_record(q, record.id, lambda r: r.terminal, what="the job to end")
    assert done.state is JobState.SUCCEEDED, done.as_dict()
    assert len(runs(d)) == 1, runs(d)  # the job's body ran once
    follow = [s for s in done.steps if s["step"] == "ray"]
    assert "following Ray job" in follow[1]["detail"] and "worker lost" in [s["step"] for s in done.steps]
    assert [s["step"] for s in done.steps].count("training") == 1  # events read again are not recorded twice
    assert done.log_tail.count("hello from the job") == 1
    assert second.proc.poll() is None


async def test_cancel_stops_the_ray_job(tmp_path, cluster):
    q, start, ray = cluster
    start("a")
    d = tmp_path / "m"
    record, _ = await q.submit("digits", "1.0", "drift", "drift:3", params(d, gate=str(tmp_path / "never")))
    await await_record(q, record.id, lambda r: r.progress == 0.5, what="the job to run on Ray")
    pid = int((d / "pid-1").read_text())
    assert alive(pid)
    cancelled = await q.cancel(record.id)
    assert cancelled.state is JobState.CANCELLED, cancelled.as_dict()
    assert (await ray.info(record.id))["status"] == "STOPPED"
    wait_for(lambda: not alive(pid), 15, "the job's process to end")
    assert len(runs(d)) == 1


def test_every_socket_of_ray_is_on_loopback(ray_head):
    """Run after the jobs above (the head's job supervisors and workers exist by then): every
    listening and connected socket of the head's processes, and of the jobs' processes under
    them, has both ends on 127.0.0.1."""
    procs = ray_head.processes()
    assert len(procs) >= 5, [p.name() for p in procs]  # gcs, raylet, dashboard, agents...
    assert non_loopback(procs) == []
