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

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

__all__ = ["OneWriteHttpToolsProtocol", "http_protocol"]

JOIN_LIMIT = 64 * 1024  # header block + body up to this size are joined into one buffer


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
        if not parts:
            return
        self.parts = []
        if len(parts) == 1:
            self.transport.write(parts[0])
        elif sum(map(len, parts)) <= JOIN_LIMIT:
            self.transport.write(b"".join(parts))
        else:  # a large body: writelines (with uvloop one vectored write, no copy; plain asyncio joins)
            self.transport.writelines(parts)

    def close(self) -> None:
        self.flush()
        self.transport.close()

    def __getattr__(self, name: str):
        return getattr(self.transport, name)


class _OneWriteCycle(RequestResponseCycle):
    """uvicorn's request cycle; its ``send`` holds the header block until the first body message.

    Request cycles become this class in :meth:`OneWriteHttpToolsProtocol._start_asgi_task`
    (a class switch, not a wrapper object: a wrapper holding the cycle's bound ``send`` would
    make every request a reference cycle for the garbage collector).
    """

    async def send(self, message) -> None:
        transport = self.transport
        if message["type"] == "http.response.start":
            transport.held = True
            try:
                await super().send(message)
            except BaseException:
                transport.flush()
                raise
            return
        try:
            await super().send(message)
        finally:
            transport.flush()


class OneWriteHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's HttpToolsProtocol whose request cycles send each response in one write."""

    def _start_asgi_task(self, cycle, app) -> None:
        cycle.transport = _HeldTransport(cycle.transport)
        cycle.__class__ = _OneWriteCycle
        super()._start_asgi_task(cycle, app)


def http_protocol():
    """The protocol for uvicorn's ``http=``: this one where the installed uvicorn has the hook
    it relies on (``HttpToolsProtocol._start_asgi_task``, a cycle class without slots), else
    uvicorn's own httptools protocol (two writes per response, otherwise the same)."""
    if callable(getattr(HttpToolsProtocol, "_start_asgi_task", None)) and "__slots__" not in vars(RequestResponseCycle):
        return OneWriteHttpToolsProtocol
    return "httptools"
