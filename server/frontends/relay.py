"""The server's side of a front-end process: its relayed requests, run through the router.

One :class:`RelayLink` per front end, on the server's event loop. Each relayed request becomes
an ASGI call of the inference port's :class:`~server.protocols.rest.asgi.Router`, exactly as a
request on one of the server's own connections does (auth, admission, the adapters, the data
plane); only its ``receive`` and ``send`` are the link's (:class:`_Relayed`), and its answer goes
back as a message. A relayed request whose client went away is marked ``disconnected``, which
the batcher reads as it does for its own connections (the request is dropped, not run).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Callable

from server.frontends.frames import FrameReader, Outbox, scope_from_head
from server.protocols.rest.http_protocol import ABORT

__all__ = ["RelayLink"]

log = logging.getLogger("osprey.frontends")


class _Relayed:
    """One relayed request: the ASGI ``receive``/``send`` the router is called with. The router
    finds this object as ``receive.__self__`` and reads ``disconnected`` (Request.connection)."""

    __slots__ = ("link", "rid", "body", "more", "disconnected", "started", "status", "headers", "_gone", "task")

    def __init__(self, link: "RelayLink", rid: int, body: bytes, more: bool):
        self.link = link
        self.rid = rid
        self.body: bytes | None = body
        self.more = more  # the front end stopped reading at the body limit: more was coming
        self.disconnected = False
        self.started = False  # a part of the answer went out ("s" sent)
        self.status = 200
        self.headers: list = []
        self._gone: asyncio.Future | None = None
        self.task: asyncio.Task | None = None  # held here: the loop keeps only weak references

    async def receive(self) -> dict:
        body = self.body
        if body is not None and not self.disconnected:
            self.body = None
            return {"type": "http.request", "body": body, "more_body": self.more}
        if self.more and not self.disconnected:  # cut at the limit: the reader counts one more (empty)
            self.more = False  # part and refuses, 413; asked again, the body has no more to give
            return {"type": "http.request", "body": b"", "more_body": True}
        if not self.disconnected:  # nothing more will come (ASGI: wait until the client goes)
            self._gone = self.link.loop.create_future()
            await self._gone
        return {"type": "http.disconnect"}

    async def send(self, message: dict) -> None:
        kind = message["type"]
        if kind == "http.response.start":
            self.status = message["status"]
            self.headers = message.get("headers", [])
            return
        link = self.link
        if kind == "http.response.body":
            more = message.get("more_body", False)
            if not self.started and not more:
                link.answered(self.rid, ("a", self.rid, self.status, self.headers, message.get("body", b"")))
                return
            if not self.started:
                self.started = True
                link.put(("s", self.rid, self.status, self.headers))
            if not self.disconnected:
                link.put(("b", self.rid, message.get("body", b""), more))
            elif not more:  # a client gone (or cut by its front end) reads no parts: only the end, for the
                link.put(("b", self.rid, b"", False))  # front end's bookkeeping
            if not more:
                link.answered(self.rid, None)
        elif kind == ABORT:
            link.answered(self.rid, ("x", self.rid))

    def gone(self) -> None:
        self.disconnected = True
        if self._gone is not None and not self._gone.done():
            self._gone.set_result(None)


class RelayLink(asyncio.Protocol):
    """The server's end of one front end's socket pair."""

    def __init__(self, app: Callable, loop: asyncio.AbstractEventLoop):
        self.app = app
        self.loop = loop
        self.open: dict[int, _Relayed] = {}  # requests relayed and not yet answered
        self.reader = FrameReader(plain=True)  # what a front end sends is plain data, nothing else is loaded
        self.last_heard = loop.time()  # when the front end last sent anything (the supervisor's heartbeat)
        self.asked_at: float | None = None  # when the heartbeat last asked it for a sign of life
        self.transport = None
        self.outbox: Outbox | None = None
        self.closed = loop.create_future()
        self.ready = loop.create_future()  # its pid, once the front end listens
        self.pid: int | None = None
        self.counts: tuple = (0, 0, 0)  # the front end's (shed, refused, open connections), last heartbeat

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.outbox = Outbox(self.loop, transport)

    def data_received(self, data: bytes) -> None:
        self.last_heard = self.loop.time()
        try:
            msgs = self.reader.feed(data)
        except Exception:  # not what a front end sends: drop the link (the front end is restarted)
            log.exception("a front end sent what is not a relay frame; its link is closed")
            self.transport.close()
            return
        for msg in msgs:
            if msg[0] == "r":
                _, rid, head, body, more = msg
                cycle = self.open[rid] = _Relayed(self, rid, body, more)
                cycle.task = self.loop.create_task(self._run(cycle, scope_from_head(head)))
            elif msg[0] == "g":
                cycle = self.open.get(msg[1])
                if cycle is not None:
                    cycle.gone()
            elif msg[0] == "q":  # a heartbeat's answer: what the front end counted so far
                if len(msg) == 4 and all(type(v) is int for v in msg[1:]):
                    self.counts = msg[1:]
            elif msg[0] == "h":  # the front end listens
                self.pid = msg[1]
                if not self.ready.done():
                    self.ready.set_result(msg[1])

    async def _run(self, cycle: _Relayed, scope: dict) -> None:
        try:
            await self.app(scope, cycle.receive, cycle.send)
        except Exception:  # the router answers its own errors; this is a bug, not a request's fault
            log.exception("relayed request %s %s failed", scope["method"], scope["path"])
        finally:
            cycle.task = None  # no reference cycle (task -> coroutine -> cycle -> task) left for the collector
        if cycle.rid in self.open:  # the router returned without a whole answer
            self.answered(cycle.rid, ("x", cycle.rid) if cycle.started else
                          ("a", cycle.rid, 500, [(b"content-type", b"application/json")],
                           b'{"code": 500, "type": "InternalServerException", "message": "Internal server error"}'))

    def put(self, msg: tuple) -> None:
        self.outbox.put(msg)

    def answered(self, rid: int, last: tuple | None) -> None:
        if self.open.pop(rid, None) is not None and last is not None:
            self.outbox.put(last)

    def connection_lost(self, exc) -> None:
        # the front end is gone: its clients with it; what runs for them is dropped where it can be
        for cycle in self.open.values():
            cycle.gone()
        self.open.clear()
        if not self.closed.done():
            self.closed.set_result(None)
        if not self.ready.done():
            self.ready.set_exception(ConnectionError("the front end exited before it listened"))
            self.ready.exception()  # retrieved: nobody may be waiting any more
