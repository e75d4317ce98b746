"""Starts, watches, restarts and drains the front-end processes (setting ``frontends``).

The server makes each front end's listening socket itself (bound to the inference address with
``SO_REUSEPORT``, so the port is known and free before any child starts) and a Unix socket pair,
and hands both to the child as inherited file descriptors: nothing else on the machine can reach
the relay. A front end that exits while the server runs is started again (after 0.5 s, doubling
to 30 s while it keeps failing at once); the kernel sends new connections only to listening
sockets, so while one is down the others take its share.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Callable

from server.core import cpus
from server.core.events import event
from server.frontends.relay import RelayLink

__all__ = ["FrontEnds", "reuseport_listeners", "START_TIMEOUT_S"]

log = logging.getLogger("osprey.frontends")

START_TIMEOUT_S = 60.0  # a front end that has not listened by then fails the server's start
HEARTBEAT_S = 1.0  # how often each front end is asked whether its loop runs
_ROOT = str(Path(__file__).resolve().parents[2])  # the folder holding the ``server`` package


def reuseport_listeners(host: str, port: int, exclusive: bool = False) -> list[socket.socket]:
    """TCP sockets bound to every address of (host, port) with SO_REUSEADDR and SO_REUSEPORT, not
    yet listening (a host name may have several addresses, ::1 and 127.0.0.1 for localhost: all
    are bound, as uvicorn binds them when it makes its own sockets).

    ``exclusive``: first check that nothing listens there (a plain bind): SO_REUSEPORT alone
    would let a second server of the same user share the port with the first, unnoticed."""
    if not hasattr(socket, "SO_REUSEPORT"):
        raise OSError("several front ends need SO_REUSEPORT, which this system does not have (setting frontends)")
    infos = []
    for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE):
        if info[4] not in [i[4] for i in infos]:
            infos.append(info)
    out: list[socket.socket] = []
    try:
        for family, kind, proto, _, addr in infos:
            if exclusive:
                with socket.socket(family, kind, proto) as probe:
                    probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    if family == socket.AF_INET6:
                        probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                    probe.bind(addr)
            sock = socket.socket(family, kind, proto)
            out.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(addr)
            sock.set_inheritable(False)
    except OSError:
        for sock in out:
            sock.close()
        raise
    return out


class _FrontEnd:
    __slots__ = ("index", "proc", "link", "watch", "failures", "started_at", "restarts", "retired")

    def __init__(self, index: int):
        self.index = index
        self.proc: asyncio.subprocess.Process | None = None
        self.link: RelayLink | None = None
        self.watch: asyncio.Task | None = None
        self.failures = 0
        self.started_at = 0.0
        self.restarts = 0
        self.retired = [0, 0]  # requests shed and connections refused by its earlier processes

    def listening(self) -> bool:
        """Its process runs and has said it listens."""
        return (self.link is not None and self.proc is not None and self.proc.returncode is None
                and self.link.ready.done())

    def replace_link(self, link: RelayLink) -> None:
        """A new process's link: what the one before counted (up to its last heartbeat, which
        may be read after it exited) joins the totals now, so a counter never goes back."""
        old, self.link = self.link, link
        if old is not None:
            shed, refused, _ = old.counts
            self.retired[0] += shed
            self.retired[1] += refused


class FrontEnds:
    """The ``count`` front-end processes beside this server, relaying to ``app`` (the inference
    port's router) on ``host:port``."""

    def __init__(self, settings, app: Callable, host: str, port: int, count: int, drain_linger: float = 1.0):
        self.settings = settings
        self.app = app
        self.host = host
        self.port = port
        self.loop = asyncio.get_running_loop()
        self.ends = [_FrontEnd(i + 1) for i in range(count)]
        self.stopping = False
        self._heartbeat: asyncio.Task | None = None
        self.drain_linger = drain_linger  # the server's DRAIN_LINGER_S, which the front ends' drains use too
        self._config = {k: v for k, v in dataclasses.asdict(settings).items()}
        self._log_level = logging.getLevelName(logging.getLogger().getEffectiveLevel())
        # where this process logs (--log-file): the front ends' lines go to the same file
        self._log_file = next((h.baseFilename for h in logging.getLogger().handlers
                               if isinstance(h, logging.FileHandler)), None)

    # --- start --------------------------------------------------------------------------
    async def start(self) -> None:
        """Start every front end; return once all listen (OSError naming the one that did not)."""
        await asyncio.gather(*(self._spawn(fe) for fe in self.ends))
        for fe in self.ends:
            try:
                await asyncio.wait_for(asyncio.shield(fe.link.ready), START_TIMEOUT_S)
            except (asyncio.TimeoutError, ConnectionError):
                code = fe.proc.returncode if fe.proc is not None else None
                raise OSError(f"front end {fe.index} did not start (exit code {code}); its log is in the server's")
            fe.watch = self.loop.create_task(self._watch(fe))
        self._heartbeat = self.loop.create_task(self._beat())
        event(log, "frontends_started", count=len(self.ends) + 1, pids=[fe.proc.pid for fe in self.ends],
              address=f"{self.host}:{self.port}")

    async def _spawn(self, fe: _FrontEnd) -> None:
        listeners = reuseport_listeners(self.host, self.port)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            # the settings go through the socket pair, never the command line: they may hold keys
            # and passwords (inference_key, keystore_pass), and any user of the machine can read
            # a process's command line
            config = {"index": fe.index, "log_level": self._log_level, "log_file": self._log_file,
                      "drain_linger": self.drain_linger, "settings": self._config}
            data = json.dumps(config, default=str).encode()
            env = dict(os.environ)
            env["PYTHONPATH"] = os.pathsep.join([_ROOT] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
            with cpus.unpinned():  # not on the event loop's one CPU (server/core/cpus.py)
                fe.proc = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "server.frontends.child", str(fe.index), str(theirs.fileno()),
                    ",".join(str(s.fileno()) for s in listeners),
                    pass_fds=(theirs.fileno(), *(s.fileno() for s in listeners)),
                    stdin=asyncio.subprocess.DEVNULL, env=env, start_new_session=False)
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
            for sock in listeners:  # the child's copies listen; one kept here would queue connections nobody takes
                sock.close()
        ours.setblocking(False)
        try:  # after the start: settings larger than the socket's buffer wait for the child to read them
            await self.loop.sock_sendall(ours, len(data).to_bytes(4, "big") + data)
        except BaseException:
            ours.close()
            raise
        fe.started_at = time.monotonic()
        _, link = await self.loop.connect_accepted_socket(lambda: RelayLink(self.app, self.loop), ours)
        fe.replace_link(link)

    async def _beat(self) -> None:
        """Every HEARTBEAT_S, ask each front end for a sign of life; one that has not answered a
        question asked ``frontend_timeout`` seconds ago (a stopped or hung process still holds
        its listening socket, so the kernel keeps sending it its share of new connections) is
        killed, and :meth:`_watch` starts it again. After a pause of this process itself (a
        round late by more than a beat), nobody is judged that round: the answers may be
        waiting unread."""
        timeout = float(self.settings.frontend_timeout)
        woke = self.loop.time()
        while not self.stopping:
            await asyncio.sleep(HEARTBEAT_S)
            now = self.loop.time()
            late, woke = now - woke > 2 * HEARTBEAT_S, now
            for fe in self.ends:
                if not fe.listening():
                    continue
                link, proc = fe.link, fe.proc
                asked = link.asked_at
                if asked is not None and link.last_heard < asked:  # the question is unanswered
                    if now - asked > timeout and not late and not self.stopping:
                        event(log, "frontend_unresponsive", level=logging.WARNING, index=fe.index, pid=proc.pid,
                              silent_s=round(now - link.last_heard, 1))
                        try:
                            proc.kill()  # SIGKILL ends a stopped process too
                        except ProcessLookupError:
                            pass
                        link.asked_at = None
                    continue
                if link.transport is not None and not link.transport.is_closing():
                    link.asked_at = now
                    link.put(("p",))

    async def _watch(self, fe: _FrontEnd) -> None:
        """Start ``fe`` again whenever it exits while the server runs."""
        while True:
            code = await fe.proc.wait()
            if self.stopping:
                return
            lived = time.monotonic() - fe.started_at
            fe.failures = fe.failures + 1 if lived < 10.0 else 1
            backoff = min(30.0, 0.5 * 2 ** (fe.failures - 1))
            event(log, "frontend_exited", level=logging.WARNING, index=fe.index, pid=fe.proc.pid,
                  code=code, restart_in_s=backoff)
            await asyncio.sleep(backoff)
            if self.stopping:
                return
            fe.started_at = time.monotonic()  # a start that fails at once counts as failing at once (backoff grows)
            try:
                await self._spawn(fe)
                await asyncio.wait_for(asyncio.shield(fe.link.ready), START_TIMEOUT_S)
                fe.restarts += 1
                event(log, "frontend_restarted", index=fe.index, pid=fe.proc.pid)
            except Exception as exc:  # whatever it was, try again later: a front end is never given up
                if self.stopping:  # the server stops meanwhile (its SIGTERM reached the new child)
                    return
                log.error("front end %d could not be started again: %s: %s", fe.index, type(exc).__name__, exc)
                if fe.proc is None or fe.proc.returncode is not None:
                    continue
                fe.proc.kill()

    def stats(self) -> dict[str, int]:
        """For the metrics: front ends up (listening, process alive), restarts, and their requests
        shed, connections refused (since the server started; a process's last second before it
        died may be missing) and connections open (as of their last heartbeat)."""
        up = shed = refused = open_ = 0
        for fe in self.ends:
            alive = fe.listening()
            up += alive
            counts = fe.link.counts if fe.link is not None else (0, 0, 0)
            shed += fe.retired[0] + counts[0]
            refused += fe.retired[1] + counts[1]
            open_ += counts[2] if alive else 0
        return {"up": up, "restarts": sum(fe.restarts for fe in self.ends), "shed": shed, "refused": refused,
                "open": open_}

    # --- stop ---------------------------------------------------------------------------
    def begin_drain(self) -> None:
        """Every front end stops accepting and drains its connections (SIGTERM), then exits."""
        self.stopping = True
        self.signal(signal.SIGTERM)

    def busy(self) -> bool:
        """A relayed request is unanswered, or a front end is still draining its connections."""
        return any((fe.link is not None and fe.link.open) or (fe.proc is not None and fe.proc.returncode is None)
                   for fe in self.ends)

    async def close(self, grace: float) -> None:
        """After the drain: front ends still running get ``grace`` seconds, then are killed."""
        self.begin_drain()
        procs = [fe.proc for fe in self.ends if fe.proc is not None and fe.proc.returncode is None]
        if procs:
            _, late = await asyncio.wait([self.loop.create_task(p.wait()) for p in procs], timeout=max(grace, 0.05))
            for p in procs:
                if p.returncode is None:
                    p.kill()
            await asyncio.gather(*(p.wait() for p in procs), return_exceptions=True)
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            await asyncio.gather(self._heartbeat, return_exceptions=True)
        for fe in self.ends:
            if fe.watch is not None:
                fe.watch.cancel()
            if fe.link is not None and fe.link.transport is not None:
                fe.link.transport.close()
        await asyncio.gather(*(fe.watch for fe in self.ends if fe.watch is not None), return_exceptions=True)
        # a restart that was under way when the watches were cancelled may have left a child
        for fe in self.ends:
            if fe.proc is not None and fe.proc.returncode is None:
                fe.proc.kill()
                await asyncio.gather(fe.proc.wait(), return_exceptions=True)

    def signal(self, sig: int) -> None:
        for fe in self.ends:
            if fe.proc is not None and fe.proc.returncode is None:
                try:
                    fe.proc.send_signal(sig)
                except ProcessLookupError:
                    pass
