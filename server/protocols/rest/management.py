"""TorchServe's management API (port 8081): register, scale, describe, list, unregister,
set-default; same parameters, status codes and JSON bodies. Also Osprey's traffic routes:
``GET/PUT /models/{m}/traffic``, ``PUT/DELETE /models/{m}/shadow``, ``POST /models/{m}/rollback``
(a version named traffic, shadow or rollback cannot be described or scaled by URL)."""

from __future__ import annotations

from typing import Any, Callable

import orjson

from server.core.errors import ErrorKind, OspreyError, show
from server.core.registry import Registry
from server.protocols import management as api
from server.protocols.rest.asgi import Request, Response, Router, json_response

__all__ = ["add_management_routes"]


def _params(req: Request) -> dict[str, Any]:
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


def _str(params: dict, key: str) -> str | None:
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
def _int(params: dict, key: str, default: int | None = None) -> int | None:
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


def _float(params: dict, key: str) -> float | None:
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
        return json_response(api.set_traffic(registry, req.params["model"], _json_body(req)))

    async def put_shadow(req: Request) -> Response:
        return json_response(api.set_shadow(registry, req.params["model"], _json_body(req)))

    async def delete_shadow(req: Request) -> Response:
        return json_response(api.clear_shadow(registry, req.params["model"]))

    async def rollback(req: Request) -> Response:
        return json_response(api.rollback(registry, req.params["model"]))

    router.add("GET", "/models/{model}/traffic", get_traffic)
    router.add("PUT", "/models/{model}/traffic", put_traffic)
    router.add("PUT", "/models/{model}/shadow", put_shadow)
    router.add("DELETE", "/models/{model}/shadow", delete_shadow)
    router.add("POST", "/models/{model}/rollback", rollback)


def add_management_routes(router: Router, registry: Registry, *, enable_model_api: bool,
                          rotate_key: Callable[[str, str], bool] | None = None) -> None:
    async def list_models(req: Request) -> Response:
        p = _params(req)
        return json_response(api.list_models(registry, _int(p, "limit", 100), _int(p, "next_page_token", 0)))

    async def register(req: Request) -> Response:
        p = _params(req)
        url = "" if p.get("url") == "" else _str(p, "url")  # given empty: 404 "empty url", as in TorchServe
        body = await api.register(
            registry, enable_model_api, url, synchronous=_bool(p, "synchronous", True),
            model_name=_str(p, "model_name"), runtime=_str(p, "runtime"),
            handler=_str(p, "handler"), batch_size=_int(p, "batch_size"), max_batch_delay=_float(p, "max_batch_delay"),
            initial_workers=_int(p, "initial_workers"), response_timeout=_float(p, "response_timeout"),
            startup_timeout=_float(p, "startup_timeout"))
        return json_response(body, status=202 if body is api.PROCESSING else 200)

    async def describe(req: Request) -> Response:
        return json_response(api.describe_models(registry, req.params["model"], req.params.get("version")))

    async def scale(req: Request) -> Response:
        p = _params(req)
        synchronous = _bool(p, "synchronous", False)
        body = await api.scale(registry, req.params["model"], req.params.get("version"), _int(p, "min_worker"),
                               _int(p, "max_worker"), synchronous=synchronous)
        return json_response(body, status=202 if body is api.PROCESSING else 200)

    async def unregister(req: Request) -> Response:
        return json_response(await api.unregister(registry, enable_model_api, req.params["model"],
                                                  req.params.get("version")))

    async def set_default(req: Request) -> Response:
        return json_response(api.set_default(registry, req.params["model"], req.params["version"]))

    async def token(req: Request) -> Response:
        """``GET`` (TorchServe's clients) or ``POST /token?type=inference|management`` with the API
        key: a new key of that type, written to the key file; 200 with no JSON in the body, as
        TorchServe answers. A wrong key or type is the token failure (401, or 400 with
        token_auth_status=400, TorchServe's status)."""
        if rotate_key is None:  # token authorization is off: TorchServe has no such resource then
            raise OspreyError(ErrorKind.NOT_FOUND, f"Requested resource {req.path} is not found, please refer to "
                                                   "API document.", type_name="ResourceNotFoundException")
        kind = req.query.get("type", "")
        auth = req.headers.get("authorization", "")
        if auth[:7].lower() != "bearer " or not rotate_key(kind, auth[7:].strip()):
            raise OspreyError(ErrorKind.UNAUTHORIZED,
                              "Token Authentication failed. Token either incorrect, expired, or not provided correctly",
                              status=router.auth_status)
        return Response(b"\n", 200, "application/json")

    router.add("GET", "/models", list_models)
    router.add("POST", "/models", register)
    router.add("GET", "/models/{model}", describe)
    _add_traffic_routes(router, registry)  # before /models/{model}/{version}: these words are not versions
    router.add("GET", "/models/{model}/{version}", describe)
    router.add("PUT", "/models/{model}", scale)
    router.add("PUT", "/models/{model}/{version}", scale)
    router.add("DELETE", "/models/{model}", unregister)
    router.add("DELETE", "/models/{model}/{version}", unregister)
    router.add("PUT", "/models/{model}/{version}/set-default", set_default)
    router.add(("GET", "POST"), "/token", token, auth=False)
