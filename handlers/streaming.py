"""``context.cl_socket`` for TorchServe handlers that stream intermediate responses.

TorchServe's ``send_intermediate_predict_response(ret, req_id_map, message, code, context)``
writes a predict response in its worker wire format to ``context.cl_socket``. Here that
"socket" decodes the frame and hands each request's body to its stream writer
(``context.send_intermediate``), so such handlers stream over gRPC StreamPredictions and as
a chunked answer over REST (server/protocols/rest/chunked.py).

Frame (big-endian int32 lengths): code, message, then per request: request id, content
type, HTTP status, reason phrase, header count and (key, value) pairs, body; -1 ends it.
"""

from __future__ import annotations

import struct
from typing import Any

__all__ = ["IntermediateSocket", "decode_predict_response"]

_INT = struct.Struct("!i")


def decode_predict_response(frame: bytes | bytearray) -> tuple[int, str, list[dict[str, Any]]]:
    """(code, message, [{request_id, content_type, status, phrase, headers, body}])."""
    mv = memoryview(frame)
    pos = 0

    def integer() -> int:
        nonlocal pos
        (value,) = _INT.unpack_from(mv, pos)
        pos += 4
        return value

    def chunk() -> bytes:
        nonlocal pos
        n = integer()
        out = bytes(mv[pos:pos + n])
        pos += n
        return out

    code = integer()
    message = chunk().decode("utf-8")
    items = []
    while True:
        n = integer()
        if n == -1:
            break
        request_id = bytes(mv[pos:pos + n]).decode("utf-8")
        pos += n
        content_type = chunk().decode("utf-8")
        status = integer()
        phrase = chunk().decode("utf-8")
        headers = {}
        for _ in range(integer()):
            key = chunk().decode("utf-8")
            headers[key] = chunk().decode("utf-8")
        items.append({"request_id": request_id, "content_type": content_type, "status": status,
                      "phrase": phrase, "headers": headers, "body": chunk()})
    return code, message, items


class IntermediateSocket:
    """Stands in for TorchServe's worker socket; only ``sendall`` is used by handlers."""

    def __init__(self, context: Any):
        self._context = context

    def sendall(self, data: bytes | bytearray) -> None:
        ctx = self._context
        _, _, items = decode_predict_response(data)
        index = {rid: idx for idx, rid in (ctx.request_ids or {}).items()}
        for item in items:
            idx = index.get(item["request_id"])
            if idx is None:
                continue
            if idx in ctx.stream_writers:  # a call that can't stream (gRPC Predictions) gets the final answer only
                ctx.send_intermediate(idx, item["body"])
            # TorchServe marks streamed answers with this header; the final answer carries none.
            ctx.get_response_headers(idx).pop("ts_stream_next", None)

    def __eq__(self, other: object) -> bool:  # Context.__eq__ compares attributes
        return isinstance(other, IntermediateSocket)

    __hash__ = object.__hash__
