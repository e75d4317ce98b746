"""``osprey worker``: take retraining jobs from the Redis queue and run them.

A worker needs Redis and the model store (the same folder the servers use, shared storage when
they are on other machines). It runs up to ``concurrency`` jobs at once, each in a child
process, beats each job's heartbeat, and sweeps for jobs whose worker was lost (any live worker
does; a Redis lock keeps it to one sweep per interval).

SIGTERM/SIGINT: no new job is taken; running jobs are stopped (their process gets SIGTERM,
then SIGKILL after ``retraining_cancel_grace`` s) and queued again, so another worker (or this
one, restarted) runs them.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
from pathlib import Path

from server.retraining.redis_queue import SAQ_FUNCTION, RedisJobQueue

__all__ = ["run_worker", "build_worker"]

log = logging.getLogger("osprey.retraining")


def build_worker(jobs: RedisJobQueue, concurrency: int, settings):
    from saq import Worker

    sweep = max(1, round(settings.retraining_sweep_interval))
    worker = Worker(jobs.saq, functions=[(SAQ_FUNCTION, jobs.execute)], concurrency=concurrency,
                    timers={"sweep": sweep, "abort": 1, "schedule": 1, "worker_info": 10},
                    metadata={"host": socket.gethostname(), "pid": os.getpid(), "model_store": str(jobs.model_store)})
    worker.SIGNALS = []  # this module handles them: running jobs are requeued before the worker stops
    return worker


async def run_worker(settings, redis_url: str, model_store: Path | str, concurrency: int | None = None) -> int:
    from server.state import resolve_state_dir

    concurrency = concurrency or settings.retraining_concurrency
    settings = resolve_state_dir(settings)  # the jobs' work folders: <model_store>/.osprey unless state_dir says
    jobs = RedisJobQueue(redis_url, model_store, settings=settings)
    worker = build_worker(jobs, concurrency, settings)
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    await jobs.saq.connect()
    runner = asyncio.ensure_future(worker.start())
    print(f"Osprey worker ready: {concurrency} at a time, queue {redis_url}, model store {model_store}", flush=True)
    log.info("worker %s ready (concurrency %d)", worker.id, concurrency)
    await asyncio.wait([runner, asyncio.ensure_future(stopping.wait())], return_when=asyncio.FIRST_COMPLETED)
    log.info("worker stopping: running jobs are requeued")
    await jobs.stop_running(timeout=settings.retraining_cancel_grace + 15)
    await worker.stop()
    await asyncio.gather(runner, return_exceptions=True)
    await jobs.close()
    return 0
