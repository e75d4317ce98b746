"""The server's side of a monitor in its own process (setting ``monitor_isolation=process``).

:class:`RemoteMonitor` is the :class:`~server.core.capture.MonitorPort` the data plane and the
instances see; the monitor itself (``monitoring.process``) runs in a child process, so its
analysis never takes the serving interpreter's GIL. On the request side everything stays
O(1): ``observe`` (a thread instance's batch) and ``answered`` (the data plane's observer, on
the event loop) append to one bounded deque; the thread ``osprey-monitor`` sends what
accumulated every ``tick`` as one message (and takes a thread instance's held inputs out of
their requests, for models with retraining). Process instances do not come through here at
all: their children send observations and held inputs to the monitor process's socket
(:attr:`link`, ``server.instances.monitor_link``).

Calls (``status``, ``feedback``, the metrics exposition, ``drain``) go through the same queue,
so a call sees every observation handed over before it, and are answered by id on a reader
thread.

**Failure.** If the monitor process dies, serving does not notice: observations are dropped
and counted (osprey_monitoring_dropped_total), ``status`` and ``feedback`` answer 503 naming
what happened, the metrics endpoint serves everything but the monitoring families, and the
process is started again after ``restart_backoff`` seconds (doubling while it keeps failing,
up to 30 s). What the monitor kept in memory (windows, episodes, the prediction log, held
inputs) is lost with it unless ``redis_url`` keeps it in Redis; a version's reference profile
is read again from its archive.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import multiprocessing
import os
import random
import shutil
import tempfile
import threading
import time
from collections import deque
from concurrent.futures import Future, TimeoutError as FutureTimeout
from typing import Any, Callable, Sequence

from monitoring.families import fmt, render_family
from server.core.capture import FeedbackItem, FeedbackResult, Observation, VersionRef, held_wire, retraining_holds
from server.core.cpus import unpinned
from server.core.errors import ErrorKind, OspreyError, error_from_state
from server.core.osthread import name_os_thread
from server.core.types import InferenceResponse

__all__ = ["RemoteMonitor"]

log = logging.getLogger("osprey.monitoring")

CALL_TIMEOUT_S = 30.0  # status / drain: longest wait for the monitor process's answer
FEEDBACK_TIMEOUT_S = 60.0
SCRAPE_TIMEOUT_S = 5.0
MAX_BACKOFF_S = 30.0
_DROPPED_DOC = "Observations dropped because the monitor's queue was full."
STABLE_S = 30.0  # a monitor process that ran this long resets the restart backoff


class RemoteMonitor:
    """The monitor in a child process, behind the same interface as ``monitoring.monitor.Monitor``."""

    def __init__(self, settings: Any, resolve: Callable[[str, str], Any], *, queue_size: int = 10_000,
                 tick: float = 0.05, start_timeout: float = 120.0, restart_backoff: float = 1.0):
        self.settings, self.resolve = settings, resolve
        self.queue_size, self.tick = queue_size, tick
        self.start_timeout, self.restart_backoff = start_timeout, restart_backoff
        self._dir = tempfile.mkdtemp(prefix="osprey-mon-")
        self.address = os.path.join(self._dir, "monitor.sock")
        self.authkey = os.urandom(32)
        # what a process instance's child connects with (server.instances.monitor_link)
        self.link = (self.address, self.authkey)
        self.dropped = 0  # observations (and held inputs) dropped here: queue full, or the process down
        self.restarts = 0
        self.pid: int | None = None
        self._out: deque = deque()
        self._calls: dict[int, Future] = {}
        self._ids = itertools.count(1)
        self._lock = threading.Lock()  # _calls, _conn, _state
        self._wake = threading.Event()
        self._conn = None
        self._proc = None
        self._state = "starting"  # starting | up | down
        self._why = "the monitor process is starting"
        self._sent: set[tuple[str, str]] = set()  # versions the running process was told about
        self._last_answered = float("-inf")
        self._process_dropped = 0  # what the running monitor process says it dropped
        self._dropped_carried = 0  # what the processes before it had dropped
        self._retry_at = 0.0  # monotonic time the next start may happen
        self._backoff = restart_backoff
        self._started_at = 0.0  # monotonic time the running process said ready
        self._closed = False
        self._rng = random.Random()
        self._thread = threading.Thread(target=self._run, name="osprey-monitor", daemon=True)
        self._thread.start()

    # -- request side: O(1) ------------------------------------------------------------------------
    def observe(self, obs: Observation) -> None:
        if len(self._out) >= self.queue_size:
            self.dropped += 1
            return
        self._out.append(("obs", obs))

    def answered(self, mv: Any, ticket: Any, outcome: Any) -> None:
        """The data plane's observer: an answer left now. A thread instance's successful answer
        of a model with retraining has its request queued for its inputs to be held (a
        process instance's child holds its own)."""
        self._last_answered = time.monotonic()
        if mv is None or type(outcome) is not InferenceResponse or outcome.status != 200:
            return
        if ((mv.config.isolation or self.settings.instance_isolation) == "process"
                or not retraining_holds(mv.config.retraining, self._rng)):
            return
        if len(self._out) >= self.queue_size:
            self.dropped += 1
            return
        self._out.append(("hold", mv, ticket.request, time.time()))

    # -- calls -----------------------------------------------------------------------------------------
    def _call(self, method: str, *args: Any) -> tuple[int, Future]:
        """Queue a call; (its id, its future). The future is marked running, so a caller that
        stops waiting (asyncio.wait_for cancels what it wraps) cannot cancel it under the
        reader thread, which settles it when the answer comes."""
        fut: Future = Future()
        fut.set_running_or_notify_cancel()
        with self._lock:
            call_id = next(self._ids)
            if self._closed or self._state == "down":
                fut.set_exception(self._unavailable())
                return call_id, fut
            self._calls[call_id] = fut
            self._out.append(("call", call_id, method, args))
        self._wake.set()
        return call_id, fut

    def _forget_call(self, call_id: int) -> None:
        with self._lock:
            self._calls.pop(call_id, None)

    def _late(self, call_id: int, timeout: float) -> OspreyError:
        self._forget_call(call_id)  # its answer, if it still comes, is dropped
        return OspreyError(ErrorKind.UNAVAILABLE, f"monitoring is unavailable: the monitor process did not answer "
                                                  f"within {timeout:g} s")

    def _unavailable(self) -> OspreyError:
        why = "the server is stopping" if self._closed else self._why
        return OspreyError(ErrorKind.UNAVAILABLE, f"monitoring is unavailable: {why}")

    def _wait(self, call: tuple[int, Future], timeout: float) -> Any:
        call_id, fut = call
        try:
            return fut.result(timeout)
        except FutureTimeout:
            raise self._late(call_id, timeout) from None

    async def _await(self, call: tuple[int, Future], timeout: float) -> Any:
        call_id, fut = call
        try:
            return await asyncio.wait_for(asyncio.wrap_future(fut), timeout)
        except asyncio.TimeoutError:
            raise self._late(call_id, timeout) from None

    def status(self, model: str, version: str) -> dict[str, Any]:
        """The monitoring JSON (a worker thread: it waits for the monitor process)."""
        return self._wait(self._call("status", model, version), CALL_TIMEOUT_S)

    async def feedback(self, model: str, version: str, items: Sequence[FeedbackItem],
                       others: Sequence[str] = (), flushed: bool = False,
                       marks: Sequence[str] = ()) -> FeedbackResult:
        # (queued behind every observation handed over before it; with ``flushed``, once the
        # monitor process has read ``marks`` on the process instances' links it has all of this
        # server's predictions the labels can be for: monitoring.process waits for them)
        return await self._await(self._call("feedback", model, version, list(items), self._last_answered,
                                            list(others), flushed, list(marks)), FEEDBACK_TIMEOUT_S)

    async def exposition(self) -> str:
        """The monitoring families for /metrics, and the monitor process's own: up (0 while it
        is down: the drift and quality families are then left out, the rest of the endpoint is
        served as always), restarts, and what was dropped here meanwhile."""
        try:
            text, there = await self._await(self._call("render"), SCRAPE_TIMEOUT_S)
            self._process_dropped = there
            up = 1.0
        except OspreyError:
            text, up = "", 0.0
        # one running total across monitor processes: this side's drops, and theirs (kept when one exits)
        dropped = self.dropped + self._dropped_carried + self._process_dropped
        return (text + render_family("osprey_monitoring_dropped_total", "counter", _DROPPED_DOC,
                                     [f"osprey_monitoring_dropped_total {fmt(float(dropped))}\n"])
                + render_family("osprey_monitor_process_up", "gauge", "1 while the monitor's own process "
                                     "(monitor_isolation=process) answers, else 0.", [f"osprey_monitor_process_up {fmt(up)}\n"])
                + render_family("osprey_monitor_process_restarts_total", "counter",
                                "Times the monitor's own process exited and was started again.",
                                [f"osprey_monitor_process_restarts_total {fmt(float(self.restarts))}\n"]))

    def drain(self, timeout: float = 10.0) -> bool:
        """Test hook: everything handed over before this call analysed (see Monitor.drain)."""
        return bool(self._wait(self._call("drain", timeout), timeout + CALL_TIMEOUT_S))

    def forget(self, model: str, version: str) -> None:
        self._out.append(("forget", model, version))
        self._wake.set()

    def close(self) -> None:
        with self._lock:
            self._closed = True
        self._wake.set()
        self._thread.join(timeout=30)
        shutil.rmtree(self._dir, ignore_errors=True)

    # -- the thread: start, send, restart ---------------------------------------------------------------
    def _run(self) -> None:
        name_os_thread("osprey-monitor")
        while True:
            if self._closed:
                self._stop()
                return
            if self._conn is None:
                if time.monotonic() < self._retry_at:
                    self._discard()
                    self._wake.wait(max(0.0, min(self.tick, self._retry_at - time.monotonic())))
                    self._wake.clear()
                    continue
                if not self._start():
                    self._back_off()
                continue
            self._wake.wait(self.tick)
            self._wake.clear()
            try:
                self._send()
            except Exception:  # never let the thread die: nothing would reach the monitor again
                log.exception("event=monitor_send_failed")

    def _back_off(self) -> None:
        """The next start after the current backoff, which doubles (up to MAX_BACKOFF_S) while
        starts fail or processes die young, and is reset by one that ran STABLE_S."""
        now = time.monotonic()
        if self._started_at and now - self._started_at >= STABLE_S:
            self._backoff = self.restart_backoff
        self._started_at = 0.0  # the failed starts that may follow did not run at all
        self._retry_at = now + self._backoff
        self._backoff = min(self._backoff * 2, MAX_BACKOFF_S)

    def _start(self) -> bool:
        ctx = multiprocessing.get_context("spawn")
        from monitoring import process

        parent, child = ctx.Pipe(duplex=True)
        proc = ctx.Process(target=process.main, args=(child, self.settings, self.address, self.authkey),
                           name="osprey-monitor", daemon=True)
        try:
            with unpinned():  # not on the event loop's one CPU (server/core/cpus.py)
                proc.start()
            child.close()
            deadline = time.monotonic() + self.start_timeout
            while not parent.poll(0.1):
                if self._closed:
                    raise RuntimeError("the server is stopping")
                if not proc.is_alive():
                    raise RuntimeError(f"it exited with code {proc.exitcode} while starting")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"it did not start within {self.start_timeout:g} s")
            msg = parent.recv()
            if msg[0] != "ready":
                raise RuntimeError(msg[1])
        except Exception as exc:
            if proc.is_alive():
                proc.kill()
            proc.join(5)
            parent.close()
            with self._lock:
                self._state, self._why = "down", f"the monitor process failed to start ({exc}); retrying"
            log.error("event=monitor_process_failed reason=%s", exc)
            self._fail_calls()
            return False
        with self._lock:
            self._conn, self._proc, self.pid = parent, proc, msg[1]
            self._state, self._why = "up", ""
            self._sent = set()
            self._started_at = time.monotonic()
        if self.restarts:
            log.warning("event=monitor_process_restarted pid=%s restarts=%d", self.pid, self.restarts)
        threading.Thread(target=self._read, args=(parent, proc), name="osprey-mon-reader", daemon=True).start()
        return True

    def _read(self, conn, proc) -> None:
        name_os_thread("osprey-mon-reader")
        while True:
            try:
                msg = conn.recv()
            except (EOFError, OSError):
                break
            if msg[0] == "reply":
                _, call_id, ok, value = msg
                with self._lock:
                    fut = self._calls.pop(call_id, None)
                if fut is None:  # its caller stopped waiting
                    continue
                if ok:
                    _settle(fut, value)
                elif value[0] == "KeyError":
                    _settle(fut, error=KeyError(value[1]))
                elif value[0] == "OspreyError":  # the monitor's own answer (Redis down: 503), as it raised it
                    _settle(fut, error=error_from_state(value[1]))
                else:
                    _settle(fut, error=OspreyError(ErrorKind.INTERNAL, f"the monitor failed: {value[0]}: {value[1]}"))
        if self._closed:
            return
        proc.join(1.0)
        code = proc.exitcode
        with self._lock:
            if self._conn is not conn:
                return
            self._conn = None
            self._state = "down"
            self._dropped_carried += self._process_dropped  # its count ends with it: keep the total
            self._process_dropped = 0
            self._why = (f"the monitor process (pid {self.pid}) exited with code {code}; it is being restarted, "
                         "and what it kept in memory is lost")
            self.restarts += 1
            self._back_off()
        log.error("event=monitor_process_exited pid=%s code=%s restarts=%d", self.pid, code, self.restarts)
        self._fail_calls()
        self._wake.set()

    def _fail_calls(self) -> None:
        with self._lock:
            calls, self._calls = self._calls, {}
        for fut in calls.values():
            _settle(fut, error=self._unavailable())

    def _fail_call(self, call_id: int, error: BaseException) -> None:
        with self._lock:
            fut = self._calls.pop(call_id, None)
        if fut is not None:
            _settle(fut, error=error)

    def _discard(self) -> None:
        """The process is down: what was handed over is dropped (counted), calls fail."""
        while True:
            try:
                item = self._out.popleft()
            except IndexError:
                break
            if item[0] in ("obs", "hold"):
                self.dropped += 1
        self._fail_calls()

    def _version(self, model: str, version: str, out: list) -> None:
        """Tell the process about a version before anything naming it (once per process)."""
        key = (model, version)
        if key in self._sent:
            return
        mv = self.resolve(model, version)
        if mv is None:
            return
        out.append(("version", VersionRef(mv.name, mv.version, mv.config, str(mv.archive.model_dir))))
        self._sent.add(key)

    def _send(self) -> None:
        """Everything queued, in order: observations and held inputs grouped into one message
        each between calls."""
        msgs: list[tuple] = []
        observations: list[Observation] = []
        holds: dict[tuple[str, str], list] = {}

        def flush_data() -> None:
            if observations:
                msgs.append(("observe", list(observations)))
                observations.clear()
            for (model, version), items in holds.items():
                msgs.append(("hold", model, version, items, time.time()))
            holds.clear()

        while True:
            try:
                item = self._out.popleft()
            except IndexError:
                break
            kind = item[0]
            if kind == "obs":
                obs = item[1]
                self._version(obs.model, obs.version, msgs)
                observations.append(obs)
            elif kind == "hold":
                _, mv, request, _ts = item
                self._version(mv.name, mv.version, msgs)
                try:
                    holds.setdefault((mv.name, mv.version), []).append(held_wire(request))
                except Exception as exc:  # an input that cannot be kept is not worth failing anything
                    log.warning("event=dataset_hold_failed model=%s reason=%s", mv.name, exc)
                    self.dropped += 1
            elif kind == "call":
                flush_data()
                _, call_id, method, args = item
                if method in ("status", "feedback"):
                    self._version(args[0], args[1], msgs)
                msgs.append(("call", call_id, method, args))
            elif kind == "forget":
                flush_data()
                self._sent.discard((item[1], item[2]))
                msgs.append(item)
        flush_data()
        conn = self._conn
        for i, msg in enumerate(msgs):
            try:
                if conn is None:
                    raise OSError("the monitor process is down")
                conn.send(msg)
            except (OSError, ValueError):  # the process died: the reader restarts it, and fails the calls
                self.dropped += sum(_rows(m) for m in msgs[i:])
                for m in msgs[i:]:
                    if m[0] == "call":
                        self._fail_call(m[1], self._unavailable())
                return
            except Exception as exc:  # this message cannot be sent (not picklable): the others go on
                log.exception("event=monitor_message_unsendable kind=%s", msg[0])
                self.dropped += _rows(msg)
                if msg[0] == "call":
                    self._fail_call(msg[1], OspreyError(ErrorKind.INTERNAL, f"the monitor call could not be sent: "
                                                                            f"{type(exc).__name__}: {exc}"))

    def _stop(self) -> None:
        """Close: what is queued is sent, then the process is told to end (it flushes its store)."""
        conn, proc = self._conn, self._proc
        if conn is not None:
            self._send()
            try:
                conn.send(("close",))
            except (OSError, ValueError):
                pass
        if proc is not None:
            proc.join(20)
            if proc.is_alive():
                log.warning("event=monitor_process_killed pid=%s reason=did not stop within 20 s", self.pid)
                proc.kill()
                proc.join(5)
        if conn is not None:
            conn.close()
        self._fail_calls()


def _settle(fut: Future, value: Any = None, error: BaseException | None = None) -> None:
    """Set a call's outcome once (the reader and a failure path may race for it)."""
    try:
        if error is not None:
            fut.set_exception(error)
        else:
            fut.set_result(value)
    except Exception:  # already settled
        pass


def _rows(msg: tuple) -> int:
    """Observations and held inputs a message carries (what its loss drops)."""
    if msg[0] == "observe":
        return len(msg[1])
    if msg[0] == "hold":
        return len(msg[3])
    return 0
