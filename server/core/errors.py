"""Errors as data.

Every failure the core reports is an :class:`OspreyError` carrying an :class:`ErrorKind`.
Front ends translate a kind once: :data:`HTTP_STATUS` for REST, :data:`GRPC_STATUS` (in the
gRPC adapter) for gRPC. The ``type`` names match TorchServe's JSON error bodies.

    OspreyError
     +-- kind: ErrorKind (BAD_INPUT, NOT_FOUND, QUEUE_FULL, DEADLINE, ...)
"""

from __future__ import annotations

import enum
from typing import Any

__all__ = ["ErrorKind", "OspreyError", "StartupTimeout", "TS_STARTUP_TIMEOUT_LINE", "HTTP_STATUS", "TYPE_NAME",
           "from_status", "show", "error_state", "error_from_state", "METHOD_NOT_ALLOWED_TEXT", "NOT_FOUND_TEXT"]


class ErrorKind(enum.Enum):
    BAD_INPUT = "bad_input"
    UNAUTHORIZED = "unauthorized"
    FORBIDDEN = "forbidden"
    NOT_FOUND = "not_found"
    METHOD_NOT_ALLOWED = "method_not_allowed"
    CONFLICT = "conflict"
    TOO_LARGE = "too_large"
    UNSUPPORTED = "unsupported"
    PREDICTION_FAILED = "prediction_failed"
    QUEUE_FULL = "queue_full"
    UNAVAILABLE = "unavailable"
    DEADLINE = "deadline"
    CANCELLED = "cancelled"
    OUT_OF_MEMORY = "out_of_memory"
    INTERNAL = "internal"


HTTP_STATUS = {
    ErrorKind.BAD_INPUT: 400,
    ErrorKind.UNAUTHORIZED: 401,
    ErrorKind.FORBIDDEN: 403,
    ErrorKind.NOT_FOUND: 404,
    ErrorKind.METHOD_NOT_ALLOWED: 405,
    ErrorKind.CONFLICT: 409,
    ErrorKind.TOO_LARGE: 413,
    ErrorKind.UNSUPPORTED: 501,
    ErrorKind.PREDICTION_FAILED: 503,
    ErrorKind.QUEUE_FULL: 503,
    ErrorKind.UNAVAILABLE: 503,
    ErrorKind.DEADLINE: 504,
    ErrorKind.CANCELLED: 499,
    ErrorKind.OUT_OF_MEMORY: 507,
    ErrorKind.INTERNAL: 500,
}

TYPE_NAME = {
    ErrorKind.BAD_INPUT: "BadRequestException",
    ErrorKind.UNAUTHORIZED: "InvalidKeyException",
    ErrorKind.FORBIDDEN: "InvalidModelVersionException",
    ErrorKind.NOT_FOUND: "ModelNotFoundException",
    ErrorKind.METHOD_NOT_ALLOWED: "MethodNotAllowedException",
    ErrorKind.CONFLICT: "ConflictStatusException",
    ErrorKind.TOO_LARGE: "RequestEntityTooLargeException",
    ErrorKind.UNSUPPORTED: "NotImplementedException",
    ErrorKind.PREDICTION_FAILED: "InternalServerException",
    ErrorKind.QUEUE_FULL: "ServiceUnavailableException",
    ErrorKind.UNAVAILABLE: "ServiceUnavailableException",
    ErrorKind.DEADLINE: "RequestTimeoutException",
    ErrorKind.CANCELLED: "RequestCancelledException",
    ErrorKind.OUT_OF_MEMORY: "OutOfMemoryException",
    ErrorKind.INTERNAL: "InternalServerException",
}

# TorchServe's bodies for a method a route does not take and for a path no route has: fixed
# texts, compared verbatim by its clients' tests (its MethodNotAllowedException and
# ResourceNotFoundException), so they name neither the method nor the path
METHOD_NOT_ALLOWED_TEXT = "Requested method is not allowed, please refer to API document."
NOT_FOUND_TEXT = "Requested resource is not found, please refer to API document."

_BY_STATUS = {}
for _kind, _status in HTTP_STATUS.items():
    _BY_STATUS.setdefault(_status, _kind)


def from_status(status: int) -> ErrorKind:
    """The kind for an HTTP status a handler chose (PredictionException(msg, code))."""
    if status in _BY_STATUS:
        return _BY_STATUS[status]
    return ErrorKind.BAD_INPUT if 400 <= status < 500 else ErrorKind.INTERNAL


class OspreyError(Exception):
    """A failure with a kind; ``status`` overrides the kind's HTTP status when set.

    ``grpc`` is ``(status code name, message)`` for the rare answer whose gRPC status does not
    follow from its HTTP status (TorchServe's model API guard: REST 405, gRPC PERMISSION_DENIED);
    the gRPC adapter answers it instead of the mapped status and ``message``."""

    def __init__(self, kind: ErrorKind, message: str, *, status: int | None = None,
                 retry_after: float | None = None, type_name: str | None = None,
                 grpc: tuple[str, str] | None = None):
        super().__init__(message)
        self.kind = kind
        self._type_name = type_name
        self.message = message
        self.status = status if status is not None else HTTP_STATUS[kind]
        self.retry_after = retry_after
        self.grpc = grpc

    @property
    def type_name(self) -> str:
        return self._type_name or TYPE_NAME[self.kind]

    def __repr__(self) -> str:
        return f"OspreyError({self.kind.name}, {self.message!r})"


def error_state(err: OspreyError) -> dict[str, Any]:
    """An OspreyError as plain values, for another process (an exception pickles only its
    message): :func:`error_from_state` makes it again there, status and Retry-After included."""
    return {"kind": err.kind.name, "message": err.message, "status": err.status, "retry_after": err.retry_after,
            "type_name": err._type_name, "grpc": err.grpc}


def error_from_state(state: dict[str, Any]) -> OspreyError:
    return OspreyError(ErrorKind[state["kind"]], state["message"], status=state["status"],
                       retry_after=state["retry_after"], type_name=state["type_name"], grpc=state["grpc"])


def show(value: Any, limit: int = 60) -> str:
    """``value`` quoted (its repr) for an error message, cut to ``limit`` characters."""
    text = repr(value)
    if len(text) <= limit:
        return text
    size = f" ({len(value)} characters)" if isinstance(value, str) else ""
    return text[:limit] + "..." + size


# what TorchServe logs when a worker does not load within startupTimeout (a "Backend worker
# error" line, then this one); scripts and TorchServe's own tests wait for these lines
TS_STARTUP_TIMEOUT_LINE = ("org.pytorch.serve.wlm.WorkerInitializationException: "
                           "Backend worker did not respond in given time")


class StartupTimeout(OspreyError):
    """A model instance did not load within its startupTimeout."""
