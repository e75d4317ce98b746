"""TorchServe's gRPC management API (``ManagementAPIsService``, port 7071).

Each RPC calls the registry and answers ``ManagementResponse{msg}`` holding the same JSON
the REST management API returns. Proto3 scalars cannot be absent, so 0 / "" mean "not
given" (the REST default applies). Errors become statuses in
:class:`~server.protocols.grpc.status.ErrorStatus`, as on every gRPC service.
"""

from __future__ import annotations

from typing import Any

import orjson

from server.core.errors import ErrorKind, OspreyError
from server.core.registry import Registry
from server.protocols.grpc.generated import management_pb2 as pb
from server.protocols.grpc.generated import management_pb2_grpc as pb_grpc

__all__ = ["ManagementServicer"]


def _msg(obj: Any) -> pb.ManagementResponse:
    return pb.ManagementResponse(msg=orjson.dumps(obj, option=orjson.OPT_INDENT_2).decode())


class ManagementServicer(pb_grpc.ManagementAPIsServiceServicer):
    def __init__(self, registry: Registry, *, enable_model_api: bool):
        self.registry = registry
        self.enable_model_api = enable_model_api

    def _model_api(self) -> None:
        if not self.enable_model_api:
            raise OspreyError(ErrorKind.METHOD_NOT_ALLOWED,
                              "Model API is disabled: start the server with --enable-model-api (enable_model_api=true)")

    async def DescribeModel(self, request, context):
        name, version = request.model_name, request.model_version or None
        versions = self.registry.versions(name) if version == "all" else [self.registry.get(name, version)]
        return _msg([self.registry.describe(mv) for mv in versions])

    async def ListModels(self, request, context):
        if request.limit < 0 or request.next_page_token < 0:
            raise OspreyError(ErrorKind.BAD_INPUT, "limit must be positive and next_page_token not negative")
        items, nxt = self.registry.list_page(min(request.limit or 100, 100), request.next_page_token)
        body: dict[str, Any] = {}
        if nxt is not None:
            body["nextPageToken"] = str(nxt)
        body["models"] = items
        return _msg(body)

    async def RegisterModel(self, request, context):
        self._model_api()
        r = request
        mv = await self.registry.register(
            r.url, model_name=r.model_name or None, handler=r.handler or None,
            batch_size=r.batch_size or None, max_batch_delay=r.max_batch_delay or None,
            initial_workers=r.initial_workers or None, response_timeout=r.response_timeout or None,
            startup_timeout=r.startup_timeout or None, synchronous=r.synchronous)
        if not r.synchronous:
            return _msg({"status": "Processing worker updates..."})
        return _msg({"status": f"Model \"{mv.name}\" Version: {mv.version} registered with "
                               f"{len(mv.instances)} initial workers"})

    async def ScaleWorker(self, request, context):
        r = request
        name, version = r.model_name, r.model_version or None
        lo = r.min_worker if r.min_worker or r.max_worker else None
        mv, lo, hi = self.registry.plan_scale(name, version, lo, r.max_worker or None)
        if not r.synchronous:
            self.registry.scale_in_background(name, version, lo, hi)
            return _msg({"status": "Processing worker updates..."})
        await self.registry.scale(name, version, lo, hi)
        return _msg({"status": f"Workers scaled to {lo} for model: {name}"})

    async def SetDefault(self, request, context):
        self.registry.set_default(request.model_name, request.model_version)
        return _msg({"status": f"Default version successfully updated for model \"{request.model_name}\" "
                               f"to \"{request.model_version}\""})

    async def UnregisterModel(self, request, context):
        self._model_api()
        await self.registry.unregister(request.model_name, request.model_version or None)
        return _msg({"status": f"Model \"{request.model_name}\" unregistered"})
