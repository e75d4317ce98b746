"""Intermediate responses from a handler thread to a streaming gRPC call, and what a streaming
call holds for a client that does not read.

A :class:`StreamSink` is the ``Ticket.stream`` callable: the handler thread
calls it (through ``context.send_intermediate`` or TorchServe's
``send_intermediate_predict_response``) and each item is handed to the event loop, where
the RPC iterates over them until :meth:`close`.

**A client that does not read.** A handler never waits for a client (its thread serves a whole
batch), and gRPC takes a message only as fast as the client's flow-control window lets it, so
what a client is slow to take waits on the loop, in the call's :class:`Outbox`. When more than
:data:`MAX_BACKLOG` bytes wait there and the call hands gRPC no message for
``stream_stall_timeout`` seconds (the setting, 10 by default; checked that often, so the cut
comes within twice that), the call is cut: what waited is dropped, the call's task is cancelled
(and with it the request's inference, as when a client goes away) and the call ends with
RESOURCE_EXHAUSTED naming why (the client sees it after the messages gRPC already held for it,
if it reads again), logged. The same rule as a streamed REST answer
(``server.protocols.rest.chunked``), counted in whole messages: gRPC does not say how much of
one the client has read, so a client must take each message within ``stream_stall_timeout``
while that much waits (a 16 MiB message needs about 1.6 MB/s at the default 10 s). However the
client reads, the call is cut the same way once ``server.protocols.stall.MAX_HELD`` bytes wait.
Once a call has ended, whatever its handler still sends is dropped.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import Any

import grpc

from server.core.codecs import encode_body
from server.protocols.stall import MAX_BACKLOG, StallWatch

__all__ = ["StreamSink", "Outbox", "MAX_BACKLOG", "begin"]

log = logging.getLogger("osprey.grpc")

_END = object()
_ENDING: set[asyncio.Task] = set()  # statuses of cut calls being sent (held until they end)


async def begin(context: Any) -> None:
    """Send a streaming call's initial metadata, before anything is made for its client. Without
    it, grpc.aio sends the initial metadata with the first message and counts it sent only once
    that write completes, which waits on the client's flow-control window; a cut's status made
    meanwhile carries the initial metadata a second time, core refuses the whole batch
    (GRPC_CALL_ERROR_TOO_MANY_OPERATIONS), and a client that does not read is never told."""
    await context.send_initial_metadata(())


async def _abort(context: Any, what: str, why: str) -> None:
    try:
        await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, why)
    except grpc.aio.AbortError:  # (abort ends by raising it: the status is on its way)
        pass
    except Exception as exc:  # the call was over already (the client went away)
        log.info("%s: the cut's status was not sent (%s: %s)", what, type(exc).__name__, exc)


class Outbox:
    """The messages a streaming call has for its client, in order, on the event loop.

    Made inside the call's task (the task the cut cancels). ``put`` (on the loop) never waits:
    the producer is a handler thread or the call's own requests; ``get`` waits for the next
    one. Past :data:`MAX_BACKLOG` bytes waiting, the stall rule of the module doc applies."""

    __slots__ = ("_loop", "_items", "_ready", "_task", "_context", "what", "waiting", "taken", "cut", "_watch",
                 "closed")
    stall_s = 10.0  # the server's stream_stall_timeout (server.serve sets it); 0: never cut for taking nothing

    def __init__(self, what: str, context: Any = None):
        self._loop = asyncio.get_running_loop()
        self._items: deque[tuple[Any, int]] = deque()
        self._ready = asyncio.Event()
        self._task = asyncio.current_task()
        self._context = context  # the call's grpc.aio ServicerContext: the cut ends the call with a status
        self.what = what  # names the call in the log: "StreamPredictions for model m, request r"
        self.waiting = 0  # bytes put and not yet taken
        self.taken = 0  # messages taken (each one a message gRPC accepted before it)
        self.cut = False
        self.closed = False  # the call has ended (close): nothing is kept any more
        # (the limit as this module names it, read now: tests set a smaller one)
        self._watch = StallWatch(self._loop, self.stall_s, MAX_BACKLOG, self._backlog, lambda: self.taken, self._cut)

    def put(self, item: Any, size: int = 0) -> None:
        """Add ``item`` (``size`` bytes) for the client; dropped once the call was cut or ended."""
        if self.cut or self.closed:
            return
        self._items.append((item, size))
        self.waiting += size
        self._ready.set()
        self._watch.arm()

    def _backlog(self) -> int:
        return 0 if self._task is not None and self._task.done() else self.waiting

    async def get(self) -> Any:
        """The next item (waits for one)."""
        items = self._items
        while not items:
            self._ready.clear()
            await self._ready.wait()
        item, size = items.popleft()
        self.waiting -= size
        self.taken += 1
        return item

    def _cut(self) -> None:  # on the loop, when StallWatch's rule cuts (self._watch.why says which)
        why = f"the client is not reading its stream ({self._watch.why}): the call is ended, what waited is dropped"
        log.warning("%s: %s", self.what, why)
        self.cut = True
        self._items.clear()
        self.waiting = 0
        if self._context is not None:  # the status goes out after what gRPC already holds
            _ENDING.add(ending := self._loop.create_task(_abort(self._context, self.what, why)))
            ending.add_done_callback(_ENDING.discard)
        if self._task is not None:
            self._task.cancel()

    def close(self) -> None:
        """The call has ended: drop what waits and whatever comes later, stop the stall check."""
        self.closed = True
        self._items.clear()
        self.waiting = 0
        self._watch.cancel()


class StreamSink:
    """``Ticket.stream`` of a streaming gRPC call: items from the handler thread, iterated on the
    loop. ``raw``: hand items over as the handler gave them (tensors), not encoded, and count
    no bytes (the call counts what it makes of them in its own :class:`Outbox`)."""

    __slots__ = ("_loop", "box", "raw")

    def __init__(self, loop: asyncio.AbstractEventLoop, what: str, raw: bool = False, context: Any = None):
        self._loop = loop
        self.box = Outbox(what, context)
        self.raw = raw

    def __call__(self, data: Any, headers: dict | None = None) -> None:
        """Called from the handler thread: bytes raw, str as UTF-8, anything else JSON (gRPC has
        no place for the handler's response ``headers``)."""
        if not self.raw and not isinstance(data, (bytes, bytearray)):
            data = encode_body(data)[0]
        try:
            self._loop.call_soon_threadsafe(self.box.put, data, 0 if self.raw else len(data))
        except RuntimeError:  # the loop has closed (shutdown): nobody to send it to
            pass

    def close(self, *_: Any) -> None:
        """No more items (call on the loop, e.g. as the inference task's done callback)."""
        self.box.put(_END)

    def __aiter__(self) -> "StreamSink":
        return self

    async def __anext__(self) -> Any:
        item = await self.box.get()
        if item is _END:
            self.box.close()
            raise StopAsyncIteration
        return item
