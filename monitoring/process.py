"""The monitor process (setting ``monitor_isolation=process``): the whole monitor, out of the
serving interpreter.

The server's front end is one Python interpreter whose event loop already needs about a core
(benchmarks/DRIFT.md): the monitor's analysis (binning, windows, the prediction log for
feedback joins, the inputs held for retraining) and the observations' transfer are GIL time
taken from it. Here the same :class:`~monitoring.monitor.Monitor` that ``monitoring.build``
assembles runs in a child process of the server, with its own GIL:

- the server (:class:`~monitoring.remote.RemoteMonitor`) talks to it over the pipe it was
  started with: version descriptions, observations of thread instances, inputs held for
  retraining, and calls (status, feedback, metrics exposition, drain) answered by id;
- a process instance's child connects on its own to the Unix socket this process listens on
  (``address``, authenticated with ``authkey``) and sends its version, its observations and
  its held inputs there (``server.instances.monitor_link``): they never pass through the
  front end.

Data messages are O(1) appends to the monitor's queues, read by one thread per connection;
calls run on an asyncio loop of their own so a feedback call waiting for capture does not hold
up a metrics scrape. The process ends when the server's end of the pipe closes (the server
exited, however it exited) or on ``("close",)``, after the monitor flushed its store.

Versions: the monitor resolves a version from the :class:`~server.core.capture.VersionRef`
last sent for it (by the server before the first call or observation naming it, by a child
when it connects); ``forget`` drops it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import threading
from multiprocessing.connection import Listener
from typing import Any

from server.core.capture import VersionRef, from_wire
from server.core.cpus import restore_inherited
from server.core.errors import OspreyError, error_state
from server.core.osthread import name_os_thread

__all__ = ["main", "PROCESS_NAME"]

log = logging.getLogger("osprey.monitoring")

PROCESS_NAME = "osprey-monitord"  # the process's name in ps/top (its main thread's)
HOP_S = 0.2  # the extra time a prediction may take to get here
MARK_WAIT_S = 5.0  # longest a feedback call waits for the marks its barrier posted on children's links
MAX_MARKS = 4096  # marks read and not yet waited for, kept (a barrier that gave up leaves its own)


class _Host:
    """The monitor and the versions it can resolve, fed by every connection."""

    def __init__(self, settings: Any):
        from monitoring.build import build_monitor

        self.versions: dict[tuple[str, str], VersionRef] = {}
        self.monitor = build_monitor(settings, self.resolve)
        # a prediction reaches this process one hop later than an in-process monitor (the
        # server's send tick, or a child's link): a label sent right after its answer waits that too
        self.monitor.capture_delay += HOP_S
        self.lost = 0  # observations the children's links dropped (monitor unreachable)
        self._marks: dict[str, None] = {}  # feedback barriers' marks read on the links, oldest first
        self._marked = threading.Condition()

    def resolve(self, model: str, version: str) -> VersionRef | None:
        return self.versions.get((model, version))

    def data(self, msg: tuple) -> None:
        """A data message: O(1) per item, never raises for a malformed one (logged)."""
        kind = msg[0]
        if kind == "observe":
            for obs in msg[1]:
                self.monitor.observe(obs)
            if len(msg) > 2 and msg[2]:
                self.lost += int(msg[2])
        elif kind == "hold":
            _, model, version, items, ts = msg
            ref = self.versions.get((model, version))
            if ref is not None and self.monitor.dataset is not None:
                self.monitor.dataset.hold_inputs(ref, from_wire(items), ts)  # (plain tuples on the wire)
        elif kind == "mark":  # a child flushed for a feedback barrier: what it sent before is queued
            with self._marked:
                self._marks[msg[1]] = None
                while len(self._marks) > MAX_MARKS:
                    del self._marks[next(iter(self._marks))]
                self._marked.notify_all()
        elif kind == "version":
            ref: VersionRef = msg[1]
            self.versions[(ref.name, ref.version)] = ref
        elif kind == "forget":
            _, model, version = msg
            self.versions.pop((model, version), None)
            self.monitor.forget(model, version)
        else:
            log.warning("event=monitor_process_unknown_message kind=%r", kind)

    def _wait_marks(self, marks: list[str], timeout: float) -> bool:
        """Wait until every one of ``marks`` was read (each then forgotten); False after
        ``timeout`` (a link that dropped it: the join then waits as without a barrier)."""
        with self._marked:
            done = self._marked.wait_for(lambda: all(t in self._marks for t in marks), timeout)
            for t in marks:
                self._marks.pop(t, None)
            return done

    async def call(self, method: str, args: tuple) -> Any:
        m = self.monitor
        if method == "status":
            return await asyncio.to_thread(m.status, *args)
        if method == "feedback":
            model, version, items, answered_at, others, flushed, marks = args  # (RemoteMonitor.feedback)
            if flushed and marks:  # the barrier's marks, read on the children's links: then it holds
                flushed = await asyncio.to_thread(self._wait_marks, list(marks), MARK_WAIT_S)
            return await m.feedback(model, version, items, answered_at, others, flushed)
        if method == "render":  # (the families, what this process dropped: the server keeps the total)
            text = await asyncio.to_thread(m.render, False)
            return text, m.dropped + self.lost
        if method == "drain":
            return await asyncio.to_thread(m.drain, *args)
        raise ValueError(f"no monitor call {method!r}")


def _serve_link(host: _Host, conn) -> None:
    """One process instance's child: data messages until it goes away."""
    name_os_thread("osprey-mon-link")
    try:
        while True:
            try:
                msg = conn.recv()
            except (EOFError, OSError):
                return
            try:
                host.data(msg)
            except Exception:
                log.exception("event=monitor_link_message_failed")
    finally:
        conn.close()


