"""Streaming a handler's intermediate responses over HTTP: a chunked answer.

A handler that sends intermediate responses (TorchServe's ``send_intermediate_predict_response``,
or ``context.send_intermediate``) on a REST predictions call gets them to the client as they
come, as TorchServe 0.12 does: the answer goes out with ``Transfer-Encoding: chunked``, one chunk
per intermediate response, then the final answer as the last chunk.

:class:`ChunkedAnswer` is the request's ``Ticket.stream``. Nothing happens unless the handler
streams: the route awaits the data plane as for any request, and an answer without
intermediate parts is an ordinary one (with a Content-Length). The first part starts the answer
(status 200, the request id, and the response headers the handler had set for the request when
it sent its first part, content type included, as TorchServe 0.12 does; none when it set none) and a
writer task on the event loop sends each part as it arrives; when the data plane answers, the
route hands the final body to :meth:`ChunkedAnswer.finish`, which sends it after the parts and
ends the answer. The parts reach the loop before the final answer does (both are posted from
the instance's thread, or the reader thread of a process instance, in order), so the final
chunk is always the last.

A request that fails after parts went out cannot change its status any more: the connection is
closed without the answer's end (:data:`~server.protocols.rest.http_protocol.ABORT`), so the
client sees an incomplete answer, as TorchServe 0.12 does (it resets the connection). A client
that goes away ends the writer.

**A client that does not read.** The handler never waits for a client (its thread serves a
whole batch), so parts a client is slow to take wait on the loop. When more than
:data:`MAX_BACKLOG` bytes wait for one answer and the client takes nothing for
``stream_stall_timeout`` seconds (the setting, 10 by default; checked that often, so the cut
comes within twice that), it is cut: the parts waiting are dropped and the connection is reset
at once, without the answer's end (logged). "Takes nothing": no part finished sending, and
neither the transport's buffer nor the socket's send queue (``SIOCOUTQ``, what the client has
not acknowledged) changed. A stalled reader cannot hold the server's memory
for longer; the request itself runs to its end. However the client reads, it is cut the same
way once :data:`~server.protocols.stall.MAX_HELD` bytes wait for it. (Through a front-end
process, ``frontends`` above 1, the parts wait in the front end instead, which applies the same
rule: :mod:`server.frontends.child`.)
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import Any

import orjson

from server.core.codecs import encode_body
from server.core.errors import OspreyError
from server.protocols.rest.asgi import Request, Sent
from server.protocols.rest.http_protocol import ABORT
from server.protocols.stall import MAX_BACKLOG, StallWatch, unacknowledged

__all__ = ["ChunkedAnswer"]

log = logging.getLogger("osprey.rest")

_RESETS: set[asyncio.Task] = set()  # connection resets under way (held until they end)

# headers the server sets for a chunked answer itself; a handler's are not sent
_FRAMING = frozenset({"content-length", "transfer-encoding", "connection", "x-request-id", "ts_stream_next"})


class ChunkedAnswer:
    """``Ticket.stream`` of a REST call: intermediate parts become the chunks of its answer."""

    __slots__ = ("_req", "_loop", "_parts", "_end", "_wake", "_writer", "_headers", "_waiting", "_cut", "_sent",
                 "_watch")
    stall_s = 10.0  # the server's stream_stall_timeout (server.serve sets it); 0: never cut for taking nothing

    def __init__(self, req: Request, loop: asyncio.AbstractEventLoop):
        self._req = req
        self._loop = loop
        self._parts: deque[bytes] | None = None  # made by the first part: most calls never stream
        self._end: tuple[bool, bytes] | None = None  # (abort?, last chunk) once the request has ended
        self._wake: asyncio.Event | None = None
        self._writer: asyncio.Task | None = None
        self._headers: list[tuple[bytes, bytes]] = []  # the handler's, as set when the first part came
        # made by the first part too, with: _waiting (bytes of parts not yet handed to the
        # connection), _sent (parts handed to it), _cut (the client did not read: its
        # connection was reset), _watch (the stall check: server.protocols.stall)

    @property
    def started(self) -> bool:
        """An intermediate part arrived: the answer is (being) sent in chunks."""
        return self._writer is not None

    def __call__(self, data: Any, headers: dict | None = None) -> None:
        """One intermediate response, from the handler's thread: bytes raw, str as UTF-8, anything
        else as JSON (the final answer's encoding); ``headers``: the response headers the handler
        had set for the request by then (the first part's start the answer)."""
        if not isinstance(data, (bytes, bytearray)):
            data = encode_body(data)[0]
        if not data:  # HTTP has no empty chunk (a zero-length chunk ends the answer): nothing to send
            return
        try:
            self._loop.call_soon_threadsafe(self._part, bytes(data), headers)
        except RuntimeError:  # the loop has closed (shutdown): nobody to send it to
            pass

    def _part(self, data: bytes, headers: dict | None) -> None:  # on the loop
        if self._end is not None:  # a late part (the request has ended): dropped
            return
        if self._writer is None:
            self._headers = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items()
                             if k.lower() not in _FRAMING]
            self._parts = deque()
            self._wake = asyncio.Event()
            self._waiting = self._sent = 0
            self._cut = False
            self._watch = StallWatch(self._loop, self.stall_s, MAX_BACKLOG, self._backlog, self._progress,
                                     self._cut_client)
            self._writer = self._loop.create_task(self._write())
        self._parts.append(data)
        self._waiting += len(data)
        self._watch.arm()
        self._wake.set()

    def _backlog(self) -> int:
        """Bytes waiting for the client while the answer is being written (0 once cut or ended)."""
        return 0 if self._cut or self._writer.done() else self._waiting

    def _progress(self) -> tuple:
        """What changes while the client takes the answer: the parts handed to the connection,
        the bytes its transport still holds, and the bytes its socket has sent that the client
        has not acknowledged yet (these move with every read, however slow)."""
        transport = getattr(self._req.connection(), "transport", None)
        try:
            held = transport.get_write_buffer_size()
        except Exception:  # no transport to ask (a relayed request): the parts alone
            held = None
        return self._sent, held, unacknowledged(transport)

    def _cut_client(self) -> None:  # on the loop
        log.warning("request %s: the client is not reading its streamed answer (%s): the connection is reset, "
                    "the parts waiting are dropped", self._req.request_id, self._watch.why)
        self._cut = True
        self._end = (True, b"")
        self._parts.clear()
        self._waiting = 0
        _RESETS.add(task := self._loop.create_task(self._reset()))
        task.add_done_callback(_RESETS.discard)

    async def _reset(self) -> None:
        try:
            await self._req.send({"type": ABORT, "hard": True})
        except Exception:  # an ASGI server without Osprey's extension: the answer just stops
            log.debug("request %s: the connection could not be reset", self._req.request_id, exc_info=True)

    async def _write(self) -> None:
        req, parts, wake = self._req, self._parts, self._wake
        send = req.send
        await send({"type": "http.response.start", "status": 200,
                    "headers": [*self._headers, (b"x-request-id", req.request_id.encode("latin-1")),
                                *(req.cors or ())]})
        while True:
            while parts:
                part = parts.popleft()
                self._waiting -= len(part)
                await send({"type": "http.response.body", "body": part, "more_body": True})
                self._sent += 1
            if self._end is not None:
                abort, last = self._end
                if self._cut:  # (reset already)
                    return
                if abort:
                    try:
                        await send({"type": ABORT})
                        return
                    except RuntimeError:  # an ASGI server without Osprey's extension: end with the error
                        pass
                await send({"type": "http.response.body", "body": last, "more_body": False})
                return
            wake.clear()
            await wake.wait()

    async def finish(self, final: bytes) -> Sent:
        """Send ``final`` as the last chunk (after every part) and end the answer; the route
        returns what this returns."""
        return await self._close(False, bytes(final), 200)

    async def fail(self, err: OspreyError) -> Sent:
        """The request failed after parts went out: its status cannot change any more. Send the
        parts still waiting, then close the connection without ending the answer (the client
        sees it incomplete), as TorchServe does."""
        if not self._cut:  # (a client cut was said already)
            log.warning("request %s failed after its answer began streaming (%d %s): closing the connection",
                        self._req.request_id, err.status, err.message)
        body = orjson.dumps({"code": err.status, "type": err.type_name, "message": err.message})
        return await self._close(True, body, err.status)

    async def _close(self, abort: bool, last: bytes, status: int) -> Sent:
        if not self._cut:
            self._end = (abort, last)
        self._wake.set()
        await self._writer
        self._watch.cancel()
        return Sent(b"", 499 if self._cut else status, "")  # (cut: counted as a client that went away)

    def abandon(self) -> None:
        """The request ends without an answer (its task was cancelled, its client went away):
        stop the writer."""
        self._end = (True, b"")
        if self._writer is not None:  # (it streamed)
            self._watch.cancel()
            self._parts.clear()
            if not self._writer.done():
                self._writer.cancel()
