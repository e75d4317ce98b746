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

import pickle
import struct

__all__ = ["FrameReader", "Outbox", "scope_head", "scope_from_head", "MAX_FRAME"]

_LEN = struct.Struct(">I")
MAX_FRAME = 2**31  # a frame's length must fit; a request body is bounded far below (max_request_size)


class FrameReader:
    """Bytes in, lists of messages out."""

    __slots__ = ("_buf",)

    def __init__(self) -> None:
        self._buf = bytearray()

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
            out.extend(pickle.loads(memoryview(buf)[pos + 4:pos + 4 + n]))
            pos += 4 + n
        if pos:
            del buf[:pos]
        return out


class Outbox:
    """Messages for one transport, written as one frame at the end of the loop turn."""

    __slots__ = ("_loop", "_transport", "_msgs")

    def __init__(self, loop, transport) -> None:
        self._loop = loop
        self._transport = transport
        self._msgs: list = []

    def put(self, msg: tuple) -> None:
        if not self._msgs:
            self._loop.call_soon(self._flush)
        self._msgs.append(msg)

    def _flush(self) -> None:
        msgs, self._msgs = self._msgs, []
        if self._transport.is_closing():
            return
        data = pickle.dumps(msgs, protocol=pickle.HIGHEST_PROTOCOL)
        self._transport.write(_LEN.pack(len(data)) + data)


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
