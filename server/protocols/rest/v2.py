"""Open Inference Protocol (KServe v2 / Triton) over REST, on the inference port.

Health, server and model metadata, readiness, infer with the binary tensor data extension
(``Inference-Header-Content-Length``: JSON header, then raw input bytes viewed in place),
and the repository extension (index, load, unload). Every error is ``{"error": ...}``.

With ``service_envelope=kservev2`` (TorchServe's KServe v2 envelope), ``/v2/models/{m}/infer``
and ``/v2/models/{m}/explain`` serve a TorchServe-style handler as TorchServe does: the body
goes to the handler's envelope as it came (handlers/envelopes.py reads it and writes the
answer), errors are TorchServe's ``{"code", "type", "message"}``. A handler that takes tensors
itself is still served by this protocol (infer; explain is not part of it).
"""

from __future__ import annotations

import time
from typing import Any

import orjson

from server.core.dataplane import DataPlane
from server.protocols.oip import (SERVER_METADATA, load_model, model_metadata, output_tensors, repository_index,
                                  timeout_of, unload_model)
from server.core.tensors import DTYPES, bad_input, decode_bytes, decode_json, decode_raw, encode_raw, to_json_data
from server.core.types import Protocol, client_id_problem, new_request
from server.core.errors import ErrorKind, OspreyError
from server.protocols.rest.asgi import Request, Response, Router, oip_error, torchserve_error
from server.protocols.rest.inference import answer, to_core_request
from server.protocols.rest.openapi import JSON, OIP_ERROR, TS_ERROR, Doc, Param

_TENSOR = {"type": "object", "properties": {"name": {"type": "string"}, "datatype": {"type": "string"},
                                            "shape": {"type": "array", "items": {"type": "integer"}},
                                            "parameters": {"type": "object"}, "data": {}},
           "required": ["name", "datatype", "shape"]}
INFER_REQUEST = {"type": "object", "properties": {
    "id": {"type": "string"}, "parameters": {"type": "object"},
    "inputs": {"type": "array", "items": _TENSOR, "minItems": 1},
    "outputs": {"type": "array", "items": {"type": "object", "properties": {"name": {"type": "string"},
                                                                             "parameters": {"type": "object"}},
                                           "required": ["name"]}}},
    "required": ["inputs"]}
INFER_RESPONSE = {"type": "object", "properties": {
    "model_name": {"type": "string"}, "model_version": {"type": "string"}, "id": {"type": "string"},
    "parameters": {"type": "object"}, "outputs": {"type": "array", "items": _TENSOR}},
    "required": ["model_name", "outputs"]}
_TENSOR_META = {"type": "object", "properties": {"name": {"type": "string"}, "datatype": {"type": "string"},
                                                 "shape": {"type": "array", "items": {"type": "integer"}}}}
MODEL_METADATA = {"type": "object", "properties": {
    "name": {"type": "string"}, "versions": {"type": "array", "items": {"type": "string"}},
    "platform": {"type": "string"}, "inputs": {"type": "array", "items": _TENSOR_META},
    "outputs": {"type": "array", "items": _TENSOR_META}}, "required": ["name", "platform", "inputs", "outputs"]}
SERVER_METADATA_SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string"}, "version": {"type": "string"}, "extensions": {"type": "array", "items": {"type": "string"}}},
    "required": ["name", "version", "extensions"]}
_NAMES = {"model": "A model's name", "version": "A version of the model"}
_TAG = ("Open Inference Protocol",)

__all__ = ["add_v2_routes", "parse_infer_body", "encode_infer_response"]

_HEADER = "inference-header-content-length"
_JSON = "application/json"


def _json(obj: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(obj), status, _JSON)


def _flag(params: dict | None, key: str) -> bool:
    return bool(params and params.get(key))


