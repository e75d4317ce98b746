"""The one table from Osprey errors to gRPC status codes (TorchServe's mapping).

400 INVALID_ARGUMENT, 401 UNAUTHENTICATED, 404 NOT_FOUND, 501 UNIMPLEMENTED,
503 UNAVAILABLE, 504 DEADLINE_EXCEEDED, 499 CANCELLED; any other 4xx is
FAILED_PRECONDITION and any other 5xx INTERNAL. The HTTP status an error carries (which a
handler may have chosen) decides, so REST and gRPC clients see the same failure. An
exception that is not an OspreyError is a server bug: :func:`unexpected` logs its
traceback and makes it an INTERNAL error, so the call still gets an answer.

:class:`ErrorStatus` is the one place that turns an RPC's exception into its status, for
every servicer on both gRPC ports; servicers just raise. Streams that answer errors in band
(StreamPredictions2, ModelStreamInfer) catch per request themselves and keep the stream open.
"""

from __future__ import annotations

import inspect
import logging

import grpc

from server.core.errors import ErrorKind, OspreyError

__all__ = ["GRPC_STATUS", "grpc_code", "abort", "unexpected", "ErrorStatus", "WrappingInterceptor"]

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
    if err.grpc is not None:  # an answer whose gRPC status is not the HTTP one's (OspreyError.grpc)
        code, message = err.grpc
        await context.abort(grpc.StatusCode[code], message)
    await context.abort(grpc_code(err.status), err.message)


def unexpected(exc: BaseException, what: str) -> OspreyError:
    """Log ``exc`` (a server bug, not a client mistake) with its traceback; the error to answer."""
    log.error("%s failed unexpectedly", what, exc_info=exc)
    return OspreyError(ErrorKind.INTERNAL, f"Internal server error ({type(exc).__name__}) in {what}; "
                                           "the server log has the details")


async def _answer(context: grpc.aio.ServicerContext, exc: Exception, method: str, request=None) -> None:
    """End the call for ``exc`` raised by ``method`` (raises the abort)."""
    if isinstance(exc, grpc.aio.AbortError):  # the servicer aborted with a status itself
        raise exc
    if not isinstance(exc, OspreyError):
        what = method.rsplit("/", 1)[-1]
        model = getattr(request, "model_name", None) or getattr(request, "name", None)
        if isinstance(model, str) and model:
            what += f" for model {model!r:.100}"
        exc = unexpected(exc, what)
    await abort(context, exc)


def _wrap(handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
    if handler.request_streaming and handler.response_streaming:
        fn, make = handler.stream_stream, grpc.stream_stream_rpc_method_handler
    elif handler.request_streaming:
        fn, make = handler.stream_unary, grpc.stream_unary_rpc_method_handler
    elif handler.response_streaming:
        fn, make = handler.unary_stream, grpc.unary_stream_rpc_method_handler
    else:
        fn, make = handler.unary_unary, grpc.unary_unary_rpc_method_handler
    single = not handler.request_streaming  # one request message, to name the model from

    if inspect.isasyncgenfunction(fn):
        async def call(request, context):
            try:
                async for reply in fn(request, context):
                    yield reply
            except Exception as exc:
                await _answer(context, exc, method, request if single else None)
    elif inspect.iscoroutinefunction(fn):
        async def call(request, context):
            try:
                return await fn(request, context)
            except Exception as exc:
                await _answer(context, exc, method, request if single else None)
    else:  # not an async servicer method: left as it is
        return handler
    return make(call, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)


class WrappingInterceptor(grpc.aio.ServerInterceptor):
    """An interceptor that wraps each method's handler once (``wrap_handler``) and reuses the
    wrapped one while the servicer hands out the same handler: no new closure per call."""

    def __init__(self) -> None:
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    def wrap_handler(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        raise NotImplementedError

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None:
            return None
        cached = self._wrapped.get(details.method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = self.wrap_handler(handler, details.method)
        self._wrapped[details.method] = (handler, wrapped)
        return wrapped


class ErrorStatus(WrappingInterceptor):
    """Every RPC's exception becomes its status: an OspreyError its own (:func:`grpc_code`),
    anything else INTERNAL with a short message, its traceback logged once. Never UNKNOWN."""

    def wrap_handler(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        return _wrap(handler, method)
