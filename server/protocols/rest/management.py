"""TorchServe's management API (port 8081): register, scale, describe, list, unregister,
set-default; same parameters, status codes and JSON bodies. Also Osprey's traffic routes:
``GET/PUT /models/{m}/traffic``, ``PUT/DELETE /models/{m}/shadow``, ``POST /models/{m}/rollback``
(a version named traffic, shadow or rollback cannot be described or scaled by URL)."""

from __future__ import annotations

import inspect
from typing import Any, Awaitable, Callable

import orjson

from server.core.errors import NOT_FOUND_TEXT, ErrorKind, OspreyError, show
from server.core.registry import Registry
from server.protocols import management as api
from server.protocols.rest.asgi import Request, Response, Router, json_response
from server.protocols.rest.openapi import JSON, STATUS, TS_ERROR, Doc, query

_NAMES = {"model": "A registered model's name", "version": "A version of the model (describe: or all)"}
_TAG = ("Management",)
_TRAFFIC_TAG = ("Traffic",)

REGISTER_PARAMS = (
    query("url", description="The archive: a .mar file (or folder) in the model store"),
    query("model_name", description="The name to register under (default: the archive's)"),
    query("runtime", description="The handler's runtime (python)"),
    query("handler", description="The handler, overriding the archive's"),
    query("batch_size", "integer", "The most requests in one batch"),
    query("max_batch_delay", "number", "The longest wait in milliseconds to fill a batch"),
    query("initial_workers", "integer", "Workers to start"),
    query("synchronous", "boolean", "Answer once the workers are up (default true)"),
    query("response_timeout", "number", "Seconds a prediction may take"),
    query("startup_timeout", "number", "Seconds a worker may take to load the model"),
)
# the same fields as a JSON body
REGISTER_BODY = {"type": "object", "properties": {
    p.name: {"type": p.type} for p in REGISTER_PARAMS}}
SCALE_PARAMS = (query("min_worker", "integer", "The fewest workers"), query("max_worker", "integer", "The most workers"),
                query("synchronous", "boolean", "Answer once the workers are up (default false)"))
SCALE_BODY = {"type": "object", "properties": {p.name: {"type": p.type} for p in SCALE_PARAMS}}
_WORKER = {"type": "object", "properties": {"id": {"type": "string"}, "startTime": {"type": "string"},
                                            "status": {"type": "string"}, "memoryUsage": {"type": "integer"},
                                            "pid": {"type": "integer"}, "gpu": {"type": "boolean"},
                                            "gpuUsage": {"type": "string"}}}
DESCRIPTION = {"type": "array", "items": {"type": "object", "properties": {
    "modelName": {"type": "string"}, "modelVersion": {"type": "string"}, "modelUrl": {"type": "string"},
    "runtime": {"type": "string"}, "minWorkers": {"type": "integer"}, "maxWorkers": {"type": "integer"},
    "batchSize": {"type": "integer"}, "maxBatchDelay": {"type": "integer"}, "loadedAtStartup": {"type": "boolean"},
    "workers": {"type": "array", "items": _WORKER}}, "required": ["modelName", "modelVersion"]}}
MODEL_LIST = {"type": "object", "properties": {
    "nextPageToken": {"type": "string"},
    "models": {"type": "array", "items": {"type": "object", "properties": {
        "modelName": {"type": "string"}, "modelUrl": {"type": "string"}}}}}, "required": ["models"]}
TRAFFIC_BODY = {"type": "object", "properties": {"weights": {"type": "object", "additionalProperties": {"type": "number"},
                                                             "nullable": True}},
                "required": ["weights"]}
SHADOW_BODY = {"type": "object", "properties": {"version": {"type": "string"}}, "required": ["version"]}
_OBJ = JSON({"type": "object"})

__all__ = ["add_management_routes", "query_params", "str_param", "int_param", "float_param"]


def query_params(req: Request) -> dict[str, Any]:
    """Query parameters, or the same fields as a JSON body."""
    params: dict[str, Any] = dict(req.query)
    if req.body and req.content_type.startswith("application/json"):
        try:
            body = orjson.loads(req.body)
        except orjson.JSONDecodeError as exc:
            raise OspreyError(ErrorKind.BAD_INPUT, f"request body is not valid JSON: {exc}") from None
        if not isinstance(body, dict):
            raise OspreyError(ErrorKind.BAD_INPUT, "request body must be a JSON object")
        params.update(body)
    return params


def str_param(params: dict, key: str) -> str | None:
    """A text parameter; a JSON body may not give a number, list or object instead."""
    value = params.get(key)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise OspreyError(ErrorKind.BAD_INPUT, f"Parameter {key} must be a string, got {show(value)}")
    return value


