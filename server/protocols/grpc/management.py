"""TorchServe's gRPC management API (``ManagementAPIsService``, port 7071).

Each RPC calls the registry and answers ``ManagementResponse{msg}`` holding the same JSON
the REST management API returns. Proto3 scalars cannot be absent, so 0 / "" mean "not
given" (the REST default applies).
"""

from __future__ import annotations

from typing import Any

import orjson

from server.core.errors import OspreyError
from server.core.registry import Registry
from server.protocols import management as api
from server.protocols.grpc.generated import management_pb2 as pb
from server.protocols.grpc.generated import management_pb2_grpc as pb_grpc
from server.protocols.grpc.status import abort

__all__ = ["ManagementServicer"]


def _msg(obj: Any) -> pb.ManagementResponse:
    return pb.ManagementResponse(msg=orjson.dumps(obj, option=orjson.OPT_INDENT_2).decode())


class ManagementServicer(pb_grpc.ManagementAPIsServiceServicer):
    def __init__(self, registry: Registry, *, enable_model_api: bool):
        self.registry = registry
        self.enable_model_api = enable_model_api

    async def _call(self, context, fn, *args, **kwargs) -> pb.ManagementResponse:
        try:
            result = fn(*args, **kwargs)
            return _msg(await result if hasattr(result, "__await__") else result)
        except OspreyError as err:
            await abort(context, err)

    async def DescribeModel(self, request, context):
        return await self._call(context, api.describe_models, self.registry, request.model_name,
                                request.model_version or None)

    async def ListModels(self, request, context):
        return await self._call(context, api.list_models, self.registry, request.limit or 100,
                                request.next_page_token)

    async def RegisterModel(self, request, context):
        r = request
        return await self._call(
            context, api.register, self.registry, self.enable_model_api, r.url, synchronous=r.synchronous,
            model_name=r.model_name or None, handler=r.handler or None, batch_size=r.batch_size or None,
            max_batch_delay=r.max_batch_delay or None, initial_workers=r.initial_workers or None,
            response_timeout=r.response_timeout or None, startup_timeout=r.startup_timeout or None)

    async def ScaleWorker(self, request, context):
        r = request
        lo = r.min_worker if r.min_worker or r.max_worker else None
        return await self._call(context, api.scale, self.registry, r.model_name, r.model_version or None, lo,
                                r.max_worker or None, synchronous=r.synchronous)

    async def SetDefault(self, request, context):
        return await self._call(context, api.set_default, self.registry, request.model_name, request.model_version)

    async def UnregisterModel(self, request, context):
        return await self._call(context, api.unregister, self.registry, self.enable_model_api, request.model_name,
                                request.model_version or None)
