"""The child side of a process instance (:mod:`server.instances.process`).

Started by multiprocessing (forkserver, else spawn) with one end of a pipe. It loads the
handler with the same :func:`~server.instances.runner.load_runner` a thread instance uses,
says ``ready`` (or ``failed``), then runs each job the parent sends with the same
:class:`~server.instances.runner.BatchRunner`, and answers ``done``. Handler metrics and
intermediate (streamed) responses go to the parent as messages while the handler runs.
The child ends on a ``None`` message or when the parent's end of the pipe closes.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import signal
import random
import sys
import threading

from server.core.capture import held_wire, retraining_holds
from server.core.cpus import restore_inherited
from server.core.types import InferenceResponse, Protocol
from server.instances.monitor_link import open_link
from server.instances.runner import declared_specs, load_runner, model_precision
from server.instances.wire import Arena, outcome_to_wire, work_from_wire

__all__ = ["main"]

log = logging.getLogger("osprey.instances")



def _stream(send, batch: int, row: int, data, headers: dict | None = None) -> None:
    """An intermediate response of request ``row`` of ``batch`` (and the response headers set so
    far), sent to the parent."""
    send(("stream", batch, row, data, headers))

def _specs(target) -> tuple:
    def plain(specs):
        if specs is None:
            return None
        return [s.as_dict() if hasattr(s, "as_dict") else dict(s) for s in specs]
    inputs, outputs = declared_specs(target)
    return plain(inputs), plain(outputs)


def _steady_malloc() -> None:
    """glibc: serve blocks up to 32 MiB from the heap and keep up to 64 MiB freed there.

    Each request's payload is copied out of shared memory into a fresh bytes object (and
    decoded into another); with glibc's defaults every such MiB came from a new mmap, and
    touching its pages cost ~1.5 ms per MiB in page faults on the benchmark VM (measured:
    480 faults and 1.6 ms per 1 MiB copy + bytearray, 70 us with these settings)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 64 << 20)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):  # not glibc: leave the allocator alone
        pass


class _ToParent:
    """sys.stdout / sys.stderr of a child whose output the server writes to its log files: whole
    lines go to the parent (``output`` messages), which writes them as this instance's
    (TorchServe's ``W-...-stdout MODEL_LOG`` lines in model_log.log), as a thread instance's."""

    def __init__(self, send, suffix: str):
        self._send, self.suffix, self._partial = send, suffix, ""
        self.encoding, self.errors = "utf-8", "replace"

    def write(self, text: str) -> int:
        buf = self._partial + text
        cut = buf.rfind("\n") + 1
        self._partial = buf[cut:]
        if cut:
            self._send(("output", self.suffix, buf[:cut]))
        return len(text)

    def flush(self) -> None:
        if self._partial:
            text, self._partial = self._partial + "\n", ""
            self._send(("output", self.suffix, text))

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:
        raise OSError("a process instance's output goes to the server's log files, not to a file descriptor")


class _LogToParent(logging.Handler):
    """The child's log records go to the parent (``log`` messages), which hands them to its own
    logging under the same logger name: a handler's loggers reach model_log.log, Osprey's ts_log.log."""

    def __init__(self, send):
        super().__init__()
        self._send = send

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
            if record.exc_info:
                message += "\n" + logging.Formatter().formatException(record.exc_info)
            self._send(("log", record.levelno, record.name, message, record.created))
        except Exception:
            self.handleError(record)