def parse_infer_body(body: bytes, header_length: str | None, default_input: dict | None = None):
    """(request JSON, {name: array}, {name: input parameters}) from an infer body."""
    if header_length is not None:
        try:
            n = int(header_length)
        except ValueError:
            raise bad_input(f"Inference-Header-Content-Length {header_length!r} is not a number") from None
        if n < 0 or n > len(body):
            raise bad_input(f"Inference-Header-Content-Length {n} is outside the body of {len(body)} bytes")
        if n == 0:  # the whole body is one raw input
            if default_input is None:
                raise bad_input("a body without a JSON header needs a model with exactly one declared input")
            shape = list(default_input["shape"])
            spec = {"name": default_input["name"], "datatype": default_input["datatype"], "shape": shape,
                    "parameters": {"binary_data_size": len(body)}}
            if shape.count(-1) == 1:  # the one variable dimension: what the body holds
                known = 1
                for d in shape:
                    known *= d if d != -1 else 1
                if spec["datatype"] == "BYTES":
                    elements = len(decode_bytes(spec["name"], body))
                    shape[shape.index(-1)] = elements // known if known else 0
                elif spec["datatype"] in DTYPES:  # (an unknown one is reported by decode_raw)
                    size = DTYPES[spec["datatype"]].itemsize * known
                    if size and len(body) % size:
                        raise bad_input(f"Inference-Header-Content-Length 0: the body ({len(body)} bytes) is the raw "
                                        f"data of input '{spec['name']}', declared {spec['datatype']} "
                                        f"{default_input['shape']}; it is not a whole number of "
                                        f"{size}-byte rows")
                    shape[shape.index(-1)] = len(body) // size if size else 0
            request, binary = {"inputs": [spec]}, memoryview(body)
        else:
            request, binary = _loads(body[:n]), memoryview(body)[n:]
    else:
        request, binary = _loads(body), None
    if not isinstance(request, dict):
        raise bad_input("the request body must be a JSON object")
    _check_request(request)
    inputs = request.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise bad_input("the request needs a non-empty 'inputs' list")
    tensors, meta, offset = {}, {}, 0
    for i, item in enumerate(inputs):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise bad_input(f"inputs[{i}] needs a 'name'")
        name = item["name"]
        if name in tensors:
            raise bad_input(f"input '{name}' appears more than once in 'inputs'")
        datatype, shape = item.get("datatype"), item.get("shape")
        if not isinstance(datatype, str):
            raise bad_input(f"input '{name}': 'datatype' is required")
        if not isinstance(shape, list):
            raise bad_input(f"input '{name}': 'shape' must be a list of integers")
        params = _parameters(item, f"input '{name}'")
        ctype = params.get("content_type")
        if ctype is not None and not isinstance(ctype, str):
            raise bad_input(f"input '{name}': parameter 'content_type' must be a string, got {ctype!r}")
        size = params.get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise bad_input(f"input '{name}': parameter 'binary_data_size' must be a non-negative integer, "
                                f"got {size!r}")
            if binary is None:
                raise bad_input(f"input '{name}': binary_data_size is set but the request has no binary data "
                                f"(no Inference-Header-Content-Length header)")
            if "data" in item:
                raise bad_input(f"input '{name}' carries its data twice, in 'data' and as binary data "
                                f"(binary_data_size); send one")
            if offset + size > len(binary):
                raise bad_input(f"input '{name}': binary_data_size {size} runs past the binary data of the body "
                                f"({len(binary) - offset} bytes left)")
            tensors[name] = decode_raw(name, datatype.upper(), shape, binary[offset:offset + size])
            offset += size
        elif "data" in item:
            tensors[name] = decode_json(name, datatype.upper(), shape, item["data"])
        else:
            raise bad_input(f"input '{name}' has neither 'data' nor binary_data_size")
        if params:
            meta[name] = params
    if binary is not None and offset != len(binary):
        raise bad_input(f"the body holds {len(binary) - offset} bytes of binary data no input claims")
    return request, tensors, meta


def _parameters(obj: dict, where: str) -> dict:
    """``obj``'s ``parameters``: a JSON object, or {} when absent or null."""
    params = obj.get("parameters")
    if params is None:
        return {}
    if not isinstance(params, dict):
        raise bad_input(f"{where}: 'parameters' must be a JSON object, got {type(params).__name__} {params!r:.60}")
    return params


def _check_flag(params: dict, key: str, where: str) -> None:
    if key in params and not isinstance(params[key], bool):
        raise bad_input(f"{where}: parameter '{key}' must be true or false, got {params[key]!r:.60}")


def _check_request(request: dict) -> None:
    """Request- and output-level fields a response is built from, checked before inference runs."""
    params = _parameters(request, "the request")
    _check_flag(params, "binary_data_output", "the request")
    rid = request.get("id")
    if rid is not None and not isinstance(rid, str):
        raise bad_input(f"'id' must be a string, got {type(rid).__name__}")
    problem = client_id_problem(rid) if rid else None
    if problem is not None:
        raise bad_input(problem)
    outputs = request.get("outputs")
    if outputs is None:
        return
    if not isinstance(outputs, list):
        raise bad_input(f"'outputs' must be a list of {{\"name\": ...}} objects, got {type(outputs).__name__}")
    for i, out in enumerate(outputs):
        if not isinstance(out, dict) or not isinstance(out.get("name"), str):
            raise bad_input(f"outputs[{i}] must be an object with a string 'name'")
        where = f"output '{out['name']}'"
        _check_flag(_parameters(out, where), "binary_data", where)


