"""The one table from Osprey errors to gRPC status codes (TorchServe's mapping).

400 INVALID_ARGUMENT, 401 UNAUTHENTICATED, 404 NOT_FOUND, 501 UNIMPLEMENTED,
503 UNAVAILABLE, 504 DEADLINE_EXCEEDED, 499 CANCELLED; any other 4xx is
FAILED_PRECONDITION and any other 5xx INTERNAL. The HTTP status an error carries (which a
handler may have chosen) decides, so REST and gRPC clients see the same failure. An
exception that is not an OspreyError is a server bug: :func:`unexpected` logs its
traceback and makes it an INTERNAL error, so the call still gets an answer.
"""

from __future__ import annotations

import logging

import grpc

from server.core.errors import ErrorKind, OspreyError

__all__ = ["GRPC_STATUS", "grpc_code", "abort", "unexpected"]

log = logging.getLogger("osprey.grpc")

GRPC_STATUS: dict[int, grpc.StatusCode] = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    404: grpc.StatusCode.NOT_FOUND,
    499: grpc.StatusCode.CANCELLED,
    501: grpc.StatusCode.UNIMPLEMENTED,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}


def grpc_code(status: int) -> grpc.StatusCode:
    code = GRPC_STATUS.get(status)
    if code is not None:
        return code
    return grpc.StatusCode.FAILED_PRECONDITION if 400 <= status < 500 else grpc.StatusCode.INTERNAL


async def abort(context: grpc.aio.ServicerContext, err: OspreyError) -> None:
    """End the call with ``err``'s status (raises)."""
    await context.abort(grpc_code(err.status), err.message)


def unexpected(exc: BaseException, what: str) -> OspreyError:
    """Log ``exc`` (a server bug, not a client mistake) with its traceback; the error to answer."""
    log.error("%s failed unexpectedly", what, exc_info=exc)
    return OspreyError(ErrorKind.INTERNAL, f"Internal server error ({type(exc).__name__}) in {what}; "
                                           "the server log has the details")
