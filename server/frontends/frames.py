"""What crosses between a front-end process and the server: frames of pickled message lists.

A frame is a 4-byte big-endian length and a pickle of a list of messages (tuples). Each side
collects the messages of one event-loop turn and writes them as one frame (:class:`Outbox`), so
a burst of requests or answers costs one system call and one pickle, not one each.

Messages, front end to server: ``("r", rid, head, body, more)`` a request (``head``: the ASGI
scope's fields, see :func:`scope_head`); ``("g", rid)`` its client went away.
Server to front end: ``("a", rid, status, headers, body)`` a whole answer; ``("s", rid, status,
headers)`` then ``("b", rid, chunk, more)`` an answer sent in parts; ``("x", rid)`` an answer
abandoned (the connection closes without its end).
"""

from __future__ import annotations

import io
import logging
import pickle
import struct

__all__ = ["FrameReader", "Outbox", "scope_head", "scope_from_head"]

log = logging.getLogger("osprey.frontends")

_LEN = struct.Struct(">I")


class _PlainUnpickler(pickle.Unpickler):
    """Loads only what the messages are made of (tuples, lists, bytes, str, numbers, None): no
    class or function is ever looked up. The front ends parse what clients send, so the server
    does not trust what they hand it to be free of pickle's code paths."""

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"relay frames hold plain data only, not {module}.{name}")


def _plain_loads(data) -> list:
    return _PlainUnpickler(io.BytesIO(data)).load()


class FrameReader:
    """Bytes in, lists of messages out; ``plain``: refuse anything but plain data (the server's
    side, reading what front ends send)."""

    __slots__ = ("_buf", "_loads")

    def __init__(self, plain: bool = False) -> None:
        self._buf = bytearray()
        self._loads = _plain_loads if plain else pickle.loads

    def feed(self, data: bytes) -> list:
        buf = self._buf
        buf += data
        out: list = []
        pos = 0
        end = len(buf)
        while end - pos >= 4:
            (n,) = _LEN.unpack_from(buf, pos)
            if end - pos - 4 < n:
                break
            out.extend(self._loads(memoryview(buf)[pos + 4:pos + 4 + n]))
            pos += 4 + n
        if pos:
            del buf[:pos]
        return out


class Outbox:
    """Messages for one transport, written as one frame at the end of the loop turn."""

    __slots__ = ("_loop", "_transport", "_msgs", "size")

    def __init__(self, loop, transport) -> None:
        self._loop = loop
        self._transport = transport
        self._msgs: list = []
        self.size = 0  # payload bytes put this turn and not yet written (as ``put`` was told)

    def put(self, msg: tuple, size: int = 0) -> None:
        if not self._msgs:
            self._loop.call_soon(self._flush)
        self._msgs.append(msg)
        self.size += size

    def waiting(self) -> int:
        """Bytes not yet taken by the other side: put this turn, or in the transport's buffer."""
        return self.size + self._transport.get_write_buffer_size()

    def _flush(self) -> None:
        msgs, self._msgs = self._msgs, []
        self.size = 0
        if self._transport.is_closing():
            return
        try:
            data = pickle.dumps(msgs, protocol=pickle.HIGHEST_PROTOCOL)
            framed = _LEN.pack(len(data)) + data if len(data) < 1 << 32 else None
        except Exception:
            framed = None
        if framed is None:  # a message that cannot be pickled or framed: each alone (a bad one dropped, logged)
            framed = b"".join(self._frame_of([m]) for m in msgs)
        if framed:
            self._transport.write(framed)

    @staticmethod
    def _frame_of(msgs: list) -> bytes:
        try:
            data = pickle.dumps(msgs, protocol=pickle.HIGHEST_PROTOCOL)
            if len(data) < 1 << 32:
                return _LEN.pack(len(data)) + data
            raise ValueError(f"a relay message of {len(data)} bytes is too large to frame")
        except Exception:
            log.exception("a relay message could not be sent and is dropped: %.200r", msgs[0][:2])
            return b""


def scope_head(scope: dict) -> tuple:
    """The parts of an ASGI http scope the server's router reads, as one picklable tuple."""
    return (scope["method"], scope["path"], scope.get("raw_path"), scope.get("query_string", b""),
            scope["headers"], scope.get("client"), scope.get("server"), scope.get("scheme", "http"),
            scope.get("http_version", "1.1"))


def scope_from_head(head: tuple) -> dict:
    method, path, raw_path, query, headers, client, server, scheme, version = head
    return {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": version,
            "server": server, "client": client, "scheme": scheme, "method": method, "root_path": "",
            "path": path, "raw_path": raw_path, "query_string": query, "headers": headers}
