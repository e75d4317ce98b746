"""How many bytes an answer holds, against ``max_response_size`` (the setting, TorchServe's key).

TorchServe's frontend refuses any message from its worker over the limit, a streamed part as
much as a final answer: it answers 500 "Worker died." and restarts the worker. The data plane
(:mod:`server.core.dataplane`) answers 500 naming the size and the limit instead, and the
instance goes on serving. It counts:

- a final answer: its body plus its output tensors' bytes (:func:`over`);
- each streamed part as the handler sends it (:class:`BoundedStream`, the request's
  ``Ticket.stream`` while the limit is set). A part over the limit is not sent, nor any part
  after it; the request then fails as a request that fails after parts went out does (a REST
  answer ends without its last chunk; a gRPC stream ends with INTERNAL).
"""

from __future__ import annotations

from typing import Any

from server.core.codecs import encode_body
from server.core.types import InferenceResponse

__all__ = ["over", "tensor_bytes", "part_size", "BoundedStream"]


def over(response: InferenceResponse, limit: int) -> int:
    """The answer's size in bytes if it is over ``limit``, else 0: its body, plus its output
    tensors' bytes (an upper bound first, which costs nothing for arrays of numbers; counted
    exactly only when the bound is over)."""
    size = len(response.body)
    if size <= limit and response.tensors:
        values = list(response.tensors.values())
        if size + tensor_bytes(values, exact=False) <= limit:
            return 0
        size += tensor_bytes(values, exact=True)
    return size if size > limit else 0


def tensor_bytes(values: Any, exact: bool) -> int:
    """Bytes of output tensors as an answer carries them: an array's ``nbytes`` (torch tensors
    too); a text as UTF-8; BYTES elements (object arrays, lists) one by one. Fixed-width string
    arrays count their ``nbytes`` unless ``exact`` (an upper bound: padded, 4 bytes a character)."""
    total = 0
    for v in values:
        if isinstance(v, (bytes, bytearray)):
            total += len(v)
        elif isinstance(v, memoryview):
            total += v.nbytes
        elif isinstance(v, str):
            total += len(v.encode("utf-8", "surrogatepass"))
        elif isinstance(v, (list, tuple)):
            total += tensor_bytes(v, exact)
        else:
            kind = getattr(getattr(v, "dtype", None), "kind", None)  # numpy's; torch dtypes have none
            if kind == "O" or (exact and kind in ("U", "S")):
                total += tensor_bytes(v.ravel().tolist(), exact)
            elif hasattr(v, "nbytes"):
                total += int(v.nbytes)
            else:
                total += 8  # a number
    return total


def part_size(data: Any) -> int:
    """Bytes of one streamed part as it is sent: bytes as they are, a text as UTF-8, an Open
    Inference part (``{"tensors": {name: array}}``) by its tensors' bytes, anything else as its
    JSON (what the adapters send it as)."""
    if isinstance(data, (bytes, bytearray)):
        return len(data)
    if isinstance(data, memoryview):
        return data.nbytes
    if isinstance(data, str):
        return len(data) if data.isascii() else len(data.encode("utf-8", "surrogatepass"))
    if isinstance(data, dict) and isinstance(data.get("tensors"), dict):
        return tensor_bytes(list(data["tensors"].values()), exact=True)
    return len(encode_body(data)[0])


class BoundedStream:
    """A request's ``Ticket.stream`` under ``max_response_size``: passes each part to ``inner``
    while it is within ``limit`` bytes. Called from the instance's thread (or a process
    instance's reader thread); ``refused`` is the size of the first part over the limit, read
    on the loop once the request has ended (the parts reach the loop before its answer)."""

    __slots__ = ("inner", "limit", "refused")

    def __init__(self, inner: Any, limit: int):
        self.inner = inner
        self.limit = limit
        self.refused = 0

    def __call__(self, data: Any, headers: dict | None = None) -> None:
        if self.refused:
            return  # a part after the one refused: the answer is already incomplete
        size = part_size(data)
        if size > self.limit:
            self.refused = size
            return
        if headers is None:
            self.inner(data)
        else:
            self.inner(data, headers)
