"""Start the gRPC listeners on the running event loop (called by ``serve.Server.start``).

7070 serves TorchServe's ``InferenceAPIsService``, the Open Inference Protocol's
``GRPCInferenceService`` and Osprey's ``osprey.Monitoring`` (feedback, monitoring status); 7071 serves ``ManagementAPIsService``. Both carry standard
health checking (``grpc.health.v1``: SERVING once the startup models are ready) and server
reflection. With token auth on, every call but health and reflection needs metadata
``authorization: Bearer <key>`` (the inference key on 7070, the management key on 7071).
With ``enable_grpc_ssl`` both ports serve TLS with the server's key and certificate
(``server/tls.py``; a SIGHUP reload reaches the next connections).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Callable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from server.protocols.grpc.access import GrpcAccess
from server.protocols.grpc.generated import grpc_service_pb2, grpc_service_pb2_grpc, inference_pb2, inference_pb2_grpc
from server.protocols.grpc.generated import management_pb2, management_pb2_grpc
from server.protocols.grpc.management import ManagementServicer
from server.protocols.grpc.monitoring import SERVICE_NAME as MONITORING_SERVICE
from server.protocols.grpc.monitoring import MonitoringServicer
from server.protocols.grpc.generated import osprey_monitoring_pb2_grpc
from server.protocols.grpc.open_inference import OpenInferenceServicer
from server.protocols.grpc.status import ErrorStatus
from server.protocols.grpc.torchserve import InferenceServicer
from server.protocols.grpc.streams import Outbox

__all__ = ["start_grpc", "TokenAuth", "Draining"]

log = logging.getLogger("osprey.grpc")

_OPEN = ("/grpc.health.v1.Health/", "/grpc.reflection.")
_DENIED = "Token Authorization failed. Token either incorrect, expired, or not provided correctly"


class TokenAuth(grpc.aio.ServerInterceptor):
    """Checks ``authorization: Bearer <key>`` with ``valid`` (the current, unexpired key of one kind)."""

    def __init__(self, valid: Callable[[str], bool]):
        self.valid = valid

    def _ok(self, metadata) -> bool:
        for key, value in metadata or ():
            if key == "authorization" and isinstance(value, str) and value[:7].lower() == "bearer ":
                return self.valid(value[7:].strip())
        return False

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or details.method.startswith(_OPEN) or self._ok(details.invocation_metadata):
            return handler
        return _aborting(handler, grpc.StatusCode.UNAUTHENTICATED, _DENIED)


class Draining(grpc.aio.ServerInterceptor):
    """Once :meth:`begin` is called (SIGTERM), every new call is answered UNAVAILABLE at once
    (health checks and reflection excepted), while the calls already running finish. The
    server itself stops only when the drain is over: stopping it at once would cancel the calls
    gRPC had received but not yet handed to a servicer (they ended CANCELLED, unanswered)."""

    def __init__(self) -> None:
        self.active = False
        self.seen = 0.0  # monotonic time of the last call received
        self.last_call = 0.0  # monotonic time of the last call refused while draining

    def begin(self) -> None:
        # clients that called just before the drain may call again at once: the drain lingers
        # (DRAIN_LINGER_S) to refuse them; a server no gRPC client used lately stops without it
        self.active = True
        self.last_call = self.seen

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if not self.active:
            self.seen = time.monotonic()
            return handler
        if handler is None or details.method.startswith(_OPEN):
            return handler
        self.last_call = time.monotonic()
        return _aborting(handler, grpc.StatusCode.UNAVAILABLE, "Server is shutting down; retry on another replica")


def _aborting(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same kind as ``handler`` that answers ``code`` with ``message``."""
    async def unary(request, context):
        await context.abort(code, message)

    async def streaming(request, context):
        await context.abort(code, message)
        yield  # pragma: no cover - makes this an async generator

    kw = dict(request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(streaming, **kw)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(unary, **kw)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(streaming, **kw)
    return grpc.unary_unary_rpc_method_handler(unary, **kw)


class _Health(health.aio.HealthServicer):
    """Answers from the data plane's readiness at the moment of each Check."""

    def __init__(self, ready: Callable[[], bool], services: list[str]):
        super().__init__()
        self._ready = ready
        self._services = set(services) | {""}

    def status(self) -> int:
        return health_pb2.HealthCheckResponse.SERVING if self._ready() else health_pb2.HealthCheckResponse.NOT_SERVING

    async def Check(self, request, context):
        if request.service not in self._services:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}")
        return health_pb2.HealthCheckResponse(status=self.status())

    async def follow(self) -> None:
        """Keep Watch subscribers current (polls readiness twice a second)."""
        last = None
        while True:
            status = self.status()
            if status != last:
                for name in self._services:
                    await self.set(name, status)
                last = status
            await asyncio.sleep(0.5)


