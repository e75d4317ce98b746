"""TorchServe's gRPC inference API (``InferenceAPIsService``, port 7070).

Ping, Predictions, StreamPredictions (intermediate responses the handler sends, then the
final one) and StreamPredictions2 (a stream of requests answered in order, errors in
band). Each call becomes the core's request (:func:`~server.core.types.new_request`);
the gRPC deadline becomes the request's deadline, and a cancelled call cancels it. Errors
become statuses in :class:`~server.protocols.grpc.status.ErrorStatus`.
"""

from __future__ import annotations

import asyncio
import time

import orjson
from google.rpc import status_pb2

from server.core.dataplane import DataPlane
from server.core.errors import OspreyError
from server.core.types import Field, Protocol, Ticket, new_request, next_request_id
from server.protocols.grpc.generated import inference_pb2 as pb
from server.protocols.grpc.generated import inference_pb2_grpc as pb_grpc
from server.protocols.grpc.status import grpc_code, unexpected
from server.protocols.grpc.streams import StreamSink, begin

__all__ = ["InferenceServicer"]


def _headers(context) -> dict[str, str]:
    md = context.invocation_metadata()
    return {k: v for k, v in md if isinstance(v, str)} if md else {}


class InferenceServicer(pb_grpc.InferenceAPIsServiceServicer):
    def __init__(self, dataplane: DataPlane):
        self.dataplane = dataplane

    def _core(self, request, context, rid: str | None = None) -> Ticket:
        if self.dataplane.refusing():  # refuse before building the request while the queue is full
            self.dataplane.admit(request.model_name, request.model_version or None, Protocol.GRPC)
        headers = _headers(context)
        if request.HasField("sequence_id"):
            headers["ts_request_sequence_id"] = request.sequence_id
        return new_request(Protocol.GRPC, request.model_name, request.model_version, request_id=rid,
                           fields={k: Field(v) for k, v in request.input.items()}, headers=headers,
                           received=time.monotonic(), timeouts=(context.time_remaining(),))

    @staticmethod
    def _tell_id(core: Ticket, context) -> None:
        """The request id in trailing metadata (``x-request-id``): the id feedback joins on."""
        context.set_trailing_metadata((("x-request-id", core.request.request_id),))

    async def Ping(self, request, context):
        healthy = self.dataplane.healthy()
        return pb.TorchServeHealthResponse(
            health=orjson.dumps({"status": "Healthy" if healthy else "Unhealthy"}, option=orjson.OPT_INDENT_2).decode())

    async def Predictions(self, request, context):
        core = self._core(request, context)
        self._tell_id(core, context)
        out = await self.dataplane.infer(core)
        return pb.PredictionResponse(prediction=out.body)

    async def StreamPredictions(self, request, context):
        core = self._core(request, context)
        self._tell_id(core, context)
        sink = StreamSink(asyncio.get_running_loop(), f"StreamPredictions of model {core.request.model!r:.100}, "
                                                      f"request {core.request.request_id}", context=context)
        core.stream = sink
        await begin(context)  # (before anything is made for the client: a cut's status must not carry it)
        task = asyncio.ensure_future(self.dataplane.infer(core))
        task.add_done_callback(sink.close)
        try:
            async for chunk in sink:
                yield pb.PredictionResponse(prediction=chunk)
            yield pb.PredictionResponse(prediction=task.result().body)
        finally:
            sink.box.close()
            if not task.done():
                task.cancel()

    async def StreamPredictions2(self, request_iterator, context):
        # PredictionResponse has no field for a request id. The call's initial metadata, sent
        # before the first answer, holds x-request-id-base; answer k of the stream (0, 1, ...)
        # is request BASE-k, the id feedback joins on: known as each answer arrives, and one
        # metadata entry however long the stream
        base = next_request_id()
        await context.send_initial_metadata((("x-request-id-base", base),))
        k = 0
        async for request in request_iterator:
            reply = pb.PredictionResponse()
            if request.HasField("sequence_id"):
                reply.sequence_id = request.sequence_id
            yield await self._answer(request, context, reply, f"{base}-{k}")
            k += 1

    async def _answer(self, request, context, reply, rid: str):
        """One StreamPredictions2 request (id ``rid``) answered in ``reply`` (errors in band)."""
        try:
            out = await self.dataplane.infer(self._core(request, context, rid))
            reply.prediction = out.body
        except Exception as exc:  # never a request on the stream without an answer
            err = exc if isinstance(exc, OspreyError) else \
                unexpected(exc, f"StreamPredictions2 for model {request.model_name!r:.100}")
            reply.status.CopyFrom(status_pb2.Status(code=grpc_code(err.status).value[0], message=err.message))
        return reply
