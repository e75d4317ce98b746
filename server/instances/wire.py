"""What crosses between a process instance and its child: small control messages through a
pipe, payload bytes (request bodies, numeric tensors, response bodies) through shared memory.

Each direction has one shared-memory *arena* owned by the parent. A handoff is one job at a
time per instance, so an arena is refilled from offset 0 for every handoff: no allocation
per request, one copy in and one copy out. Payloads under :data:`SHM_MIN` (and anything an
arena cannot hold, and object arrays) are pickled with the message instead.
"""

from __future__ import annotations

from multiprocessing import shared_memory
from typing import Any

import numpy as np

from server.core.errors import ErrorKind, OspreyError
from server.core.types import Field, InferenceRequest, InferenceResponse, Ticket

__all__ = ["SHM_MIN", "Arena", "pack_bytes", "unpack_bytes", "pack_tensors", "unpack_tensors",
           "outcome_to_wire", "outcome_from_wire"]

SHM_MIN = 64 * 1024  # payloads this large go through shared memory


class Arena:
    """One shared-memory segment, filled from the start for every handoff."""

    def __init__(self, shm: shared_memory.SharedMemory):
        self.shm = shm
        self.name = shm.name
        self.size = shm.size
        self.pos = 0

    @classmethod
    def create(cls, size: int) -> "Arena":
        return cls(shared_memory.SharedMemory(create=True, size=max(int(size), 1)))

    @classmethod
    def attach(cls, name: str) -> "Arena":
        return cls(shared_memory.SharedMemory(name=name))

    def put(self, data) -> tuple | None:
        view = memoryview(data).cast("B")
        n = view.nbytes
        if self.pos + n > self.size:
            return None
        off = self.pos
        self.shm.buf[off:off + n] = view
        self.pos = off + n
        return ("shm", off, n)

    def get(self, ref: tuple) -> bytes:
        _, off, n = ref
        return bytes(self.shm.buf[off:off + n])

    def view(self, off: int, n: int) -> memoryview:
        return self.shm.buf[off:off + n]

    def close(self, unlink: bool = False) -> None:
        try:
            self.shm.close()
        except BufferError:  # a view is still alive: the mapping goes with the process
            pass
        if unlink:
            try:
                self.shm.unlink()
            except FileNotFoundError:
                pass


def payload_size(value: Any) -> int:
    """Bytes that would go through shared memory for ``value`` (bytes or an array)."""
    if isinstance(value, np.ndarray):
        return value.nbytes if value.dtype.kind in "biufc" and value.nbytes >= SHM_MIN else 0
    if isinstance(value, (bytes, bytearray, memoryview)):
        n = memoryview(value).nbytes
        return n if n >= SHM_MIN else 0
    return 0


def pack_bytes(value: Any, arena: Arena | None) -> Any:
    if arena is not None and isinstance(value, (bytes, bytearray, memoryview)) and memoryview(value).nbytes >= SHM_MIN:
        ref = arena.put(value)
        if ref is not None:
            return ref
    return bytes(value) if isinstance(value, memoryview) else value


def unpack_bytes(value: Any, arena: Arena | None) -> Any:
    if isinstance(value, tuple) and value and value[0] == "shm":
        return arena.get(value)
    return value


def pack_array(a: Any, arena: Arena | None) -> Any:
    if not isinstance(a, np.ndarray) and callable(getattr(a, "detach", None)):  # a torch tensor: as numpy
        a = a.detach().cpu().numpy()
    if (arena is not None and isinstance(a, np.ndarray) and a.dtype.kind in "biufc" and a.nbytes >= SHM_MIN):
        ref = arena.put(np.ascontiguousarray(a).view(np.uint8).reshape(-1))
        if ref is not None:
            return ("nd", a.dtype.str, a.shape, ref[1], ref[2])
    return a


def unpack_array(value: Any, arena: Arena | None) -> Any:
    if isinstance(value, tuple) and value and value[0] == "nd":
        _, dtype, shape, off, n = value
        return np.frombuffer(arena.view(off, n), dtype=np.dtype(dtype)).reshape(shape).copy()
    return value


def pack_tensors(tensors: dict | None, arena: Arena | None) -> dict | None:
    return None if tensors is None else {k: pack_array(v, arena) for k, v in tensors.items()}


def unpack_tensors(tensors: dict | None, arena: Arena | None) -> dict | None:
    return None if tensors is None else {k: unpack_array(v, arena) for k, v in tensors.items()}


def work_from_wire(wire: tuple, arena: Arena | None, stream) -> Ticket:
    """The request as the child's BatchRunner sees it: a ticket of the child's own, whose
    ``stream`` sends to the parent."""
    request_id, headers, fields, tensors, tensor_meta, _streams, protocol = wire
    work = InferenceRequest(model="", version=None, request_id=request_id, protocol=protocol, headers=headers,
                            fields={k: Field(unpack_bytes(v, arena), ct) for k, (v, ct) in fields.items()},
                            tensors=unpack_tensors(tensors, arena), tensor_meta=tensor_meta)
    return Ticket(work, stream=stream)


def outcome_to_wire(o: Any, arena: Arena | None) -> tuple:
    if isinstance(o, OspreyError):
        return ("e", o.kind.value, o.message, o.status, o.retry_after, o._type_name)
    return ("r", o.status, o.content_type, o.headers, o.model_version, pack_bytes(o.body, arena),
            pack_tensors(o.tensors, arena))


def outcome_from_wire(w: tuple, arena: Arena | None) -> Any:
    if w[0] == "e":
        _, kind, message, status, retry_after, type_name = w
        return OspreyError(ErrorKind(kind), message, status=status, retry_after=retry_after, type_name=type_name)
    _, status, ctype, headers, version, body, tensors = w
    return InferenceResponse(body=unpack_bytes(body, arena), status=status, content_type=ctype, headers=headers,
                             tensors=unpack_tensors(tensors, arena), model_version=version)
