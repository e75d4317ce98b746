"""uvicorn's httptools HTTP/1.1 protocol, with each response leaving in one write.

uvicorn writes a response's status line and headers when the application sends
``http.response.start`` and the body when it sends ``http.response.body``: two ``send``
system calls per response on the event loop thread, which bounds throughput for small
models (the profile in benchmarks/RESULTS.md: the two writes were about a quarter of the
loop thread's samples). Here the status line and headers wait in a buffer until the first
body message and go out with it in one write. Streaming responses still leave chunk by
chunk: only the header block is held, and only until the first body message.

Everything else (parsing, keep-alive, pipelining, ``Expect: 100-continue``, flow control,
the 500 for an application error) is uvicorn's own code, untouched.
"""

from __future__ import annotations

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

__all__ = ["OneWriteHttpToolsProtocol"]


class _HeldTransport:
    """A transport wrapper that holds writes while ``held`` and sends them joined on flush."""

    __slots__ = ("transport", "held", "parts")

    def __init__(self, transport) -> None:
        self.transport = transport
        self.held = False
        self.parts: list[bytes] = []

    def write(self, data: bytes) -> None:
        if self.held:
            self.parts.append(data)
        else:
            self.transport.write(data)

    def flush(self) -> None:
        self.held = False
        parts = self.parts
        if parts:
            self.parts = []
            self.transport.write(parts[0] if len(parts) == 1 else b"".join(parts))

    def close(self) -> None:
        self.flush()
        self.transport.close()

    def __getattr__(self, name: str):
        return getattr(self.transport, name)


class _OneWriteSend:
    """The cycle's ``send``: hold the header block, release it with the first body message."""

    __slots__ = ("send", "transport")

    def __init__(self, send, transport: _HeldTransport) -> None:
        self.send = send
        self.transport = transport

    async def __call__(self, message) -> None:
        if message["type"] == "http.response.start":
            self.transport.held = True
            try:
                await self.send(message)
            except BaseException:
                self.transport.flush()
                raise
            return
        try:
            await self.send(message)
        finally:
            self.transport.flush()


class OneWriteHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's HttpToolsProtocol whose request cycles send each response in one write."""

    def _start_asgi_task(self, cycle, app) -> None:
        held = _HeldTransport(cycle.transport)
        cycle.transport = held
        cycle.send = _OneWriteSend(cycle.send, held)
        super()._start_asgi_task(cycle, app)
