"""gRPC calls in TorchServe's access log (access_log.log, :mod:`server.log_files`).

TorchServe 0.12's ``GRPCInterceptor`` writes one line per gRPC call when it closes, on both
gRPC ports, in the HTTP lines' format with ``gRPC`` as the method, the full method name as the
URI, ``HTTP/2.0`` as the protocol and the gRPC status code's number as the status::

    2026-11-29T22:40:31,044 - /127.0.0.1:36414 "gRPC org.pytorch.serve.grpc.inference.InferenceAPIsService/Predictions HTTP/2.0" 0 625

(recorded from TorchServe: tests/fixtures/torchserve_model_deps/recorded.json). :class:`GrpcAccess`
is the outermost interceptor, so the code is the one the client got, whichever interceptor or
servicer ended the call. TorchServe leaves out the calls its token check refuses; Osprey logs
them too (code 16), as it logs refused HTTP requests.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from typing import Callable

import grpc

from server.protocols.grpc.status import WrappingInterceptor

__all__ = ["GrpcAccess", "peer_address"]


def peer_address(peer: str | None) -> str:
    """``ipv4:127.0.0.1:5000`` / ``ipv6:[::1]:5000`` as the access log's ``/127.0.0.1:5000`` / ``/::1:5000``."""
    if not peer:
        return "/0.0.0.0"
    kind, _, rest = peer.partition(":")
    if kind == "ipv6":
        host, _, port = rest.rpartition(":")
        return f"/{host.strip('[]')}:{port}"
    return f"/{rest}" if kind == "ipv4" else f"/{peer}"


def _code(context: grpc.aio.ServicerContext, exc: BaseException | None) -> int:
    if isinstance(exc, asyncio.CancelledError):
        return grpc.StatusCode.CANCELLED.value[0]
    code = context.code()
    if code is None:
        return grpc.StatusCode.UNKNOWN.value[0] if exc is not None and not isinstance(
            exc, grpc.aio.AbortError) else 0
    return code.value[0] if isinstance(code, grpc.StatusCode) else int(code)


class GrpcAccess(WrappingInterceptor):
    """Calls ``write(peer, method, code, started)`` when each call ends (``started``: monotonic)."""

    def __init__(self, write: Callable[[str, str, int, float], None]):
        super().__init__()
        self.write = write

    def wrap_handler(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        return self._wrap(handler, method.lstrip("/"))

    def _done(self, context, method: str, started: float, exc: BaseException | None) -> None:
        try:
            self.write(peer_address(context.peer()), method, _code(context, exc), started)
        except Exception:  # the log never fails a call
            pass

    def _wrap(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        if handler.request_streaming and handler.response_streaming:
            fn, make = handler.stream_stream, grpc.stream_stream_rpc_method_handler
        elif handler.request_streaming:
            fn, make = handler.stream_unary, grpc.stream_unary_rpc_method_handler
        elif handler.response_streaming:
            fn, make = handler.unary_stream, grpc.unary_stream_rpc_method_handler
        else:
            fn, make = handler.unary_unary, grpc.unary_unary_rpc_method_handler
        done = self._done

        if inspect.isasyncgenfunction(fn):
            async def call(request, context):
                started, failure = time.monotonic(), None
                try:
                    async for reply in fn(request, context):
                        yield reply
                except BaseException as exc:
                    failure = exc
                    raise
                finally:
                    done(context, method, started, failure)
        elif inspect.iscoroutinefunction(fn):
            async def call(request, context):
                started, failure = time.monotonic(), None
                try:
                    return await fn(request, context)
                except BaseException as exc:
                    failure = exc
                    raise
                finally:
                    done(context, method, started, failure)
        else:  # not an async servicer method: left as it is
            return handler
        return make(call, request_deserializer=handler.request_deserializer,
                    response_serializer=handler.response_serializer)