def _accept(host: _Host, listener: Listener, closing: threading.Event) -> None:
    name_os_thread("osprey-mon-accept")
    while True:
        try:
            conn = listener.accept()  # (the key's handshake runs in here)
        except Exception:
            if closing.is_set():  # the listener was closed: the process is ending
                return
            # a client that failed the handshake or left during it, or no file descriptor to
            # spare: refuse that one, go on accepting (the children's links retry)
            log.warning("event=monitor_link_refused", exc_info=True)
            continue
        threading.Thread(target=_serve_link, args=(host, conn), name="osprey-mon-link", daemon=True).start()


def main(conn, settings: Any, address: str, authkey: bytes) -> None:
    """The process: ``conn`` is the server's end of the pipe (calls and data), ``address`` the
    Unix socket path process instances connect to."""
    # Ctrl-C and SIGTERM to the whole group are the server's to handle: it drains, then closes
    # this process (which ends anyway when the server's end of the pipe closes)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    name_os_thread(PROCESS_NAME)
    restore_inherited()  # started from a thread pinned to the event loop's CPU: every CPU again
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s %(levelname)s %(name)s [monitor pid {os.getpid()}]: "
                                                   "%(message)s")
    try:
        host = _Host(settings)
        if os.path.exists(address):  # a previous monitor process's socket
            os.unlink(address)
        listener = Listener(address, family="AF_UNIX", backlog=64, authkey=authkey)
    except BaseException as exc:
        log.exception("the monitor process failed to start")
        conn.send(("failed", f"{type(exc).__name__}: {exc}"))
        return
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, name="osprey-mon-calls", daemon=True).start()
    closing = threading.Event()
    threading.Thread(target=_accept, args=(host, listener, closing), name="osprey-mon-accept", daemon=True).start()
    send_lock = threading.Lock()

    def reply(call_id: int, ok: bool, value: Any) -> None:
        with send_lock:
            try:
                conn.send(("reply", call_id, ok, value))
            except (OSError, ValueError):  # the server is gone
                pass

    async def run_call(call_id: int, method: str, args: tuple) -> None:
        try:
            value = await host.call(method, args)
        except OspreyError as exc:  # whole, so the client gets its status (a 503 with its Retry-After)
            reply(call_id, False, ("OspreyError", error_state(exc)))
            return
        except BaseException as exc:  # the server raises it in the caller
            reply(call_id, False, (type(exc).__name__, str(exc)))
            return
        reply(call_id, True, value)

    with send_lock:
        conn.send(("ready", os.getpid()))
    try:
        while True:
            try:
                msg = conn.recv()
            except (EOFError, OSError):  # the server exited
                break
            kind = msg[0]
            if kind == "close":
                break
            if kind == "call":
                asyncio.run_coroutine_threadsafe(run_call(*msg[1:]), loop)
                continue
            try:
                host.data(msg)
            except Exception:
                log.exception("event=monitor_message_failed kind=%r", kind)
    finally:
        closing.set()
        listener.close()  # (removes the socket file)
        for remove in (os.unlink, os.rmdir):  # and the server's temporary folder, if the server is gone
            with contextlib.suppress(OSError):  # (the server removes it itself when it stops)
                remove(address if remove is os.unlink else os.path.dirname(address))
        host.monitor.close()  # flushes what the store buffered
        loop.call_soon_threadsafe(loop.stop)
