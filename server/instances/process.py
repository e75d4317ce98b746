"""Process-isolated model instances: each one a child process (``isolation: process``).

A :class:`ProcessInstance` starts a child (multiprocessing "forkserver", whose server has
torch and the instance code imported once, so a child starts in well under a second; else
"spawn"; never "fork": this process has threads). The child opens the extracted archive,
loads the handler with the code a thread instance uses and runs the batches it is sent
(:mod:`server.instances.child`). Control messages go through a pipe; payloads over
:data:`~server.instances.wire.SHM_MIN` through two shared-memory arenas (:mod:`~server.instances.wire`).

One parent-side thread per instance starts the child and then reads its messages: ``done``
becomes the batcher's ``on_done`` on the loop, ``stream`` goes to the request's stream,
``metric`` to the metrics sink. When the child dies (exit, signal, killed) the thread tells
the core through ``on_lost(instance, reason)`` on the loop; the registry fails what it was
running and restarts it (:mod:`server.core.registry`).

Every access to a request's attributes is in :func:`_to_child` and :func:`_from_child`.
"""

from __future__ import annotations

import asyncio
import atexit
import itertools
import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
from typing import Any, Callable

from server.core import cpus
from server.core.archive import ModelArchive
from server.core.events import event
from server.core.model_config import ModelConfig
from server.core.osthread import instance_thread_name, name_os_thread
from server.core.instance import InstanceStatus, settle_soon
from server.instances.loaded import LoadSignal, raise_unless_ready
from server.core.types import Ticket
from server.instances.wire import Arena, outcome_from_wire, pack_bytes, pack_tensors, payload_size

__all__ = ["ProcessInstance", "describe_exit"]

log = logging.getLogger("osprey.instances")

IN_ARENA = 8 * 1024 * 1024  # initial request-payload arena; grows to fit a handoff
OUT_ARENA = 8 * 1024 * 1024  # response-payload arena; larger answers are pickled instead
STOP_WAIT_S = 5.0  # a stopped child that has not exited by then is killed

_ids = itertools.count(20000)
_marks = itertools.count(1)  # feedback barriers' tokens
_context = None
_live: set = set()  # arenas to unlink if the server exits without stopping its instances


# The fork server listens on a Unix socket in multiprocessing's temporary folder (TMPDIR/pymp-*/
# listener-*), and a Unix socket's path may have at most 107 bytes: under a long TMPDIR (a CI
# job's or a test's private one) it could not start ("AF_UNIX path too long").
_SOCKET_PATH_MAX = 107
_SOCKET_NAME_LEN = len("/pymp-xxxxxxxx/listener-xxxxxxxx")


def _mp():
    global _context
    if _context is None:
        try:
            ctx = multiprocessing.get_context("forkserver")
            ctx.set_forkserver_preload(["server.instances.forkserver_init", "torch", "server.instances.child"])
            _short_socket_folder()
        except ValueError:
            ctx = multiprocessing.get_context("spawn")
        _context = ctx
    return _context


def _short_socket_folder() -> None:
    """Where TMPDIR is too long for the fork server's socket, make multiprocessing's temporary
    folder (created once, then reused by this process) under /tmp instead; everything else the
    server writes stays under TMPDIR."""
    import tempfile
    from multiprocessing import util

    if len(tempfile.gettempdir()) + _SOCKET_NAME_LEN <= _SOCKET_PATH_MAX:
        return
    short = "/tmp" if os.access("/tmp", os.W_OK) else None
    if short is None:
        return  # nothing shorter to use: the fork server's start names the problem
    saved, tempfile.tempdir = tempfile.tempdir, short
    try:
        folder = util.get_temp_dir()  # created now, cached for the fork server
    finally:
        tempfile.tempdir = saved
    log.info("TMPDIR is too long for a Unix socket path: the process instances' fork server listens in %s", folder)


@atexit.register
def _unlink_all() -> None:
    for a in list(_live):
        a.close(unlink=True)
    _live.clear()


def describe_exit(code: int | None) -> str:
    if code is None:
        return "exit status unknown"
    if code < 0:
        try:
            return f"killed by signal {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"


# --- the two places that touch requests (see the module docstring) ---------------------
def _to_child(r: Ticket) -> tuple[tuple, Callable | None]:
    """(what crosses to the child for ``r``, payloads not yet packed; the callable its streamed items go to)."""
    w = r.request
    fields = {k: (f.value, f.content_type) for k, f in w.fields.items()}
    return (w.request_id, w.headers, fields, w.tensors, w.tensor_meta, r.stream is not None, w.protocol), r.stream


def _from_child(r: Ticket, timing: tuple | None) -> None:
    """Set the timings the child measured (monotonic clock: the same across processes)."""
    if timing is not None:
        r.timings.started, r.timings.finished, r.timings.stages = timing


