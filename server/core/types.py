"""The one internal request and response that every front end speaks.

REST and gRPC adapters build an :class:`InferenceRequest`, hand it to the data plane and
turn the :class:`InferenceResponse` back into their wire format. Nothing here knows HTTP,
protobuf or torch.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Field", "InferenceRequest", "InferenceResponse", "Timings", "next_request_id"]

_ID_PREFIX = os.urandom(10).hex()
_ID_COUNTER = itertools.count(1)


def next_request_id() -> str:
    """A UUID-shaped id, unique per process run: random prefix, then a counter (no syscall)."""
    p, n = _ID_PREFIX, next(_ID_COUNTER)
    return f"{p[:8]}-{p[8:12]}-{p[12:16]}-{p[16:20]}-{n:012x}"


@dataclass(slots=True)
class Field:
    """One named input as it came over the wire: bytes plus the content type they carry."""

    value: bytes | bytearray | memoryview
    content_type: str = ""


@dataclass(slots=True)
class Timings:
    """Monotonic timestamps of a request's stages (seconds)."""

    received: float = 0.0
    dispatched: float = 0.0  # left the queue for an instance
    started: float = 0.0  # handler began on its batch
    finished: float = 0.0  # handler returned
    stages: dict | None = None  # handler-reported stage seconds for the batch (preprocess, inference, ...)

    @property
    def queue(self) -> float:
        return max(self.dispatched - self.received, 0.0) if self.dispatched else 0.0

    @property
    def inference(self) -> float:
        return max(self.finished - self.started, 0.0) if self.finished else 0.0


@dataclass(slots=True)
class InferenceRequest:
    """A request for one model, independent of the protocol it arrived on.

    ``fields`` are the TorchServe-style inputs (``body`` for a raw body, one entry per form
    field or gRPC input). ``tensors`` holds Open Inference Protocol inputs (name -> array)
    for handlers that take tensors. ``deadline`` is a ``time.monotonic()`` instant after
    which the request must not start.
    """

    model: str
    version: str | None
    request_id: str
    protocol: str = "rest"
    fields: dict[str, Field] = field(default_factory=dict)
    tensors: dict[str, Any] | None = None
    tensor_meta: dict[str, Any] | None = None
    outputs: list[str] | None = None
    headers: dict[str, str] = field(default_factory=dict)
    deadline: float | None = None
    timings: Timings = field(default_factory=Timings)
    future: asyncio.Future | None = None
    stream: Any = None  # a callable(bytes) receiving intermediate responses, or None
    client: Any = None  # the connection, where it tells: ``client.disconnected`` is True once it is gone
    queued: int = 0  # the batcher's mark: 0 not in its queue, 1 waiting there, 2 there but already answered

    def expired(self, now: float | None = None) -> bool:
        if self.deadline is None:
            return False
        return (time.monotonic() if now is None else now) >= self.deadline


@dataclass(slots=True)
class InferenceResponse:
    """What one request's handler produced, already encoded for the wire.

    ``body`` is the bytes TorchServe would send (bytes raw, str as UTF-8, anything else
    JSON); ``tensors`` carries protocol outputs (name -> array) when the handler gave them.
    """

    body: bytes = b""
    status: int = 200
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)
    tensors: dict[str, Any] | None = None
    model_version: str = ""
    raw: Any = None