# Text that is not a number at all is taken as "not given", and text that is not "true" as
# false: TorchServe reads its query parameters so (NettyUtils.getIntParameter falls back to the
# default, Boolean.parseBoolean), and its clients and tests send batch_size=dd,
# max_batch_delay=junk, synchronous=-1 or synchronous=Nan expecting that. A number out of range
# (batch_size=0, NaN, infinity) and a JSON value of the wrong type are still refused, 400.
def int_param(params: dict, key: str, default: int | None = None) -> int | None:
    """A whole number (ranges are the registry's to check: it names the limit)."""
    value = params.get(key)
    if value is None or value == "":
        return default
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            return default
    raise OspreyError(ErrorKind.BAD_INPUT, f"Parameter {key} must be an integer, got {show(value)}")


def float_param(params: dict, key: str) -> float | None:
    """A finite number (NaN and infinity are refused here, ranges by the registry)."""
    value = params.get(key)
    if value is None or value == "":
        return None
    if isinstance(value, str):
        try:
            float(value)
        except ValueError:
            return None  # not a number at all: not given
    try:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise TypeError
        out = float(value)
    except (TypeError, ValueError, OverflowError):
        out = None
    if out is None or out != out or out in (float("inf"), float("-inf")):
        raise OspreyError(ErrorKind.BAD_INPUT, f"Parameter {key} must be a finite number, got {show(value)}")
    return out


def _bool(params: dict, key: str, default: bool) -> bool:
    value = params.get(key)
    if value is None or value == "":
        return default
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        return value.strip().lower() in ("true", "1", "yes")
    raise OspreyError(ErrorKind.BAD_INPUT, f"Parameter {key} must be true or false, got {show(value)}")


def _json_body(req: Request) -> Any:
    """The request body as JSON (whatever its content type says); BAD_INPUT when it is not."""
    if not req.body:
        raise OspreyError(ErrorKind.BAD_INPUT, "a JSON request body is required")
    try:
        return orjson.loads(req.body)
    except orjson.JSONDecodeError as exc:
        raise OspreyError(ErrorKind.BAD_INPUT, f"request body is not valid JSON: {exc}") from None


def _add_traffic_routes(router: Router, registry: Registry) -> None:
    """Canary weights, shadow and rollback (server.core.routing): Osprey's own routes."""
    async def get_traffic(req: Request) -> Response:
        return json_response(api.traffic(registry, req.params["model"]))

    async def put_traffic(req: Request) -> Response:
        return json_response(await api.set_traffic(registry, req.params["model"], _json_body(req)))

    async def put_shadow(req: Request) -> Response:
        return json_response(await api.set_shadow(registry, req.params["model"], _json_body(req)))

    async def delete_shadow(req: Request) -> Response:
        return json_response(await api.clear_shadow(registry, req.params["model"]))

    async def rollback(req: Request) -> Response:
        return json_response(await api.rollback(registry, req.params["model"]))

    def doc(summary: str, body: dict | None = None) -> Doc:
        return Doc(summary, body=JSON(body) if body else None, body_required=body is not None,
                   responses={200: ("The model's traffic", _OBJ)}, path_params=_NAMES, tags=_TRAFFIC_TAG)

    router.add("GET", "/models/{model}/traffic", get_traffic,
               doc=doc("Traffic: the default version, canary weights and shares, shadow, previous defaults"))
    router.add("PUT", "/models/{model}/traffic", put_traffic,
               doc=doc('Set canary weights: {"weights": {"1.0": 90, "2.0": 10}}', TRAFFIC_BODY))
    router.add("PUT", "/models/{model}/shadow", put_shadow,
               doc=doc('Copy requests to a shadow version: {"version": "2.0"}', SHADOW_BODY))
    router.add("DELETE", "/models/{model}/shadow", delete_shadow, doc=doc("Stop the shadow copies"))
    router.add("POST", "/models/{model}/rollback", rollback,
               doc=doc("Make the previous default version the default again"))


