"""A front-end process (``python -m server.frontends.child INDEX LINK_FD LISTEN_FDS``): connections
in its own interpreter, requests relayed to the server.

It is started by the server (:mod:`~server.frontends.supervisor`) with two file descriptors:
a listening socket bound to the inference address with ``SO_REUSEPORT``, and its end of a
Unix socket pair to the server, on which the server first writes the settings (as JSON, with a
4-byte length: they may hold keys, which a command line would show to every user). It serves HTTP with the server's own protocol
(:mod:`server.protocols.rest.http_protocol`: one write per answer, read timeouts, head
limits, drain), reads each request's body (up to ``max_request_size`` and one byte more: the
server's router then refuses it, 413, as it would its own), and relays the request whole to
the server, which answers it as if it had arrived on one of its own connections. It holds no
model, no registry and no state of its own: a front end that dies loses only its connections,
and is started again.

A streamed answer (a handler's intermediate responses) is relayed part by part as the server
sends them, and its parts wait here for a client slow to take them: the server's rule for a
client that stops reading applies here too (``server.protocols.rest.chunked``): past
``MAX_BACKLOG`` bytes waiting, with nothing taken for ``stream_stall_timeout`` seconds, the
client's connection is reset, what waited is dropped, the server is told the client is gone,
and whatever more the server sends for that request is ignored; the same once ``MAX_HELD``
bytes wait, however the client reads.

SIGTERM (and SIGINT): drain as the server does (stop accepting, ``Connection: close`` on every
answer, wait for what is in progress), then exit. The server's end closing: what is in progress
is answered 503 and the process exits.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import json
import logging
import os
import signal
import socket
import sys
import time
from typing import Callable

import uvicorn

from server.core.cpus import restore_inherited
from server.frontends.frames import FrameReader, Outbox, scope_head
from server.protocols.rest.http_protocol import ABORT, begin_drain, connection_limit, drain_pass, http_protocol
from server.protocols.stall import MAX_BACKLOG, StallWatch, set_held, unacknowledged
from server.settings import Settings
from server.tls import Tls, is_https

log = logging.getLogger("osprey.frontends")

GONE_SCAN_S = 0.1  # how often requests waiting for their answer are checked for clients that left
_RESETS: set[asyncio.Task] = set()  # connection resets under way (held until they end)
_BEHIND = (b'{"code": 503, "type": "ServiceUnavailableException", '
           b'"message": "The server is not keeping up with the requests this front end relays; try again"}')
_LOST = (b'{"code": 503, "type": "ServiceUnavailableException", '
         b'"message": "The server stopped before answering (front end lost its server)"}')


class _Pending:
    """A relayed request waiting for its answer's messages."""

    __slots__ = ("cycle", "loop", "msgs", "waiter", "gone_sent", "waiting", "sent", "_watch", "cut", "why")
    stall_s = 10.0  # the setting stream_stall_timeout (main sets it); 0: never cut for taking nothing

    def __init__(self, cycle, loop: asyncio.AbstractEventLoop) -> None:
        self.cycle = cycle  # uvicorn's request cycle: ``disconnected`` turns True when the client goes
        self.loop = loop
        self.msgs: collections.deque = collections.deque()
        self.waiter: asyncio.Future | None = None
        self.gone_sent = False
        self.waiting = 0  # bytes of streamed parts not yet handed to the client's connection
        self.sent = 0  # streamed parts handed to it
        self._watch: StallWatch | None = None  # the stall check, while its parts are being sent (watch)
        self.cut = False  # its client was cut (connection reset already)
        self.why = ""  # why it was cut (server.protocols.stall)

    def push(self, msg: tuple) -> None:
        self.msgs.append(msg)
        if msg[0] == "b":
            self.waiting += len(msg[2])
            if self._watch is not None:
                self._watch.arm()
        w = self.waiter
        if w is not None and not w.done():
            w.set_result(None)

    async def next(self) -> tuple:
        while not self.msgs:
            self.waiter = self.loop.create_future()
            await self.waiter
        msg = self.msgs.popleft()
        if msg[0] == "b":
            self.waiting -= len(msg[2])
        return msg

    def watch(self, on_stall: Callable[[], None]) -> None:
        """The answer's parts are being sent: cut its client with ``on_stall`` if it stops taking them."""
        def stalled() -> None:
            self.why = self._watch.why
            self.msgs.clear()
            self.waiting = 0
            self.cut = True
            on_stall()

        self._watch = StallWatch(self.loop, self.stall_s, MAX_BACKLOG, lambda: self.waiting, self._progress, stalled)
        # armed from the loop, not from the relay that calls this: a cut at once (more than the
        # cap waiting already) then resets the connection before the relay ends the answer
        self.loop.call_soon(self._arm)

    def _arm(self) -> None:
        if self._watch is not None:
            self._watch.arm()

    def _progress(self) -> tuple:
        """What moves while the client takes its answer: parts handed to its connection, the
        bytes its transport holds, the bytes its socket sent that it has not acknowledged."""
        transport = getattr(self.cycle, "transport", None)
        try:
            held = transport.get_write_buffer_size()
        except Exception:
            held = None
        return self.sent, held, unacknowledged(transport)

    def done(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None


class FrontLink(asyncio.Protocol):
    """The front end's end of the socket pair: requests out, answers in."""

    def __init__(self, loop: asyncio.AbstractEventLoop, high_water: int) -> None:
        self.loop = loop
        self.pending: dict[int, _Pending] = {}
        self.reader = FrameReader()
        self.outbox: Outbox | None = None
        self.lost = asyncio.Event()
        self.paused = False  # the server is not reading what this front end relays (see RelayApp)
        self.high_water = high_water
        self._scan = None
        # (requests shed, connections refused for max_connections, connections open): sent with
        # each heartbeat answer, so the server's metrics count this front end's too
        self.counts: Callable[[], tuple] = lambda: (0, 0, 0)

    def connection_made(self, transport) -> None:
        transport.set_write_buffer_limits(high=self.high_water, low=self.high_water // 4)
        self.outbox = Outbox(self.loop, transport)

    def behind(self, more: int) -> bool:
        """Relaying ``more`` bytes now would leave over ``high_water`` waiting for the server (in
        this loop turn's messages or the transport's buffer)."""
        return self.paused or self.outbox.waiting() + more > self.high_water

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False

    def data_received(self, data: bytes) -> None:
        pending = self.pending
        for msg in self.reader.feed(data):
            if msg[0] == "p":  # the server's heartbeat: this loop is alive (and what it counted)
                try:
                    counts = tuple(self.counts())
                except Exception:  # the counts are for metrics: never a reason to miss a heartbeat
                    counts = ()
                self.outbox.put(("q", *counts))
                continue
            p = pending.get(msg[1])
            if p is None:
                continue
            if msg[0] == "a" or msg[0] == "x" or (msg[0] == "b" and not msg[3]):
                del pending[msg[1]]
            p.push(msg)

    def connection_lost(self, exc) -> None:
        for rid, p in list(self.pending.items()):
            p.push(("a", rid, 503, [(b"content-type", b"application/json"), (b"retry-after", b"1")], _LOST))
        self.pending.clear()
        self.lost.set()

    def send(self, rid: int, head: tuple, body: bytes, more: bool, p: _Pending) -> None:
        self.pending[rid] = p
        self.outbox.put(("r", rid, head, body, more), len(body))
        if self._scan is None:
            self._scan = self.loop.call_later(GONE_SCAN_S, self._check_gone)

    def _check_gone(self) -> None:
        """Tell the server about clients that went away while their request waited (the
        batcher then drops the request instead of running it)."""
        self._scan = None
        for rid, p in self.pending.items():
            if not p.gone_sent and p.cycle is not None and p.cycle.disconnected:
                p.gone_sent = True
                self.outbox.put(("g", rid))
        if self.pending and not self.lost.is_set():
            self._scan = self.loop.call_later(GONE_SCAN_S, self._check_gone)


class RelayApp:
    """The ASGI application of a front end: every request relayed to the server."""

    def __init__(self, link: FrontLink, max_body: int) -> None:
        self.link = link
        self.max_body = max_body
        self._ids = itertools.count(1)
        self.shed = 0  # requests answered 503 because the server was behind
        self._shed_logged = -1e9

    async def __call__(self, scope: dict, receive, send) -> None:
        if scope["type"] != "http":
            return
        body, more = await self._body(scope, receive)
        if body is None:
            return  # the client went away before its request was whole: nothing to relay
        if self.link.lost.is_set():
            await _answer(send, 503, [(b"content-type", b"application/json"), (b"retry-after", b"1")], _LOST)
            return
        cycle = getattr(receive, "__self__", None)
        if cycle is not None and getattr(cycle, "disconnected", False):
            return  # its client left while its body was read: nothing to relay, nobody to answer
        if self.link.behind(len(body)):  # the server has not read what was relayed: shed, do not buffer
            self.shed += 1
            now = time.monotonic()
            if now - self._shed_logged >= 5.0:  # one line per 5 s at most, with the count so far
                self._shed_logged = now
                log.warning("event=frontend_shed shed_total=%d waiting_bytes=%d", self.shed, self.link.outbox.waiting())
            await _answer(send, 503, [(b"content-type", b"application/json"), (b"retry-after", b"1")], _BEHIND)
            return
        rid = next(self._ids)
        p = _Pending(cycle, self.link.loop)
        self.link.send(rid, scope_head(scope), body, more, p)
        msg = await p.next()
        if msg[0] == "a":
            await _answer(send, msg[2], msg[3], msg[4])
            return
        if msg[0] == "s":
            p.watch(lambda: self._cut(rid, p, send))
            try:
                await send({"type": "http.response.start", "status": msg[2], "headers": msg[3]})
                while True:
                    msg = await p.next()
                    if msg[0] != "b":
                        break
                    await send({"type": "http.response.body", "body": msg[2], "more_body": msg[3]})
                    p.sent += 1
                    if not msg[3]:
                        return
            finally:
                p.done()
            if p.cut:  # (its connection was reset already)
                return
        await send({"type": ABORT})  # "x": the answer under way was abandoned

    def _cut(self, rid: int, p: _Pending, send) -> None:
        """The client of streamed answer ``rid`` takes nothing while too much waits for it: reset
        its connection, forget the request (what the server still sends for it is ignored), tell
        the server its client is gone, and end the relay of it."""
        log.warning("request %d (relayed): the client is not reading its streamed answer (%s): the connection is "
                    "reset, the parts waiting are dropped", rid, p.why)
        if self.link.pending.pop(rid, None) is not None and not p.gone_sent and not self.link.lost.is_set():
            p.gone_sent = True
            self.link.outbox.put(("g", rid))
        task = self.link.loop.create_task(_reset(send, rid))
        _RESETS.add(task)
        task.add_done_callback(_RESETS.discard)
        p.push(("x", rid))

    async def _body(self, scope: dict, receive) -> tuple[bytes | None, bool]:
        """The request's body, up to the limit and one byte more (``more`` True when it was cut
        there). A Content-Length over the limit is not read at all: the server refuses it from
        the header, as it does on its own connections."""
        limit = self.max_body
        for k, v in scope["headers"]:
            if k == b"content-length":
                try:
                    if int(v) > limit:
                        return b"", False
                except ValueError:
                    return b"", False  # the server's router names the bad header
                break
        parts = []
        size = 0
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return None, False
            chunk = msg.get("body", b"")
            if chunk:
                parts.append(chunk)
                size += len(chunk)
            if not msg.get("more_body"):
                return (parts[0] if len(parts) == 1 else b"".join(parts)), False
            if size > limit:
                return b"".join(parts), True


async def _reset(send, rid: int) -> None:
    try:
        await send({"type": ABORT, "hard": True})
    except Exception:  # the connection went meanwhile: nothing left to reset
        log.debug("request %d (relayed): the connection could not be reset", rid, exc_info=True)


async def _answer(send, status: int, headers: list, body: bytes) -> None:
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _drain(server: uvicorn.Server, link: FrontLink, timeout: float, linger: float) -> None:
    """Stop accepting, answer what was received, close the connections (the server's drain)."""
    for listener in getattr(server, "servers", []):
        listener.close()
    conns = lambda: list(server.server_state.connections)  # noqa: E731
    begin_drain(conns())
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not link.lost.is_set():
        # (linger: the server's DRAIN_LINGER_S)
        if not drain_pass(conns(), time.monotonic(), linger) and not link.pending:
            break
        await asyncio.sleep(0.005)
    for conn in conns():
        conn.shutdown()
    server.config.timeout_graceful_shutdown = 0.5
    await server.shutdown()


async def main(config: dict) -> int:
    loop = asyncio.get_running_loop()
    settings = Settings(**config["settings"])
    link_sock = config["link"]
    listeners = [socket.socket(fileno=fd) for fd in config["listen_fds"]]
    # what may wait unread by the server before requests are shed (503): two of the largest bodies
    high_water = max(16 << 20, 2 * settings.max_request_size + (1 << 20))
    _, link = await loop.connect_accepted_socket(lambda: FrontLink(loop, high_water), link_sock)
    app = RelayApp(link, settings.max_request_size)
    _Pending.stall_s = float(settings.stream_stall_timeout)
    set_held(settings.max_response_size)
    uv = uvicorn.Config(app, lifespan="off", http=http_protocol(settings.request_read_timeout, settings.max_header_size,
                                                                connection_limit(settings.max_connections)),
                        loop="none", log_level="warning", access_log=False, server_header=False, date_header=False,
                        timeout_keep_alive=settings.keep_alive_timeout, backlog=2048, proxy_headers=False)
    uv.load()
    tls = None
    if is_https(settings.inference_address):
        tls = Tls.from_settings(settings)
        uv.ssl = tls.context()
        loop.add_signal_handler(signal.SIGHUP, tls.reload)
    server = uvicorn.Server(uv)
    server.lifespan = uv.lifespan_class(uv)
    listener_class = uv.http_protocol_class
    link.counts = lambda: (app.shed, getattr(listener_class, "refused_connections", 0),
                           len(server.server_state.connections))
    await server.startup(sockets=listeners)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    link.outbox.put(("h", os.getpid()))  # listening: the server counts this front end as started
    waiter = loop.create_task(stop.wait())
    lost = loop.create_task(link.lost.wait())
    await asyncio.wait((waiter, lost), return_when=asyncio.FIRST_COMPLETED)
    if link.lost.is_set() and not stop.is_set():
        log.warning("front end %d: the server's end closed; exiting", config["index"])
    else:
        log.info("event=frontend_draining index=%d", config["index"])
    await _drain(server, link, 0.0 if link.lost.is_set() else settings.drain_timeout, config["drain_linger"])
    waiter.cancel()
    lost.cancel()
    return 0


def _read_config(sock: socket.socket) -> dict:
    """The settings the server wrote on the socket pair before starting this process."""
    def exactly(n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = sock.recv(n - len(buf))
            if not chunk:
                raise SystemExit("front end: the server closed the socket pair before sending the settings")
            buf += chunk
        return buf

    return json.loads(exactly(int.from_bytes(exactly(4), "big")))


def run(argv: list[str]) -> int:
    """``argv``: the front end's index, the socket pair's descriptor and the listening sockets'
    (comma-separated: one per address the inference host name has)."""
    # SIGHUP: never this process's end (its life follows the server's link); with TLS it reloads
    # the certificate, once the loop runs. Ignored from the first moment: the server may forward
    # one (a certificate reload) while this front end is still starting.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    restore_inherited()  # started from a thread pinned to the event loop's CPU: every CPU again
    index, link_fd = int(argv[0]), int(argv[1])
    listen_fds = [int(fd) for fd in argv[2].split(",")]
    link = socket.socket(fileno=link_fd)
    config = _read_config(link)
    config.update(index=index, link=link, listen_fds=listen_fds)
    where = {"filename": config["log_file"]} if config.get("log_file") else {"stream": sys.stderr}
    logging.basicConfig(level=config.get("log_level", "INFO"), **where,
                        format=f"%(asctime)s %(levelname)s %(name)s[front end {config['index']}]: %(message)s")
    return asyncio.run(main(config))


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
