"""TorchServe's inference API (port 8080): /ping, /predictions, /explanations.

Translates HTTP into the core's request (:func:`~server.core.types.new_request`), calls the data plane,
and writes the answer back. Nothing else: queueing, batching and deadlines are the core's. A
handler that sends intermediate responses gets them to the client as the chunks of a chunked
answer (:mod:`server.protocols.rest.chunked`), as TorchServe does.
"""

from __future__ import annotations

import asyncio

from server.core.dataplane import DataPlane
from server.core.errors import NOT_FOUND_TEXT, ErrorKind, OspreyError
from server.core.types import Protocol, Ticket, new_request
from server.protocols.rest.asgi import Request, Response, Router, json_response
from server.protocols.rest.chunked import ChunkedAnswer
from server.protocols.rest.forms import fields_from_body
from server.protocols.rest.openapi import JSON, TS_ERROR, Doc

PING = {"type": "object", "properties": {"status": {"type": "string", "enum": ["Healthy", "Unhealthy"]}},
        "required": ["status"]}
# what a handler is given and answers: any body (JSON, raw bytes, a form), any content type
ANY_BODY = {"application/json": {}, "application/octet-stream": {"type": "string", "format": "binary"},
            "text/plain": {"type": "string"}}
ANSWER = {"application/json": {"schema": {}}, "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}
# TorchServe's status for a handler that raised (or answered a list of the wrong length) and
# for a full queue; a handler's PredictionException gives its own code
PREDICTION_FAILED = ("Prediction failed, or the model's queue is full (Retry-After)", JSON(TS_ERROR))
_MODEL = {"model": "A registered model's name", "version": "A version of the model",
          "rest": "Further path segments, given to the handler as request header url_path"}


def _predict_doc(explain: bool, path: str) -> Doc:
    what = "Explanations" if explain else "Predictions"
    version = "" if "version" not in path else (" of that version" if "rest" not in path else
                                                  ", with the rest of the path as header url_path")
    return Doc(f"{what} from the model{version} (the handler's answer)", body=ANY_BODY,
               responses={200: ("The handler's answer", ANSWER), 503: PREDICTION_FAILED}, path_params=_MODEL,
               tags=(what,))

__all__ = ["add_inference_routes", "answer", "to_core_request"]

PREDICT_METHODS = ("POST", "PUT", "GET")


def to_core_request(req: Request, model: str, version: str | None, *, explain: bool, url_path: str = "") -> Ticket:
    fields = fields_from_body(req.body, req.content_type)
    headers = req.headers  # this request's own dict: extend it in place
    headers["explain"] = "True" if explain else "False"
    headers["url_path"] = url_path
    for name, f in fields.items():
        headers.setdefault(name, {"content-type": f.content_type})  # TorchServe per-field entry
    return new_request(Protocol.REST, model, version, request_id=req.request_id, fields=fields, headers=headers,
                       client=req.connection())


async def answer(dataplane: DataPlane, req: Request, core: Ticket) -> Response:
    """The data plane's answer to ``core``; chunked when the handler streams intermediate parts."""
    chunks = core.stream = ChunkedAnswer(req, dataplane.loop or asyncio.get_running_loop())
    try:
        out = await dataplane.infer(core)
    except OspreyError as err:
        if chunks.started:
            return await chunks.fail(err)
        raise
    except BaseException:
        chunks.abandon()
        raise
    if chunks.started:
        return await chunks.finish(out.body)
    return Response(out.body, out.status, out.content_type, out.headers or None)


def add_inference_routes(router: Router, dataplane: DataPlane) -> None:
    async def ping(req: Request) -> Response:
        if dataplane.healthy():
            return json_response({"status": "Healthy"})
        return json_response({"status": "Unhealthy"}, status=500)

    def predictor(explain: bool):
        async def predict(req: Request) -> Response:
            p = req.params
            core = to_core_request(req, p["model"], p.get("version"), explain=explain, url_path=p.get("rest", ""))
            return await answer(dataplane, req, core)
        return predict

    router.refusing = dataplane.refusing  # admission runs only while requests are being refused

    def admit(params: dict) -> None:  # before the body is read (DataPlane.admit)
        dataplane.admit(params["model"], params.get("version"))

    for prefix, explain in (("/predictions", False), ("/explanations", True)):
        handler = predictor(explain)
        for path in (prefix + "/{model}", prefix + "/{model}/{version}", prefix + "/{model}/{version}/{rest:path}"):
            router.add(PREDICT_METHODS, path, handler, admit=admit, doc=_predict_doc(explain, path))
    router.add(("GET",), "/ping", ping, doc=Doc(
        "Health: Healthy while every model has its minimum of live workers",
        responses={200: ("Healthy", JSON(PING)), 500: ("Unhealthy", JSON(PING))}, tags=("Health",)))

    async def v1_predict(req: Request) -> Response:  # KServe v1: /v1/models/{m}:predict
        model, _, verb = req.params["target"].rpartition(":")
        if verb not in ("predict", "explain") or not model:
            raise OspreyError(ErrorKind.NOT_FOUND, NOT_FOUND_TEXT,
                              type_name="ResourceNotFoundException")
        core = to_core_request(req, model, None, explain=verb == "explain")
        return await answer(dataplane, req, core)

    def v1_admit(params: dict) -> None:
        model, _, verb = params["target"].rpartition(":")
        if verb in ("predict", "explain") and model:
            dataplane.admit(model, None)

    router.add(("POST",), "/v1/models/{target}", v1_predict, admit=v1_admit, doc=Doc(
        "KServe v1: /v1/models/{model}:predict or :explain", body=ANY_BODY,
        responses={200: ("The handler's answer", ANSWER), 503: PREDICTION_FAILED},
        path_params={"target": "The model's name, then :predict or :explain"}, tags=("KServe v1",)))