def _loads(data: bytes | memoryview) -> Any:
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise bad_input(f"the request body is not valid JSON: {exc}") from None


def encode_infer_response(model: str, version: str, request: dict, outputs: list,
                          request_id: str | None = None) -> Response:
    """JSON, or JSON header plus binary outputs where the request asked for them. The ``id`` is
    the request's, else ``request_id`` (the one made here: feedback joins on it, as over gRPC)."""
    wanted = {o.get("name"): o.get("parameters") or {} for o in request.get("outputs") or () if isinstance(o, dict)}
    all_binary = _flag(request.get("parameters"), "binary_data_output")
    head: dict[str, Any] = {"model_name": model, "model_version": version}
    if "id" in request:
        head["id"] = request["id"]
    elif request_id:
        head["id"] = request_id
    metas, chunks = [], []
    for name, arr, dt in outputs:
        meta: dict[str, Any] = {"name": name, "datatype": dt, "shape": list(arr.shape)}
        params = wanted.get(name)
        binary = params.get("binary_data", all_binary) if params is not None else all_binary
        if binary:
            raw = encode_raw(arr, dt)
            meta["parameters"] = {"binary_data_size": len(raw) if not isinstance(raw, memoryview) else raw.nbytes}
            chunks.append(raw)
        else:
            meta["data"] = to_json_data(arr, dt)
        metas.append(meta)
    head["outputs"] = metas
    header = orjson.dumps(head)
    if not chunks:
        return Response(header, 200, _JSON)
    return Response(b"".join([header, *chunks]), 200, "application/octet-stream",
                    {_HEADER: str(len(header))})


