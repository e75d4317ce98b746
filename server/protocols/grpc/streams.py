"""Intermediate responses from a handler thread to a streaming gRPC call.

A :class:`StreamSink` is the ``Ticket.stream`` callable: the handler thread
calls it (through ``context.send_intermediate`` or TorchServe's
``send_intermediate_predict_response``) and each item is handed to the event loop, where
the RPC iterates over them until :meth:`close`.
"""

from __future__ import annotations

import asyncio
from typing import Any

from server.core.codecs import encode_body

__all__ = ["StreamSink"]

_END = object()


class StreamSink:
    __slots__ = ("_loop", "_queue", "raw")

    def __init__(self, loop: asyncio.AbstractEventLoop, raw: bool = False):
        self._loop = loop
        self._queue: asyncio.Queue = asyncio.Queue()
        self.raw = raw  # hand items over as the handler gave them (tensors), not encoded

    def __call__(self, data: Any, headers: dict | None = None) -> None:
        """Called from the handler thread: bytes raw, str as UTF-8, anything else JSON (gRPC has
        no place for the handler's response ``headers``)."""
        if not self.raw and not isinstance(data, (bytes, bytearray)):
            data = encode_body(data)[0]
        self._loop.call_soon_threadsafe(self._queue.put_nowait, data)

    def close(self, *_: Any) -> None:
        """No more items (call on the loop, e.g. as the inference task's done callback)."""
        self._queue.put_nowait(_END)

    def __aiter__(self) -> "StreamSink":
        return self

    async def __anext__(self) -> Any:
        item = await self._queue.get()
        if item is _END:
            raise StopAsyncIteration
        return item
