"""Job bodies for the retraining queue tests: they leave marker files and wait on gate files.

Every task takes ``params["dir"]``, a folder of the test's: each run appends one JSON line to
``{dir}/runs.jsonl`` (attempt, pid, time, whether it found what an earlier run left in its work
folder) and writes ``{dir}/pid-{attempt}`` with its pid. ``params["gate"]`` names a file the
task waits for before it returns.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

from server.retraining.queue import JobContext, RetryableError


def _start(ctx: JobContext) -> tuple[Path, int]:
    d = Path(ctx.params["dir"])
    d.mkdir(parents=True, exist_ok=True)
    attempt = ctx.record.attempts
    partial = ctx.work_dir / "partial.txt"
    found = partial.exists()
    partial.write_text(f"half-done by attempt {attempt}")
    with open(d / "runs.jsonl", "a") as fh:
        fh.write(json.dumps({"attempt": attempt, "pid": os.getpid(), "ts": time.time(), "found_partial": found,
                             "cwd": os.getcwd()}) + "\n")
    (d / f"pid-{attempt}").write_text(str(os.getpid()))
    return d, attempt


def _wait_gate(ctx: JobContext) -> None:
    gate = ctx.params.get("gate")
    if not gate:
        return
    while not Path(gate).exists():  # the test opens the gate; a cancel kills this process
        if ctx.cancelled() and not ctx.params.get("ignore_cancel"):
            return
        time.sleep(0.02)


def record(ctx: JobContext) -> dict:
    """Progress, a step, log lines (through ctx and print), waits on the gate, returns a result."""
    if ctx.params.get("ignore_term"):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _start(ctx)
    ctx.phase("training")
    ctx.step("training", "on 3 rows")
    ctx.log("hello from the job")
    print("printed by the job", flush=True)
    ctx.progress(0.5, "half way")
    _wait_gate(ctx)
    ctx.progress(0.9, "gating")
    return {"state": ctx.params.get("final", "succeeded"), "gate": {"accuracy": 0.91, "champion_accuracy": 0.8},
            "challenger": "2.0", "message": "challenger 2.0 passed", "extra": 7}


def flaky(ctx: JobContext) -> dict:
    """RetryableError until attempt ``succeed_on``."""
    _, attempt = _start(ctx)
    if attempt < int(ctx.params["succeed_on"]):
        raise RetryableError(f"resource busy on attempt {attempt}")
    return {"state": "succeeded", "message": f"worked on attempt {attempt}"}


def failing(ctx: JobContext) -> dict:
    _start(ctx)
    raise ValueError("the training data has no labels")


def crashing(ctx: JobContext) -> dict:
    """The job's process dies (as an OOM kill would do it)."""
    _start(ctx)
    os.kill(os.getpid(), signal.SIGKILL)
    return {}
