"""The Open Inference Protocol's ``GRPCInferenceService`` (package ``inference``, port 7070).

Health, metadata, ModelInfer, Triton's ModelStreamInfer (requests on one stream run
concurrently and answer as they finish; an error travels as ``error_message``, with the
request's ``id`` in ``infer_response``, and the stream stays open) and the repository
calls. ``raw_input_contents`` are viewed with ``np.frombuffer``; outputs always go back as
``raw_output_contents``. With ``service_envelope=kservev2``, ModelInfer to a TorchServe-style
handler sends it the KServe v2 JSON body TorchServe 0.12's own OIP gRPC service makes of the
request, and reads its JSON answer back (:func:`kservev2_body`, :func:`kservev2_outputs`);
ModelStreamInfer serves such handlers as plain OIP (TorchServe's OIP gRPC has no stream call). A client mistake is INVALID_ARGUMENT naming it; anything
unexpected is INTERNAL with a logged traceback, never UNKNOWN or a missing answer (the
servicer raises; :class:`~server.protocols.grpc.status.ErrorStatus` answers).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import numpy as np
import orjson

from server.core.dataplane import DataPlane
from server.core.errors import OspreyError
from server.protocols.oip import (SERVER_METADATA, load_model, model_metadata, output_tensors, repository_index,
                                  timeout_of, unload_model)
from server.core.errors import ErrorKind
from server.core.tensors import DTYPES, bad_input, decode_json, decode_raw, element_count, encode_raw, to_json_data
from server.core.types import Field, InferenceResponse, Protocol, Ticket, client_id_problem, new_request
from server.protocols.grpc.generated import grpc_service_pb2 as pb
from server.protocols.grpc.generated import grpc_service_pb2_grpc as pb_grpc
from server.protocols.grpc.status import unexpected
from server.protocols.grpc.streams import Outbox, StreamSink, begin

__all__ = ["OpenInferenceServicer", "decode_inputs", "encode_response", "kservev2_body", "kservev2_outputs"]

_CONTENTS = {"BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
             "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents",
             "UINT32": "uint_contents", "UINT64": "uint64_contents", "FP32": "fp32_contents",
             "FP64": "fp64_contents", "BYTES": "bytes_contents"}
_WIDE = {"int_contents": np.dtype(np.int32), "uint_contents": np.dtype(np.uint32)}  # what protobuf holds


def _params(pmap) -> dict[str, Any] | None:
    if not pmap:
        return None
    return {k: getattr(v, v.WhichOneof("parameter_choice")) for k, v in pmap.items() if v.WhichOneof("parameter_choice")}


def _from_contents(inp) -> np.ndarray:
    name, dt, shape = inp.name, inp.datatype, list(inp.shape)
    field = _CONTENTS.get(dt)
    if field is None:
        raise bad_input(f"input '{name}': {dt} data must be sent in raw_input_contents" if dt in DTYPES
                        else f"input '{name}': unknown datatype {dt!r}")
    values = getattr(inp.contents, field)
    count = element_count(name, shape)
    if len(values) != count:
        others = [f.name for f, v in inp.contents.ListFields() if f.name != field and len(v)]
        if others:
            raise bad_input(f"input '{name}': {dt} data is read from contents.{field}; the request filled "
                            f"{', '.join('contents.' + o for o in others)}")
        raise bad_input(f"input '{name}': shape {shape} needs {count} elements, contents hold {len(values)}")
    if dt == "BYTES":
        arr = np.empty(count, dtype=object)
        arr[:] = list(values)
        return arr.reshape(shape)
    target = DTYPES[dt]
    wide = _WIDE.get(field)
    if wide is not None and target.itemsize < wide.itemsize:  # INT8/16 in int_contents, UINT8/16 in uint_contents
        arr = np.array(values, dtype=wide)
        info = np.iinfo(target)
        if arr.size and (arr.min() < info.min or arr.max() > info.max):
            raise bad_input(f"input '{name}': contents hold a value out of range for {dt} "
                            f"({info.min}..{info.max}): {arr.min() if arr.min() < info.min else arr.max()}")
        return arr.astype(target).reshape(shape)
    return np.array(values, dtype=target).reshape(shape)


def decode_inputs(request) -> tuple[dict[str, np.ndarray], dict | None]:
    raw = request.raw_input_contents
    inputs = request.inputs
    if not inputs:
        raise bad_input("the request needs at least one input")
    if raw and len(raw) != len(inputs):
        raise bad_input(f"raw_input_contents holds {len(raw)} entries for {len(inputs)} inputs")
    tensors, meta = {}, None
    for i, inp in enumerate(inputs):
        if inp.name in tensors:
            raise bad_input(f"input '{inp.name}' appears more than once in 'inputs'")
        if "content_type" in inp.parameters and \
                inp.parameters["content_type"].WhichOneof("parameter_choice") != "string_param":
            raise bad_input(f"input '{inp.name}': parameter 'content_type' must be a string_param")
        if raw:
            if inp.HasField("contents") and inp.contents.ListFields():
                raise bad_input(f"input '{inp.name}' carries its data twice, in contents and in "
                                f"raw_input_contents; send one")
            tensors[inp.name] = decode_raw(inp.name, inp.datatype, list(inp.shape), raw[i])
        else:
            tensors[inp.name] = _from_contents(inp)
        if inp.parameters:
            meta = meta or {}
            meta[inp.name] = _params(inp.parameters)
    return tensors, meta


def encode_response(request, version: str, outputs: list) -> pb.ModelInferResponse:
    resp = pb.ModelInferResponse(model_name=request.model_name, model_version=version, id=request.id)
    raw = resp.raw_output_contents
    for name, arr, dt in outputs:
        out = resp.outputs.add()
        out.name, out.datatype = name, dt
        out.shape.extend(arr.shape)
        raw.append(bytes(encode_raw(arr, dt)))
    return resp


def kservev2_body(request) -> bytes:
    """A ModelInferRequest as the KServe v2 JSON body TorchServe 0.12 makes of it for its handler
    (``OpenInferenceProtocolImpl.modelInfer``: id, model_name, inputs with name, shape, datatype
    and the data as one flat list); raw_input_contents are read too, BYTES go as UTF-8 strings
    (what a REST client sends), input parameters as ``parameters``."""
    tensors, meta = decode_inputs(request)
    inputs = []
    for name, arr in tensors.items():
        datatype = next(i.datatype for i in request.inputs if i.name == name)
        entry: dict[str, Any] = {"name": name, "shape": list(arr.shape), "datatype": datatype,
                                 "data": to_json_data(arr, datatype)}
        if meta and meta.get(name):
            entry["parameters"] = meta[name]
        inputs.append(entry)
    body: dict[str, Any] = {"id": request.id, "model_name": request.model_name, "inputs": inputs}
    if request.outputs:
        body["outputs"] = [{"name": o.name} for o in request.outputs]
    return orjson.dumps(body)


def kservev2_outputs(body: bytes, model: str) -> list[tuple[str, np.ndarray, str]]:
    """The handler's KServe v2 JSON answer (the envelope's) as (name, array, datatype) outputs."""
    def broken(why: str) -> OspreyError:
        return OspreyError(ErrorKind.INTERNAL, f"model {model}: the handler's KServe v2 answer {why} "
                                               "(service_envelope=kservev2)")
    try:
        answer = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise broken("is not JSON") from None
    outputs = answer.get("outputs") if isinstance(answer, dict) else None
    if not isinstance(outputs, list):
        raise broken("has no 'outputs' list")
    out = []
    for o in outputs:
        if not isinstance(o, dict) or not isinstance(o.get("name"), str) or not isinstance(o.get("datatype"), str):
            raise broken(f"has an output without a name and datatype: {str(o)[:100]}")
        data = o.get("data", [])
        shape = o.get("shape") or [len(data) if isinstance(data, list) else 1]
        try:
            out.append((o["name"], decode_json(o["name"], o["datatype"], list(shape), data), o["datatype"]))
        except OspreyError as exc:
            raise broken(f"does not hold its output: {exc.message}") from None
    return out


class OpenInferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, dataplane: DataPlane, *, model_store: str, enable_model_api: bool, envelope: str = ""):
        self.dataplane = dataplane
        self.registry = dataplane.registry
        self.model_store = model_store
        self.enable_model_api = enable_model_api
        # service_envelope=kservev2: ModelInfer to a TorchServe-style handler goes through its KServe
        # v2 envelope, as REST /v2/models/{m}/infer does and as TorchServe's OIP gRPC does
        self.kservev2 = envelope == "kservev2"

    # --- health and metadata ----------------------------------------------------------
    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=self.dataplane.live())

    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=self.dataplane.ready())

    async def ModelReady(self, request, context):
        return pb.ModelReadyResponse(ready=self.dataplane.model_ready(request.name, request.version or None))

    async def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(**SERVER_METADATA)

    async def ModelMetadata(self, request, context):
        meta = model_metadata(self.registry, request.name, request.version or None)
        resp = pb.ModelMetadataResponse(name=meta["name"], versions=meta["versions"], platform=meta["platform"])
        for specs, target in ((meta["inputs"], resp.inputs), (meta["outputs"], resp.outputs)):
            for s in specs:
                target.add(name=s["name"], datatype=s["datatype"], shape=s["shape"])
        return resp

    # --- inference --------------------------------------------------------------------
    @staticmethod
    def _check_id(request) -> None:
        problem = client_id_problem(request.id) if request.id else None
        if problem is not None:
            raise bad_input(problem)

    def _core(self, request, context) -> Ticket:
        received = time.monotonic()
        self._check_id(request)
        # refused before the tensors are decoded (queue full, no instance, unknown model)
        if self.dataplane.refusing():  # refuse before decoding tensors while the queue is full
            self.dataplane.admit(request.model_name, request.model_version or None, Protocol.GRPC_V2)
        tensors, meta = decode_inputs(request)
        return new_request(Protocol.GRPC_V2, request.model_name, request.model_version, request_id=request.id,
                           tensors=tensors, tensor_meta=meta, outputs=[o.name for o in request.outputs] or None,
                           received=received, timeouts=(context.time_remaining(), timeout_of(_params(request.parameters))))

    @staticmethod
    def _encode(request, version: str, out: InferenceResponse, specs: list | None, requested) -> pb.ModelInferResponse:
        return encode_response(request, version, output_tensors(out, specs or [], requested))

    def _enveloped(self, request) -> bool:
        """kservev2 and a TorchServe-style handler (one that takes tensors is served as OIP)."""
        return self.kservev2 and not self.dataplane.model(request.model_name, request.model_version or None).accepts_tensors

    async def _infer_enveloped(self, request, context) -> pb.ModelInferResponse:
        """TorchServe's path: the request as a KServe v2 JSON body to the handler's envelope, its
        JSON answer back as the response (values as REST /v2/models/{m}/infer answers them)."""
        received = time.monotonic()
        self._check_id(request)
        if self.dataplane.refusing():
            self.dataplane.admit(request.model_name, request.model_version or None, Protocol.GRPC_V2)
        body = kservev2_body(request)
        core = new_request(Protocol.GRPC_V2, request.model_name, request.model_version or None, request_id=request.id,
                           fields={"body": Field(body, "application/json")},
                           headers={"explain": "False", "url_path": "", "body": {"content-type": "application/json"}},
                           received=received,
                           timeouts=(context.time_remaining(), timeout_of(_params(request.parameters))))
        context.set_trailing_metadata((("x-request-id", core.request.request_id),))
        out = await self.dataplane.infer(core)
        resp = encode_response(request, out.model_version, kservev2_outputs(out.body, request.model_name))
        resp.id = core.request.request_id
        return resp

    async def ModelInfer(self, request, context):
        if self._enveloped(request):
            return await self._infer_enveloped(request, context)
        core = self._core(request, context)
        # the request id (the client's id, else the one made here) in trailing metadata and in
        # the response's id: the id feedback joins on
        context.set_trailing_metadata((("x-request-id", core.request.request_id),))
        out = await self.dataplane.infer(core)
        resp = self._encode(request, out.model_version, out, out.output_specs, core.request.outputs)
        resp.id = core.request.request_id
        return resp

    async def _stream_one(self, request, context, out: Outbox) -> None:
        sink = None
        try:
            core = self._core(request, context)
            sink = StreamSink(asyncio.get_running_loop(), out.what, raw=True)  # (drained at once into out)
            core.stream = sink
            task = asyncio.ensure_future(self.dataplane.infer(core))
            task.add_done_callback(sink.close)
            try:
                async for item in sink:  # intermediate responses (decoupled models)
                    partial = InferenceResponse(tensors=item["tensors"]) if isinstance(item, dict) and "tensors" in item \
                        else InferenceResponse(body=item if isinstance(item, (bytes, bytearray)) else str(item).encode(),
                                               content_type="application/octet-stream")
                    _put(out, pb.ModelStreamInferResponse(infer_response=self._encode(
                        request, core.model_version, partial, core.output_specs, core.request.outputs)))
                result = task.result()
            finally:
                if not task.done():
                    task.cancel()
            final = self._encode(request, result.model_version, result, result.output_specs, core.request.outputs)
            final.id = core.request.request_id  # the id feedback joins on (the client's, else the one made here)
            _put(out, pb.ModelStreamInferResponse(infer_response=final))
        except OspreyError as err:
            _put(out, self._stream_error(request, err))
        except Exception as exc:  # never a request on the stream without an answer
            err = unexpected(exc, f"ModelStreamInfer for model {request.model_name!r:.100}")
            _put(out, self._stream_error(request, err))
        finally:
            if sink is not None:  # (ended or cancelled: what the handler still sends is dropped)
                sink.box.close()

    @staticmethod
    def _stream_error(request, err: OspreyError) -> pb.ModelStreamInferResponse:
        """An error in band; the request's id (and model) tell the client which request failed."""
        return pb.ModelStreamInferResponse(
            error_message=err.message,
            infer_response=pb.ModelInferResponse(model_name=request.model_name, model_version=request.model_version,
                                                 id=request.id))

    async def ModelStreamInfer(self, request_iterator, context):
        # what the call holds for its client, bounded: a client that stops reading is cut
        # (server.protocols.grpc.streams)
        out = Outbox(f"ModelStreamInfer from {context.peer()}", context)
        pending: set[asyncio.Task] = set()
        end = object()

        async def reader() -> None:
            try:
                async for request in request_iterator:
                    task = asyncio.ensure_future(self._stream_one(request, context, out))
                    pending.add(task)
                    task.add_done_callback(pending.discard)
                if pending:
                    await asyncio.gather(*pending, return_exceptions=True)
            finally:
                out.put(end)

        await begin(context)  # (before anything is made for the client: a cut's status must not carry it)
        read = asyncio.ensure_future(reader())
        try:
            while True:
                item = await out.get()
                if item is end:
                    break
                yield item
        finally:
            out.close()
            read.cancel()
            for task in list(pending):
                task.cancel()

    # --- repository -------------------------------------------------------------------
    async def RepositoryIndex(self, request, context):
        resp = pb.RepositoryIndexResponse()
        for m in repository_index(self.registry, self.model_store):
            if not request.ready or m["state"] == "READY":
                resp.models.add(name=m["name"], version=m.get("version", ""), state=m["state"], reason=m["reason"])
        return resp

    async def RepositoryModelLoad(self, request, context):
        await load_model(self.registry, self.model_store, request.model_name, self.enable_model_api)
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(self, request, context):
        await unload_model(self.registry, request.model_name, self.enable_model_api)
        return pb.RepositoryModelUnloadResponse()


def _put(out: Outbox, message: Any) -> None:
    """One answer of the stream into what the call holds, counted in its encoded bytes."""
    out.put(message, message.ByteSize())
