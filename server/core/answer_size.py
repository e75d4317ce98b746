"""How many bytes an answer holds, against ``max_response_size`` (the setting, TorchServe's key).

TorchServe's frontend refuses any message from its worker over the limit, a streamed part as
much as a final answer: it answers 500 "Worker died." and restarts the worker. The data plane
(:mod:`server.core.dataplane`) answers 500 naming the size and the limit instead, and the
instance goes on serving. It counts:

- a final answer: its body plus its output tensors' bytes (:func:`over`);
- each streamed part as it is sent (:class:`BoundedStream`, the request's ``Ticket.stream``
  while the limit is set). A part over the limit is not sent, nor any part after it, and the
  request fails at once, as a request that fails after parts went out does (a REST answer ends
  without its last chunk; StreamPredictions ends with INTERNAL; ModelStreamInfer answers the
  error in band), while its handler runs on to its end (what it sends is dropped), as after a
  responseTimeout.
"""

from __future__ import annotations

from typing import Any, Callable

from server.core.codecs import encode_body
from server.core.types import InferenceResponse

__all__ = ["over", "tensor_bytes", "raw_part_size", "BoundedStream"]


def _text_size(data: str) -> int:
    return len(data) if data.isascii() else len(data.encode("utf-8", "surrogatepass"))


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
            total += _text_size(v)
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


def raw_part_size(data: Any) -> int:
    """Bytes of a part a raw stream (Open Inference's ModelStreamInfer) sends: an
    ``{"tensors": {name: array}}`` part by its tensors' bytes, bytes as they are, anything else
    as its text."""
    if isinstance(data, dict) and isinstance(data.get("tensors"), dict):
        return tensor_bytes(list(data["tensors"].values()), exact=True)
    if isinstance(data, (bytes, bytearray)):
        return len(data)
    return _text_size(str(data))


class BoundedStream:
    """A request's ``Ticket.stream`` under ``max_response_size``: passes each part to ``inner``
    while it is within ``limit`` bytes. Called from the instance's thread (or a process
    instance's reader thread). The first part over the limit sets ``refused`` (its size) and
    calls ``on_refused(self)`` there (the data plane's: it fails the request on the loop);
    ``model`` and ``ticket`` are the request's, for it.

    A part is measured as ``inner`` sends it (``Ticket.stream``): a raw stream's parts as they
    are (:func:`raw_part_size`); any other stream's as bytes, a text as UTF-8 and anything else
    encoded here once as JSON and handed on as those bytes (what the stream would send)."""

    __slots__ = ("inner", "limit", "refused", "model", "ticket", "_raw", "_on_refused")

    def __init__(self, inner: Any, limit: int, on_refused: Callable[["BoundedStream"], None] | None = None,
                 model: Any = None, ticket: Any = None):
        self.inner = inner
        self.limit = limit
        self.refused = 0
        self.model, self.ticket = model, ticket
        self._raw = bool(getattr(inner, "raw", False))
        self._on_refused = on_refused

    def __call__(self, data: Any, headers: dict | None = None) -> None:
        if self.refused:
            return  # a part after the one refused: the answer is already incomplete
        if self._raw:
            size = raw_part_size(data)
        elif isinstance(data, (bytes, bytearray)):
            size = len(data)
        elif isinstance(data, str):
            size = _text_size(data)
        else:
            data = encode_body(data)[0]
            size = len(data)
        if size > self.limit:
            self.refused = size
            if self._on_refused is not None:
                self._on_refused(self)
            return
        if headers is None:
            self.inner(data)
        else:
            self.inner(data, headers)