def _shm_bytes(wire: tuple) -> int:
    """Payload bytes of one request's wire tuple that go through shared memory."""
    return (sum(payload_size(v) for v, _ in wire[2].values())
            + sum(payload_size(t) for t in (wire[3] or {}).values()))


def _pack(wire: tuple, arena: Arena) -> tuple:
    request_id, headers, fields, tensors, meta, streams, protocol = wire
    return (request_id, headers, {k: (pack_bytes(v, arena), ct) for k, (v, ct) in fields.items()},
            pack_tensors(tensors, arena), meta, streams, protocol)


class ProcessInstance:
    """One model instance in a child process."""

    def __init__(self, name: str, version: str, archive: ModelArchive, config: ModelConfig, index: int,
                 gpu_id: int | None, metrics_sink: Callable | None = None, torch_threads: int = 0,
                 observe: Callable | None = None, envelope: str = "", forward_output: bool = False,
                 monitor_link: tuple | None = None):
        self.name, self.version, self.archive, self.config = name, version, archive, config
        self._monitor_link = monitor_link  # a monitor process's (address, key): the child sends there
        # the server writes TorchServe's log files: the child's print and logging come here and
        # are written from this instance's reader thread, as a thread instance's (model_log.log)
        self.forward_output = forward_output
        self.envelope = envelope  # the server's service_envelope (handlers/envelopes.py), '' for none
        self.index = index
        self.id = str(next(_ids))
        self.gpu_id = gpu_id
        self.status = InstanceStatus.LOADING
        self.start_time = time.time()
        self.error: str | None = None
        self.pid: int | None = None
        self.service = None  # the handler lives in the child
        self.on_lost: Callable[[Any, str], None] | None = None  # set by the registry; called on the loop
        self.started_s: float | None = None  # seconds from start() to ready
        self._metrics_sink = metrics_sink
        self._observe = observe  # the monitor's observe, called from the reader thread, or None
        self._observe_failed = False
        self._torch_threads = torch_threads
        self._accepts_tensors = False
        self._specs: tuple = (None, None)
        self._precision: str | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._conn = None
        self._proc = None
        self._job: tuple | None = None  # (batches, reporter, on_done, streams) of the handoff running
        self._in = self._out = None
        self._dropped: list[str] = []
        self._killed = False
        self._loaded = LoadSignal()
        self._barriers: dict[str, tuple] = {}  # feedback barriers sent to the child: token -> (loop, future)
        self._thread = threading.Thread(target=self._main, name=f"osprey-proc-{name}-{version}-{index}", daemon=True)
        # TorchServe's worker name: the child's output written by this thread is W-20000-m_1.0-stdout
        self._thread.osprey_worker = f"W-{self.id}-{name}_{version}"  # type: ignore[attr-defined]

    # --- lifecycle (called from the loop) -------------------------------------------
    def start(self) -> None:
        try:
            self._loop = asyncio.get_running_loop()
        except RuntimeError:
            self._loop = None
        self._t0 = time.monotonic()
        self._thread.start()

    async def wait_loaded(self, timeout: float) -> None:
        self._loop = self._loop or asyncio.get_running_loop()
        loaded = await self._loaded.until_set(timeout)
        if not loaded:
            self.status = InstanceStatus.FAILED
            self.kill()
        raise_unless_ready(self, loaded, timeout)

    def stop(self) -> None:
        """The child ends after the handoff it runs; one that does not within STOP_WAIT_S is killed."""
        if self.status != InstanceStatus.FAILED:
            self.status = InstanceStatus.STOPPED
        conn = self._conn
        if conn is not None:
            try:
                conn.send(None)
            except (OSError, ValueError):
                pass
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_later(STOP_WAIT_S, self._reap)

    def _reap(self) -> None:
        proc = self._proc
        if proc is not None and proc.exitcode is None and self._job is None:
            self.kill()

    def flush_capture(self, loop: asyncio.AbstractEventLoop) -> asyncio.Future:
        """The feedback barrier (:meth:`server.core.instance.Instance.flush_capture`): the child
        reads it after the handoff it runs, flushes its capture and answers ``flushed``. Its
        observations reach a monitor in the server's process through this pipe, before that
        answer; a monitor process gets them on the child's own link, in no order with the
        server's calls, so the child also posts a mark behind them there, and the future's
        result is that mark's token, for the monitor process to wait for (None: nothing to
        wait for). Settled at once where nothing can be pending (not monitored, not serving)."""
        fut = loop.create_future()
        conn = self._conn
        if self.status != InstanceStatus.READY or self._observe is None or conn is None:
            fut.set_result(None)
            return fut
        token = f"{os.getpid()}-{self.id}-{next(_marks)}"
        self._barriers[token] = (loop, fut)
        try:
            conn.send(("flush", token))
        except (OSError, ValueError):  # the child is gone: what it held is lost, nothing to wait for
            self._barriers.pop(token, None)
            fut.set_result(None)
        return fut

    def _flushed(self, token: str) -> None:
        """The child flushed (reader thread): the barrier's future gets the token its mark
        carries to a monitor process (None: the observations came through this pipe)."""
        waiter = self._barriers.pop(token, None)
        if waiter is not None:
            settle_soon(*waiter, token if self._monitor_link is not None else None)

    def _end_barriers(self) -> None:
        """The child is gone (reader thread): nothing of its will come; no barrier waits for it."""
        for token in list(self._barriers):
            waiter = self._barriers.pop(token, None)
            if waiter is not None:
                settle_soon(*waiter)

    def kill(self) -> bool:
        """SIGKILL the child (its reader then reports it lost); True: it is really gone."""
        self._killed = True
        proc = self._proc
        if proc is not None and proc.pid is not None:
            try:
                proc.kill()
            except (OSError, ValueError, AttributeError):
                pass
        return True

    @property
    def ended(self) -> bool:
        return self._thread.ident is None or not self._thread.is_alive()

    def release(self) -> None:
        """Drop the callback into the registry once the child and its reader have ended."""
        if self.ended:
            self.on_lost = None

    @property
    def accepts_tensors(self) -> bool:
        return self._accepts_tensors

    def tensor_specs(self) -> tuple[list | None, list | None]:
        return self._specs

    def model_precision(self) -> str | None:
        return self._precision

    def submit(self, batches: list[list[Ticket]], loop: asyncio.AbstractEventLoop,
               on_done: Callable) -> None:
        """Send a handoff to the child (on the loop: a pipe write of a small message). ``loop`` is
        what the outcome is reported through (``call_soon_threadsafe``); the batcher may pass a
        stand-in of its own, so it is kept with the handoff, never taken for the event loop."""
        wired, streams = [], []
        for batch in batches:
            pairs = [_to_child(r) for r in batch]
            wired.append([w for w, _ in pairs])
            streams.append([s for _, s in pairs])
        need = sum(_shm_bytes(w) for batch in wired for w in batch)
        if need > self._in.size:
            self._dropped.append(self._in.name)
            self._in.close(unlink=True)
            _live.discard(self._in)
            self._in = Arena.create(max(need, 2 * self._in.size))
            _live.add(self._in)
        self._in.pos = 0
        wired = [[_pack(w, self._in) for w in batch] for batch in wired]
        self._job = (batches, loop, on_done, streams)
        dropped, self._dropped = self._dropped, []
        self._conn.send(("job", self._in.name, self._out.name, dropped, wired))

    # --- the parent-side thread: start the child, then read it ------------------------
    def _main(self) -> None:
        name_os_thread(instance_thread_name(self.name, self.index, "p"))
        cpus.leave()  # started by the event loop's thread: not on its one CPU
        ctx = _mp()
        from server.instances import child

        parent, child_end = ctx.Pipe(duplex=True)
        spec = {"name": self.name, "version": self.version, "model_dir": str(self.archive.model_dir),
                "handler": self.archive.handler, "manifest": self.archive.manifest, "config": self.config,
                "gpu_id": self.gpu_id, "index": self.index, "torch_threads": self._torch_threads,
                "monitor": self._observe is not None, "envelope": self.envelope,
                "monitor_link": self._monitor_link if self._observe is not None else None,
                "packages": str(self.archive.deps_dir) if self.archive.deps_dir else None,
                "forward_output": self.forward_output,
                "log_level": logging.getLogger().getEffectiveLevel()}
        try:
            # the child, and what multiprocessing starts for it (a fork server, the resource
            # tracker of shared memory), not on the event loop's one CPU (server/core/cpus.py)
            with cpus.unpinned():
                self._in, self._out = Arena.create(IN_ARENA), Arena.create(OUT_ARENA)
                _live.update((self._in, self._out))
                self._proc = ctx.Process(target=child.main, args=(child_end, spec), daemon=True,
                                         name=f"osprey-{self.name}-{self.version}-{self.index}")
                self._proc.start()
        except BaseException as exc:
            log.exception("model %s instance %d: could not start its process", self.name, self.index)
            self.error = f"could not start a process: {exc}"
            self.status = InstanceStatus.FAILED
            self._loaded.set()
            self._cleanup()
            parent.close()
            child_end.close()
            return
        child_end.close()
        self._conn = parent
        self.pid = self._proc.pid
        if self.status != InstanceStatus.LOADING:  # stopped or timed out before the child existed: it ends once loaded
            try:
                parent.send(None)
            except (OSError, ValueError):
                pass
        try:
            while True:
                msg = parent.recv()
                kind = msg[0]
                if kind == "done":
                    self._finish(msg[1], msg[2])
                elif kind == "stream":
                    self._stream(msg[1], msg[2], msg[3], msg[4])
                elif kind == "observations":
                    self._observations(msg[1])
                elif kind == "flushed":
                    self._flushed(msg[1])
                elif kind == "metric":
                    if self._metrics_sink is not None:
                        try:
                            self._metrics_sink(*msg[1:])
                        except Exception:
                            log.exception("model %s: handler metric %r not recorded", self.name, msg[1])
                elif kind == "output":
                    self._output(msg[1], msg[2])
                elif kind == "log":
                    self._log(*msg[1:])
                elif kind == "ready":
                    _, self._accepts_tensors, self._specs, self._precision, self.pid = msg
                    self.started_s = time.monotonic() - self._t0
                    if self.status == InstanceStatus.LOADING:  # not stopped or timed out meanwhile
                        self.status = InstanceStatus.READY
                        self.load_seconds = time.time() - self.start_time  # TorchServe's WorkerLoadTime
                    event(log, "instance_started", model=self.name, version=self.version, index=self.index,
                          kind="process", pid=self.pid, seconds=round(self.started_s, 3))
                    self._loaded.set()
                elif kind == "failed":
                    self.error = msg[1]
                    self.status = InstanceStatus.FAILED
                    self._loaded.set()
        except (EOFError, OSError):
            pass
        except Exception:
            log.exception("model %s instance %d: bad message from its process", self.name, self.index)
            self.kill()
        self._proc.join(STOP_WAIT_S)
        if self._proc.exitcode is None:  # closed its pipe but lives on
            self._proc.kill()
            self._proc.join(STOP_WAIT_S)
        reason = describe_exit(self._proc.exitcode)
        self._end_barriers()
        parent.close()
        self._cleanup()
        if not self._loaded.is_set():
            self.error = self.error or f"its process ended while loading ({reason})"
            self.status = InstanceStatus.FAILED
            self._loaded.set()
            return
        if self.status == InstanceStatus.STOPPED and self._job is None:
            event(log, "instance_stopped", model=self.name, version=self.version, index=self.index, pid=self.pid,
                  reason=reason)
            return
        if self.status == InstanceStatus.READY or self._job is not None:
            event(log, "instance_killed" if self._killed else "instance_crashed", logging.WARNING, model=self.name,
                  version=self.version, index=self.index, pid=self.pid, reason=reason)
        self.status = InstanceStatus.FAILED
        self.error = reason
        self._job = None  # what it ran is answered by the batcher when it learns the instance is lost
        loop, lost = self._loop, self.on_lost
        if loop is not None and lost is not None:
            try:
                loop.call_soon_threadsafe(lost, self, reason)
            except RuntimeError:  # the loop has closed (shutdown)
                pass

    def _finish(self, wired: list, timings: list) -> None:
        batches, reporter, on_done, _ = self._job
        outcomes = []
        for batch, w, timing in zip(batches, wired, timings):
            outcomes.append([outcome_from_wire(o, self._out) for o in w])
            for r in batch:
                _from_child(r, timing)
        self._job = None
        try:
            reporter.call_soon_threadsafe(on_done, self, batches, outcomes)
        except RuntimeError:  # the loop has closed (shutdown)
            pass

    def _output(self, stream: str, text: str) -> None:
        """The child's stdout or stderr lines, written in this thread (the log files' streams
        route a model instance's thread's output to model_log.log)."""
        try:
            (sys.stderr if stream == "stderr" else sys.stdout).write(text)
        except Exception:
            pass  # never lose the reader over a stream that cannot be written

    def _log(self, level: int, name: str, message: str, created: float) -> None:
        """A log record of the child, handed to this process's logging under its logger's name."""
        logger = logging.getLogger(name)
        if logger.isEnabledFor(level):
            record = logger.makeRecord(name, level, "(process instance)", 0, message, None, None)
            record.created = created
            logger.handle(record)

    def _observations(self, observations: list) -> None:
        """The child's monitoring observations of a handoff: to the monitor (an O(1) append)."""
        observe = self._observe
        if observe is None:
            return
        for obs in observations:
            try:
                observe(obs)
            except Exception:
                if not self._observe_failed:
                    self._observe_failed = True
                    log.exception("model %s version %s: the monitor refused an observation (logged once)",
                                  self.name, self.version)

    def _stream(self, bi: int, ri: int, data: Any, headers: dict | None) -> None:
        job = self._job
        if job is None:
            return
        writer = job[3][bi][ri]
        if writer is not None:
            try:
                writer(data, headers) if headers else writer(data)
            except Exception:
                log.exception("model %s: an intermediate response could not be sent", self.name)

    def _cleanup(self) -> None:
        for a in (self._in, self._out):
            if a is not None:
                a.close(unlink=True)
                _live.discard(a)