def add_v2_routes(router: Router, dataplane: DataPlane, *, model_store: str, enable_model_api: bool,
                  envelope: str = "") -> None:
    registry = dataplane.registry
    kservev2 = envelope == "kservev2"
    router.fallback_errors.append(("/v2", oip_error))

    def add(methods, pattern, handler, auth=True, admit=None, doc=None):
        router.add(methods, pattern, handler, errors=oip_error, auth=auth, admit=admit, doc=doc)

    router.refusing = dataplane.refusing  # admission runs only while requests are being refused

    def admit(params: dict) -> None:  # before the body is read (DataPlane.admit)
        dataplane.admit(params["model"], params.get("version"), Protocol.REST_V2)

    async def live(req: Request) -> Response:
        return _json({"live": dataplane.live()})

    async def ready(req: Request) -> Response:
        ok = dataplane.ready()
        return _json({"ready": ok}, 200 if ok else 503)

    async def server_metadata(req: Request) -> Response:
        return _json(SERVER_METADATA)

    async def metadata(req: Request) -> Response:
        return _json(model_metadata(registry, req.params["model"], req.params.get("version")))

    async def model_ready(req: Request) -> Response:
        name = req.params["model"]
        ok = dataplane.model_ready(name, req.params.get("version"))
        return _json({"name": name, "ready": ok}, 200 if ok else 503)

    async def enveloped(req: Request, explain: bool) -> Response:
        """TorchServe's KServe v2 envelope: the body to the handler as it came, its answer back."""
        try:
            core = to_core_request(req, req.params["model"], req.params.get("version"), explain=explain)
            return await answer(dataplane, req, core)
        except OspreyError as err:
            return torchserve_error(err)

    def takes_tensors(req: Request) -> bool:
        return dataplane.model(req.params["model"], req.params.get("version")).accepts_tensors

    async def explain(req: Request) -> Response:
        if takes_tensors(req):
            raise OspreyError(ErrorKind.NOT_FOUND, f"model {req.params['model']} takes tensors: explain is served "
                                                   "for TorchServe-style handlers only (service_envelope=kservev2)")
        return await enveloped(req, True)

    async def infer(req: Request) -> Response:
        if kservev2 and not takes_tensors(req):
            return await enveloped(req, False)
        received = time.monotonic()
        name, version = req.params["model"], req.params.get("version")
        header = req.headers.get(_HEADER)
        default_input = None
        if header is not None and header.strip() == "0":
            inputs = dataplane.model(name, version).signature.inputs
            default_input = inputs[0] if len(inputs) == 1 else None
        request, tensors, meta = parse_infer_body(req.body, header, default_input)
        params = request.get("parameters")
        requested = [o.get("name") for o in request.get("outputs") or () if isinstance(o, dict)] or None
        core = new_request(Protocol.REST_V2, name, version, request_id=request.get("id") or req.request_id,
                           tensors=tensors, tensor_meta=meta or None, outputs=requested, headers=req.headers,
                           received=received, timeouts=(timeout_of(params if isinstance(params, dict) else None),),
                           client=req.connection())
        req.request_id = core.request.request_id  # x-request-id is the OIP id: the one feedback joins on
        out = await dataplane.infer(core)
        return encode_infer_response(name, out.model_version, request,
                                     output_tensors(out, out.output_specs, requested), core.request.request_id)

    def repository_body(req: Request) -> dict:
        body = _loads(req.body) if req.body else {}
        if not isinstance(body, dict):
            raise bad_input("the request body must be a JSON object (the repository extension's request)")
        return body

    async def index(req: Request) -> Response:
        body = repository_body(req)
        models = repository_index(registry, model_store)
        if body.get("ready"):
            models = [m for m in models if m["state"] == "READY"]
        return _json(models)

    async def load(req: Request) -> Response:
        repository_body(req)
        await load_model(registry, model_store, req.params["model"], enable_model_api)
        return _json({})

    async def unload(req: Request) -> Response:
        repository_body(req)
        await unload_model(registry, req.params["model"], enable_model_api)
        return _json({})

    def doc(summary: str, ok: dict | None = None, alt: tuple[int, str] | None = None, extra: dict | None = None,
            **kw) -> Doc:
        responses = {200: ("OK", ok), **(extra or {})}
        if alt:
            responses[alt[0]] = (alt[1], ok)
        return Doc(summary, responses=responses, path_params=_NAMES, tags=_TAG, **kw)

    readiness = {"type": "object", "properties": {"ready": {"type": "boolean"}, "name": {"type": "string"}},
                 "required": ["ready"]}
    add("GET", "/v2", server_metadata, doc=doc("Server metadata", JSON(SERVER_METADATA_SCHEMA)))
    # server health answers without a token, so load balancers and Kubernetes probes work
    add("GET", "/v2/health/live", live, auth=False, doc=doc("Server liveness", JSON(
        {"type": "object", "properties": {"live": {"type": "boolean"}}, "required": ["live"]})))
    add("GET", "/v2/health/ready", ready, auth=False, doc=doc("Server readiness: every model ready", JSON(readiness),
                                                              (503, "Not ready")))
    for base in ("/v2/models/{model}", "/v2/models/{model}/versions/{version}"):
        add("GET", base, metadata, doc=doc("Model metadata: its inputs and outputs", JSON(MODEL_METADATA)))
        add("GET", base + "/ready", model_ready, doc=doc("Model readiness", JSON(readiness), (503, "Not ready")))
        add("POST", base + "/infer", infer, admit=admit, doc=doc(
            "Inference (JSON, or the binary tensor data extension with Inference-Header-Content-Length)",
            {**JSON(INFER_RESPONSE), "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
            body={**JSON(INFER_REQUEST), "application/octet-stream": {"type": "string", "format": "binary"}},
            extra={503: ("The model failed, or its queue is full (Retry-After)", JSON(OIP_ERROR))},
            body_required=True, params=(Param("Inference-Header-Content-Length", "integer", where="header",
                                              description="Bytes of JSON before the binary data"),)))
        if kservev2:
            add("POST", base + "/explain", explain, admit=admit, doc=doc(
                "Explanations in KServe v2 JSON (service_envelope=kservev2; TorchServe-style handlers)",
                JSON(INFER_RESPONSE), body=JSON(INFER_REQUEST), body_required=True,
                extra={503: ("The model failed, or its queue is full (Retry-After)", JSON(TS_ERROR))}))
    add("POST", "/v2/repository/index", index, doc=doc(
        "The model repository's models and their states", JSON({"type": "array", "items": {"type": "object", "properties": {
            "name": {"type": "string"}, "version": {"type": "string"}, "state": {"type": "string"},
            "reason": {"type": "string"}}}}),
        body=JSON({"type": "object", "properties": {"ready": {"type": "boolean"}}})))
    add("POST", "/v2/repository/models/{model}/load", load, doc=doc(
        "Load a model from the model store (with --enable-model-api)", JSON({"type": "object"})))
    add("POST", "/v2/repository/models/{model}/unload", unload, doc=doc(
        "Unload a model (with --enable-model-api)", JSON({"type": "object"})))
