"""Osprey's ``osprey.Monitoring`` service on the gRPC inference port (7070).

``Feedback`` joins labels to predictions by request id (``DataPlane.feedback``) and
``ModelMonitoring`` answers a version's monitoring status (``DataPlane.monitoring``), the same
as ``POST /feedback`` and ``GET /monitoring`` on REST. Errors are raised as OspreyError and
become statuses in :class:`~server.protocols.grpc.status.ErrorStatus`: a malformed item or
every item invalid INVALID_ARGUMENT, an unknown model NOT_FOUND, monitoring state
unavailable UNAVAILABLE.
"""

from __future__ import annotations

from typing import Any

import orjson
from google.protobuf import json_format, struct_pb2

from server.core.capture import FeedbackItem
from server.core.dataplane import DataPlane
from server.core.errors import ErrorKind, OspreyError, show
from server.protocols.grpc.generated import osprey_monitoring_pb2 as pb
from server.protocols.grpc.generated import osprey_monitoring_pb2_grpc as pb_grpc
from server.protocols.rest.monitoring import plain_json, check_label, feedback_answer

__all__ = ["MonitoringServicer", "SERVICE_NAME", "label_of"]

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Monitoring"].full_name


def _bad(message: str) -> OspreyError:
    return OspreyError(ErrorKind.BAD_INPUT, message)


def _number(x: float) -> int | float:
    return int(x) if x.is_integer() and abs(x) < 2**53 else x


def _plain(value: struct_pb2.Value) -> Any:
    """A ``google.protobuf.Value`` as the JSON value it stands for (whole numbers as int)."""
    kind = value.WhichOneof("kind")
    if kind == "string_value":
        return value.string_value
    if kind == "number_value":
        return _number(value.number_value)
    if kind == "bool_value":
        return value.bool_value
    if kind == "list_value":
        return [_plain(v) for v in value.list_value.values]
    if kind == "struct_value":
        return json_format.MessageToDict(value.struct_value)
    return None  # null (or unset inside a list)


def label_of(value: struct_pb2.Value, where: str) -> Any:
    """A ``google.protobuf.Value`` label as a plain string, number or boolean, or a list of them
    (several regression outputs, or one label per record of a request that held several): the
    labels REST's JSON takes, checked the same way."""
    if value.WhichOneof("kind") is None:
        raise _bad(f"{where} has no 'label'")
    label = _plain(value)
    check_label(label, where)  # an object, null or a nested list: refused, naming it
    return label


class MonitoringServicer(pb_grpc.MonitoringServicer):
    def __init__(self, dataplane: DataPlane):
        self.dataplane = dataplane

    async def Feedback(self, request, context):
        if not request.items:
            raise _bad("no feedback items: 'items' is empty")
        items = []
        for i, item in enumerate(request.items):
            where = f"feedback[{i}]"
            if not item.request_id:
                raise _bad(f"{where} has no 'request_id' (the x-request-id of the answer)")
            where += f" (request_id {show(item.request_id)})"
            if not item.HasField("label"):
                raise _bad(f"{where} has no 'label'")
            items.append(FeedbackItem(request_id=item.request_id, label=label_of(item.label, where), index=i))
        result = await self.dataplane.feedback(request.model_name, request.model_version or None, items)
        status, body = feedback_answer(result)
        if status != 200:
            raise OspreyError(ErrorKind.BAD_INPUT, body["message"])
        return pb.FeedbackResponse(accepted=result.accepted, unmatched=result.unmatched, invalid=result.invalid,
                                   errors=result.errors, unmatched_ids=result.unmatched_ids, kept=result.kept)

    async def ModelMonitoring(self, request, context):
        status = await self.dataplane.monitoring(request.model_name, request.model_version or None)
        text = orjson.dumps(status, default=plain_json, option=orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS)
        struct = struct_pb2.Struct()
        struct.update(orjson.loads(text))
        return pb.ModelMonitoringResponse(json=text.decode(), status=struct)

