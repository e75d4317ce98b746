"""TorchServe's gRPC management API (``ManagementAPIsService``, port 7071).

Each RPC calls the registry and answers ``ManagementResponse{msg}`` holding the same JSON
the REST management API returns. Proto3 scalars cannot be absent, so 0 / "" mean "not
given" (the REST default applies). Errors become statuses in
:class:`~server.protocols.grpc.status.ErrorStatus`, as on every gRPC service.
"""

from __future__ import annotations

from typing import Any

import orjson

from server.core.registry import Registry
from server.protocols import management as api
from server.protocols.grpc.generated import management_pb2 as pb
from server.protocols.grpc.generated import management_pb2_grpc as pb_grpc

__all__ = ["ManagementServicer"]


def _msg(obj: Any) -> pb.ManagementResponse:
    """Describe and list: the JSON the REST API answers (TorchServe's pretty-printed Gson)."""
    return pb.ManagementResponse(msg=orjson.dumps(obj, option=orjson.OPT_INDENT_2).decode())


def _status(answer: dict) -> pb.ManagementResponse:
    """Register, scale, set-default and unregister: the status text itself, as TorchServe's
    ManagementImpl sends ``statusResponse.getStatus()`` (not the REST answer's JSON)."""
    return pb.ManagementResponse(msg=str(answer.get("status", "")))


class ManagementServicer(pb_grpc.ManagementAPIsServiceServicer):
    def __init__(self, registry: Registry, *, enable_model_api: bool, custom_metadata: api.CustomMetadata | None = None):
        self.registry = registry
        self.enable_model_api = enable_model_api
        self.custom_metadata = custom_metadata

    async def DescribeModel(self, request, context):
        if request.customized and self.custom_metadata is not None:
            md = context.invocation_metadata() or ()
            headers = {k: v for k, v in md if isinstance(v, str) and k != "authorization"}
            return _msg(await api.describe_customized(self.registry, request.model_name, request.model_version or None,
                                                      self.custom_metadata, headers))
        return _msg(api.describe_models(self.registry, request.model_name, request.model_version or None))

    async def ListModels(self, request, context):
        return _msg(api.list_models(self.registry, request.limit or 100, request.next_page_token))

    async def RegisterModel(self, request, context):
        r = request
        return _status(await api.register(
            self.registry, self.enable_model_api, r.url or None, synchronous=r.synchronous,
            model_name=r.model_name or None, runtime=r.runtime or None, handler=r.handler or None,
            batch_size=r.batch_size or None, max_batch_delay=r.max_batch_delay or None,
            initial_workers=r.initial_workers or None, response_timeout=r.response_timeout or None,
            startup_timeout=r.startup_timeout or None))

    async def ScaleWorker(self, request, context):
        r = request
        lo = r.min_worker if r.min_worker or r.max_worker else None
        return _status(await api.scale(self.registry, r.model_name, r.model_version or None, lo, r.max_worker or None,
                                    synchronous=r.synchronous))

    async def SetDefault(self, request, context):
        return _status(await api.set_default(self.registry, request.model_name, request.model_version))

    async def UnregisterModel(self, request, context):
        return _status(await api.unregister(self.registry, self.enable_model_api, request.model_name,
                                         request.model_version or None))