def main(conn, spec: dict) -> None:
    restore_inherited()  # forked from a thread pinned to the event loop's CPU: every CPU again
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle (it drains first)
    # so is SIGTERM, which a stop of the whole process group sends here too (forkserver_init.py):
    # the parent stops this child once its requests are answered, or the pipe closes when it dies
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _steady_malloc()
    lock = threading.Lock()

    def send(msg) -> None:
        with lock:
            conn.send(msg)

    if spec.get("forward_output"):
        root = logging.getLogger()
        root.setLevel(spec.get("log_level", logging.INFO))
        root.addHandler(_LogToParent(send))
        sys.stdout, sys.stderr = _ToParent(send, "stdout"), _ToParent(send, "stderr")
    else:
        logging.basicConfig(level=spec.get("log_level", logging.INFO), stream=sys.stderr,
                            format=f"%(asctime)s %(levelname)s %(name)s [pid {os.getpid()}]: %(message)s")

    def metric(name, value, unit, kind, dims, request_ids=None) -> None:
        send(("metric", name, value, unit, kind, dims, request_ids))

    if spec.get("torch_threads"):
        import torch

        torch.set_num_threads(spec["torch_threads"])
    observations: list = []  # the monitor's observations of a handoff, sent after its answers
    try:
        runner = load_runner(spec["name"], spec["version"], spec["model_dir"], spec["handler"], spec["manifest"],
                             spec["config"], spec["gpu_id"], metric,
                             observations.append if spec.get("monitor") else None, spec.get("envelope", ""),
                             spec.get("packages"), True)  # this process is the model's own: its packages first
        target = runner.service.target
        send(("ready", runner.accepts_tensors, _specs(target), model_precision(target), os.getpid()))
    except BaseException as exc:
        log.exception("model %s instance %d failed to load", spec["name"], spec["index"])
        send(("failed", f"{type(exc).__name__}: {exc}"))
        return
    arenas: dict[str, Arena] = {}

    def arena(name):
        if name is None:
            return None
        a = arenas.get(name)
        if a is None:
            a = arenas[name] = Arena.attach(name)
        return a

    # a monitor in its own process: observations and held inputs go there, not to the parent
    link = open_link(spec)
    retraining = spec["config"].retraining if link is not None else None
    if retraining is not None and not retraining.enabled:
        retraining = None  # nothing is held: no pass over the answers
    rng = random.Random()

    def hand_over(force: bool) -> None:
        runner.flush(force)
        if observations:
            if link is not None:
                link.observations(observations)
            else:
                send(("observations", observations))  # pickled: only sampled rows, float32 embeddings
            observations.clear()

    def hold(works: list, outcomes: list) -> None:
        """A model with retraining: the answered requests' inputs, for their labels (taken out
        of the arena now: it is reused by the next job)."""
        items = []
        for batch, answers in zip(works, outcomes):
            for ticket, outcome in zip(batch, answers):
                if (type(outcome) is InferenceResponse and outcome.status == 200 and
                        ticket.request.protocol is not Protocol.DESCRIBE and retraining_holds(retraining, rng)):
                    try:
                        items.append(held_wire(ticket.request))
                    except Exception as exc:
                        log.warning("event=dataset_hold_failed model=%s reason=%s", spec["name"], exc)
        if items:
            link.hold(items)

    while True:
        try:
            wait = runner.flush_wait()  # monitoring: batches pending, flush them if no work comes
            if wait is not None and not conn.poll(wait):
                hand_over(True)  # idle (or due by age)
                continue
            msg = conn.recv()
        except (EOFError, OSError):  # the parent is gone
            break
        if msg is None:
            try:
                hand_over(True)
            except (OSError, ValueError):
                pass
            if link is not None:
                link.close()
            break
        if msg[0] == "flush":  # a feedback barrier: what the answers so far left, to the monitor
            hand_over(True)
            if link is not None:
                link.mark(msg[1])  # (behind the observations on the link: the monitor waits for it)
            send(("flushed", msg[1]))
            continue
        _, in_name, out_name, dropped, batches = msg
        for name in dropped:  # arenas the parent replaced by larger ones
            old = arenas.pop(name, None)
            if old is not None:
                old.close()
        src, dst = arena(in_name), arena(out_name)
        works = []
        for bi, batch in enumerate(batches):
            items = []
            for ri, wire in enumerate(batch):
                stream = functools.partial(_stream, send, bi, ri) if wire[5] else None
                items.append(work_from_wire(wire, src, stream))
            works.append(items)
        outcomes = runner.run_handoff(works)
        if retraining is not None:
            hold(works, outcomes)
        if dst is not None:
            dst.pos = 0
        wired = [[outcome_to_wire(o, dst) for o in batch] for batch in outcomes]
        timings = [(b[0].timings.started, b[0].timings.finished, b[0].timings.stages) if b else None for b in works]
        send(("done", wired, timings))
        del works, outcomes, wired
        hand_over(False)  # after the answers, when enough is pending: features never delay them
    for a in arenas.values():
        a.close()
