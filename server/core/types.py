"""The one internal request and response that every front end speaks.

REST and gRPC adapters build a :class:`Ticket` (the :class:`InferenceRequest` they decoded,
plus its place on the event loop) with :func:`new_request`, hand it to the data plane and
turn the :class:`InferenceResponse` back into their wire format. Nothing here knows HTTP,
protobuf or torch.
"""

from __future__ import annotations

import asyncio
import enum
import itertools
import os
import re
import time
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Field", "InferenceRequest", "InferenceResponse", "Protocol", "Ticket", "Timings", "new_request",
           "next_request_id"]

_ID_PREFIX = os.urandom(10).hex()
_ID_HEAD = f"{_ID_PREFIX[:8]}-{_ID_PREFIX[8:12]}-{_ID_PREFIX[12:16]}-{_ID_PREFIX[16:20]}-"
_ID_COUNTER = itertools.count(1)


def next_request_id() -> str:
    """A UUID-shaped id, unique per process run: random prefix, then a counter (no syscall)."""
    return f"{_ID_HEAD}{next(_ID_COUNTER):012x}"


MAX_CLIENT_ID = 1024  # characters of a request id a client gives (the OIP "id")
_CLIENT_ID = re.compile(r"[\x21-\x7e](?:[\x20-\x7e]*[\x21-\x7e])?")


def client_id_problem(rid: str) -> str | None:
    """Why a client's own request id (the OIP ``id``) cannot be used, or None. It is sent back as
    a header (REST ``x-request-id``, gRPC trailing metadata) and feedback joins on it, so it must
    be printable ASCII without spaces at either end (which headers drop), and not too long."""
    if len(rid) > MAX_CLIENT_ID:
        return f"'id' is {len(rid)} characters long; at most {MAX_CLIENT_ID} are allowed"
    if not _CLIENT_ID.fullmatch(rid):
        bad = next((c for c in rid if not " " <= c <= "~"), None)
        why = f"it holds {bad!r}" if bad is not None else "it starts or ends with a space"
        return (f"'id' {rid[:80]!r} cannot be sent back as a header ({why}); use printable ASCII "
                f"without spaces at either end")
    return None


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


class Protocol(str, enum.Enum):
    """The front end a request arrived on (a label in metrics and the access log)."""

    REST = "rest"  # TorchServe's inference API and KServe v1
    REST_V2 = "v2"  # Open Inference Protocol over REST
    GRPC = "grpc"  # TorchServe's gRPC inference API
    GRPC_V2 = "grpc-v2"  # Open Inference Protocol over gRPC
    # TorchServe's describe with customized=true: the handler's describe_handle, in a batch of
    # its own (the data plane's describe_handle; never a prediction: not monitored or counted)
    DESCRIBE = "describe"

    def __str__(self) -> str:
        return self.value


@dataclass(slots=True)
class InferenceRequest:
    """The work: what a model needs to answer one request, as plain data.

    ``fields`` are the TorchServe-style inputs (``body`` for a raw body, one entry per form
    field or gRPC input). ``tensors`` holds Open Inference Protocol inputs (name -> array)
    for handlers that take tensors. ``deadline`` is a ``time.monotonic()`` instant after
    which the request must not start. Nothing here belongs to the event loop, so a request
    can be pickled to another process or copied for a shadow model.
    """

    model: str
    version: str | None
    request_id: str
    protocol: Protocol = Protocol.REST
    fields: dict[str, Field] = field(default_factory=dict)
    tensors: dict[str, Any] | None = None
    tensor_meta: dict[str, Any] | None = None
    outputs: list[str] | None = None
    headers: dict[str, str] = field(default_factory=dict)
    deadline: float | None = None


@dataclass(slots=True)
class Ticket:
    """A request's place on the event loop: the work, and what only the loop may touch.

    ``future`` is resolved once with the answer; ``client`` is the connection where it
    tells (``client.disconnected`` is True once it is gone); ``stream`` is a callable(bytes)
    receiving intermediate responses, or None (one with a true ``raw`` attribute takes them as
    the handler gave them; any other sends bytes as they are, a text as UTF-8, anything else as
    JSON). The data plane fills ``model_version`` and ``output_specs`` when it routes the
    request, so an adapter can encode partial answers without looking the model up again.
    """

    request: InferenceRequest
    timings: Timings = field(default_factory=Timings)
    future: asyncio.Future | None = None
    client: Any = None
    stream: Any = None
    queued: int = 0  # the batcher's mark: 0 not in its queue, 1 waiting there, 2 there but already answered
    model_version: str = ""
    output_specs: list | None = None
    # seconds the request may run once an instance takes it (the model's responseTimeout, counted
    # as TorchServe counts it: from when its batch is dispatched, not while it waits in the queue)
    run_timeout: float | None = None

    @property
    def deadline(self) -> float | None:
        return self.request.deadline

    def expired(self, now: float | None = None) -> bool:
        deadline = self.request.deadline
        if deadline is None:
            return False
        return (time.monotonic() if now is None else now) >= deadline


def new_request(protocol: Protocol, model: str, version: str | None = None, *, request_id: Any = None,
                fields: dict[str, Field] | None = None, tensors: dict[str, Any] | None = None,
                tensor_meta: dict[str, Any] | None = None, outputs: list[str] | None = None,
                headers: dict[str, str] | None = None, received: float | None = None,
                timeouts: tuple[float | None, ...] = (), client: Any = None, stream: Any = None) -> Ticket:
    """The one constructor every adapter uses.

    Request id: the client's own (an OIP ``id``) when it gave a non-empty one, else the one
    the transport made for the answer (REST's ``x-request-id``), else a fresh one. Deadline: ``received`` plus the shortest of the
    ``timeouts`` (seconds; None where the client set none, e.g. a gRPC call without a
    deadline); the model's ``responseTimeout`` caps it once the request runs (``run_timeout``).
    """
    received = time.monotonic() if received is None else received
    limits = [t for t in timeouts if t is not None]
    work = InferenceRequest(model=model, version=version or None,
                            request_id=str(request_id) if request_id else next_request_id(), protocol=protocol,
                            fields={} if fields is None else fields, tensors=tensors, tensor_meta=tensor_meta,
                            outputs=outputs, headers={} if headers is None else headers,
                            deadline=received + min(limits) if limits else None)
    return Ticket(work, Timings(received=received), client=client, stream=stream)


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
    output_specs: list | None = None  # the answering version's declared outputs (set by the data plane)