def _options(settings: Any) -> list[tuple[str, Any]]:
    return [("grpc.max_receive_message_length", int(settings.max_request_size)),
            # the data plane refuses an answer over max_response_size, naming it (server/core/dataplane.py);
            # the transport's own limit leaves room for protobuf's framing of what the data plane counted
            ("grpc.max_send_message_length", 2 * int(settings.max_response_size) + 65536),
            ("grpc.so_reuseport", 0)]


async def _serve(bind: str, settings: Any, add: list[tuple[Callable, Any]], names: list[str],
                 ready: Callable[[], bool], interceptors: list,
                 credentials: grpc.ServerCredentials | None = None) -> tuple[grpc.aio.Server, asyncio.Task]:
    server = grpc.aio.server(interceptors=interceptors, options=_options(settings))
    for adder, servicer in add:
        adder(servicer, server)
    checker = _Health(ready, names)
    health_pb2_grpc.add_HealthServicer_to_server(checker, server)
    reflection.enable_server_reflection([*names, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    try:
        bound = server.add_secure_port(bind, credentials) if credentials is not None \
            else server.add_insecure_port(bind)
    except RuntimeError:  # grpc >= 1.60 raises where older versions returned 0
        bound = 0
    if bound == 0:
        await server.stop(None)
        raise OSError(f"could not listen on {bind} (gRPC): address in use or not available")
    await server.start()
    return server, asyncio.get_running_loop().create_task(checker.follow())


async def start_grpc(server: Any) -> list[grpc.aio.Server]:
    """Start the inference and management gRPC servers of a ``serve.Server``."""
    s, dp, keys = server.settings, server.dataplane, server.keys
    Outbox.stall_s = float(s.stream_stall_timeout)  # a streaming call's client that stops reading is cut

    draining = Draining()
    tls = server.tls if s.enable_grpc_ssl else None  # enable_grpc_ssl: both ports on TLS (server/tls.py)

    def credentials():
        return tls.grpc_credentials() if tls is not None else None

    # TorchServe's access log (access_log.log) gets a line per call, outermost: the code the client got
    files = getattr(server, "log_files", None)
    access = [GrpcAccess(files.grpc_access)] if files is not None and "access_log" in files.paths else []

    def auth(kind: str) -> list:  # then every RPC's errors become its status, in one place
        return access + [draining] + ([TokenAuth(lambda token: keys.check(kind, token))] if keys is not None else []) \
            + [ErrorStatus()]

    inference_names = [inference_pb2.DESCRIPTOR.services_by_name["InferenceAPIsService"].full_name,
                       grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name,
                       MONITORING_SERVICE]
    management_names = [management_pb2.DESCRIPTOR.services_by_name["ManagementAPIsService"].full_name]
    inference, t1 = await _serve(s.grpc_inference_bind, s, [
        (inference_pb2_grpc.add_InferenceAPIsServiceServicer_to_server, InferenceServicer(dp)),
        (grpc_service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server,
         OpenInferenceServicer(dp, model_store=s.model_store, enable_model_api=s.enable_model_api,
                               envelope=s.service_envelope)),
        # osprey.Monitoring: feedback labels and monitoring status (DataPlane.feedback / .monitoring)
        (osprey_monitoring_pb2_grpc.add_MonitoringServicer_to_server, MonitoringServicer(dp)),
    ], inference_names, dp.ready, auth("inference"), credentials())
    try:
        management, t2 = await _serve(s.grpc_management_bind, s, [
            (management_pb2_grpc.add_ManagementAPIsServiceServicer_to_server,
             ManagementServicer(dp.registry, enable_model_api=s.enable_model_api, custom_metadata=dp.describe_handle)),
        ], management_names, dp.ready, auth("management"), credentials())
    except OSError:
        t1.cancel()
        await inference.stop(None)
        raise
    inference._osprey_tasks = management._osprey_tasks = (t1, t2)  # kept alive with the servers
    inference.osprey_draining = management.osprey_draining = draining  # Server.stop begins the drain
    log.info("gRPC%s: inference %s, management %s", " over TLS" if tls is not None else "",
             s.grpc_inference_bind, s.grpc_management_bind)
    return [inference, management]