def add_management_routes(router: Router, registry: Registry, *, enable_model_api: bool,
                          rotate_key: Callable[[str, str], bool | Awaitable[bool]] | None = None,
                          custom_metadata: api.CustomMetadata | None = None) -> None:
    async def list_models(req: Request) -> Response:
        p = query_params(req)
        return json_response(api.list_models(registry, int_param(p, "limit", 100), int_param(p, "next_page_token", 0)))

    async def register(req: Request) -> Response:
        p = query_params(req)
        url = "" if p.get("url") == "" else str_param(p, "url")  # given empty: 404 "empty url", as in TorchServe
        body = await api.register(
            registry, enable_model_api, url, synchronous=_bool(p, "synchronous", True),
            model_name=str_param(p, "model_name"), runtime=str_param(p, "runtime"),
            handler=str_param(p, "handler"), batch_size=int_param(p, "batch_size"), max_batch_delay=float_param(p, "max_batch_delay"),
            initial_workers=int_param(p, "initial_workers"), response_timeout=float_param(p, "response_timeout"),
            startup_timeout=float_param(p, "startup_timeout"))
        return json_response(body, status=202 if body is api.PROCESSING else 200)

    async def describe(req: Request) -> Response:
        model, version = req.params["model"], req.params.get("version")
        if custom_metadata is not None and _bool(query_params(req), "customized", False):
            headers = {k: v for k, v in req.headers.items() if k != "authorization"}  # not the management key
            return json_response(await api.describe_customized(registry, model, version, custom_metadata, headers))
        return json_response(api.describe_models(registry, model, version))

    async def scale(req: Request) -> Response:
        p = query_params(req)
        synchronous = _bool(p, "synchronous", False)
        body = await api.scale(registry, req.params["model"], req.params.get("version"), int_param(p, "min_worker"),
                               int_param(p, "max_worker"), synchronous=synchronous)
        return json_response(body, status=202 if body is api.PROCESSING else 200)

    async def unregister(req: Request) -> Response:
        return json_response(await api.unregister(registry, enable_model_api, req.params["model"],
                                                  req.params.get("version")))

    async def set_default(req: Request) -> Response:
        return json_response(await api.set_default(registry, req.params["model"], req.params["version"]))

    async def token(req: Request) -> Response:
        """``GET`` (TorchServe's clients) or ``POST /token?type=inference|management`` with the API
        key: a new key of that type, written to the key file; 200 with no JSON in the body, as
        TorchServe answers. A wrong key or type is the token failure (401, or 400 with
        token_auth_status=400, TorchServe's status)."""
        if rotate_key is None:  # token authorization is off: TorchServe has no such resource then
            raise OspreyError(ErrorKind.NOT_FOUND, NOT_FOUND_TEXT, type_name="ResourceNotFoundException")
        kind = req.query.get("type", "")
        auth = req.headers.get("authorization", "")
        rotated = auth[:7].lower() == "bearer " and rotate_key(kind, auth[7:].strip())
        if inspect.isawaitable(rotated):  # keys shared through Redis (auth.Keys.rotate_shared)
            rotated = await rotated
        if not rotated:
            raise OspreyError(ErrorKind.UNAUTHORIZED,
                              "Token Authentication failed. Token either incorrect, expired, or not provided correctly",
                              status=router.auth_status)
        return Response(b"\n", 200, "application/json")

    status = JSON(STATUS)
    listing = Doc("List the registered models", params=(
        query("limit", "integer", "The most models in one page (default 100)"),
        query("next_page_token", "integer", "Where the page starts (the last page's nextPageToken)")),
        responses={200: ("A page of models", JSON(MODEL_LIST))}, tags=_TAG)
    # the 500s are TorchServe's answers, matched (server/protocols/management.py, registry.py)
    error = JSON(TS_ERROR)
    registering = Doc("Register a model from the model store (with --enable-model-api)", params=REGISTER_PARAMS,
                      body=JSON(REGISTER_BODY), responses={
                          200: ("Registered", status), 202: ("Registering (synchronous=false)", status),
                          500: ("As TorchServe: an http(s) url whose file is already in the model store "
                                "(\"Model file already exists\"), or startup_timeout=0 with workers to start", error)},
                      tags=_TAG)
    describing = Doc("Describe a model (its default version, a version, or all)", path_params=_NAMES,
                     params=(query("customized", "boolean", "true: add customizedMetadata, what the handler's "
                                   "describe_handle() answers (run through the version's queue, as TorchServe)"),),
                     responses={200: ("The versions described", JSON(DESCRIPTION)),
                                503: ("customized=true and the handler's describe_handle failed", JSON(TS_ERROR))},
                     tags=_TAG)
    scaling = Doc("Scale a model's workers", params=SCALE_PARAMS, body=JSON(SCALE_BODY), path_params=_NAMES,
                  responses={200: ("Scaled", status), 202: ("Scaling (synchronous=false)", status),
                             500: ("As TorchServe: a negative min_worker, or workers that failed to start "
                                   "(synchronous)", error)}, tags=_TAG)
    unregistering = Doc("Unregister a model or one version (with --enable-model-api)", path_params=_NAMES,
                        responses={200: ("Unregistered", status)}, tags=_TAG)
    router.add("GET", "/models", list_models, doc=listing)
    router.add("POST", "/models", register, doc=registering)
    router.add("GET", "/models/{model}", describe, doc=describing)
    _add_traffic_routes(router, registry)  # before /models/{model}/{version}: these words are not versions
    router.add("GET", "/models/{model}/{version}", describe, doc=describing)
    router.add("PUT", "/models/{model}", scale, doc=scaling)
    router.add("PUT", "/models/{model}/{version}", scale, doc=scaling)
    router.add("DELETE", "/models/{model}", unregister, doc=unregistering)
    router.add("DELETE", "/models/{model}/{version}", unregister, doc=unregistering)
    router.add("PUT", "/models/{model}/{version}/set-default", set_default, doc=Doc(
        "Make a version the model's default", path_params=_NAMES, responses={200: ("Done", status)}, tags=_TAG))
    router.add(("GET", "POST"), "/token", token, auth=False, doc=Doc(
        "Rotate a key (with the API key as bearer token): a new key of that type in the key file",
        params=(query("type", description="Which key", enum=("inference", "management")),),
        responses={200: ("Rotated", None)}, tags=("Token authorization",)))
