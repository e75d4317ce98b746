"""A job's child process: ``python -m server.retraining.child`` (started by runner.py).

Reads the job (record, work_dir, model_store, parent pid) as JSON on stdin, runs the task the
record's params name, and reports on its stdout, one JSON object a line: ``{"progress", "message"}``,
``{"step", "detail", "ts"}``, ``{"log"}``, ``{"phase"}``, then ``{"result": {...}}`` or
``{"error", "message", "retryable"}``. What the task itself prints goes to stderr (stdout is
moved there before the task is imported), which the parent keeps as log lines.

The child dies with its parent (PR_SET_PDEATHSIG on Linux, and a watch on the parent pid), so
a worker killed with SIGKILL leaves no job running behind it. SIGTERM only sets
``JobContext.cancelled()``; the parent sends SIGKILL after a grace period.

``python -m server.retraining.child --spec FILE`` is the same job run on a cluster (Ray Jobs,
ray_runner.py): the job comes from a file on the shared model store instead of stdin, there is
no parent to die with (the cluster's job supervisor stops it), the work folder is emptied here,
and the job's stdout and stderr are one log that the cluster keeps, so each event line is
marked with ``EVENT_MARK`` to tell it from what the task prints.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time
import traceback
from pathlib import Path

from server.retraining.jobs import JobRecord
from server.retraining.queue import JobContext, RetryableError, resolve_task

EVENT_MARK = "@osprey-event "  # starts each event line in a job's log (--spec mode)


def _die_with_parent(parent: int) -> None:
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent:  # the parent died before prctl
        os._exit(70)

    def watch() -> None:
        while True:
            time.sleep(1.0)
            if os.getppid() != parent:
                os._exit(70)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def read_spec(argv: list[str]) -> tuple[dict, str]:
    """(the job's spec, the mark before each event line): from stdin, or ``--spec FILE``."""
    if not argv:
        return json.loads(sys.stdin.read()), ""
    if len(argv) != 2 or argv[0] != "--spec":
        raise SystemExit("usage: python -m server.retraining.child [--spec FILE]")
    try:
        spec = json.loads(open(argv[1]).read())
    except (OSError, ValueError) as exc:
        raise SystemExit(f"server.retraining.child: cannot read the job spec {argv[1]}: {exc}") from None
    from server.retraining.runner import prepare_work_dir

    os.chdir(prepare_work_dir(Path(spec["work_dir"])))
    return spec, EVENT_MARK


def main(argv: list[str] | None = None) -> int:
    from server.core.cpus import restore_inherited

    restore_inherited()  # started from a thread pinned to the event loop's CPU: every CPU again
    spec, mark = read_spec(sys.argv[1:] if argv is None else argv)
    if spec.get("parent"):
        _die_with_parent(int(spec["parent"]))
    if spec.get("nice"):
        try:
            os.nice(int(spec["nice"]))  # training yields the CPU to serving on the same machine
        except OSError:
            pass
    events = os.fdopen(os.dup(1), "w", buffering=1)  # the event channel: the original stdout
    os.dup2(2, 1)  # print() and C code writing to fd 1 land in stderr, the log
    sys.stdout = sys.stderr
    lock = threading.Lock()

    def emit(event: dict) -> None:
        line = json.dumps(event, default=str)
        with lock:
            events.write(mark + line + "\n")

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    record = JobRecord.from_dict(spec["record"])
    ctx = JobContext(record, spec["work_dir"], spec["model_store"], emit, stop.is_set)
    try:
        fn = resolve_task(record.params.get("task", ""))
        result = fn(ctx)
        if result is None:
            result = {}
        if not isinstance(result, dict):
            raise TypeError(f"task {record.params.get('task')!r} returned {type(result).__name__}, not a dict")
        emit({"result": result})
    except BaseException as exc:  # noqa: BLE001 - every failure is reported to the parent
        tb = traceback.format_exc()
        sys.stderr.write(tb)
        emit({"error": "".join(tb.splitlines(keepends=True)[-20:]), "message": f"{type(exc).__name__}: {exc}",
              "retryable": isinstance(exc, RetryableError)})
    sys.stderr.flush()
    events.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
