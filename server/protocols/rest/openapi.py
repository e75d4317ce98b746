"""OpenAPI 3 descriptions of the REST ports, generated from the routes each router holds.

Each route module declares, beside its ``router.add(...)``, a :class:`Doc`: a summary, the
query parameters with their types, the request body's media types and the responses with
their JSON shape where it is known. Path parameters come from the route's pattern itself
(``{model}``, ``{rest:path}``), the error body from the route's error style (TorchServe's
``{"code", "type", "message"}`` or the Open Inference Protocol's ``{"error"}``), and the
bearer token from whether the port checks one, so the description cannot drift from what
the router serves. :func:`add_api_description` answers it on ``OPTIONS /`` and
``GET /api-description`` of each port, as TorchServe does (its ApiDescriptionRequestHandler
comes first on every connector, before the token check; another method on ``/`` is a 405),
built once on the first ask: no route is added at run time, and nothing here runs per
request otherwise.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import orjson

from server.protocols.rest.asgi import Request, Response, Router, oip_error

__all__ = ["Doc", "Param", "query", "describe", "add_api_description", "JSON", "ANY_JSON", "OPENAPI_VERSION",
           "TS_ERROR", "OIP_ERROR", "STATUS"]

OPENAPI_VERSION = "3.0.1"  # the version TorchServe's descriptions declare

TS_ERROR = {"type": "object", "properties": {"code": {"type": "integer"}, "type": {"type": "string"},
                                             "message": {"type": "string"}},
            "required": ["code", "type", "message"]}
OIP_ERROR = {"type": "object", "properties": {"error": {"type": "string"}}, "required": ["error"]}
STATUS = {"type": "object", "properties": {"status": {"type": "string"}}, "required": ["status"]}
ANY_JSON: dict = {}  # any JSON value


def JSON(schema: dict | None = None) -> dict[str, dict]:
    """A body (request or response) of ``application/json`` with this schema."""
    return {"application/json": {"schema": ANY_JSON if schema is None else schema}}


@dataclass(frozen=True)
class Param:
    name: str
    type: str = "string"  # a JSON schema type: string, integer, number, boolean
    description: str = ""
    required: bool = False
    where: str = "query"  # query or header
    enum: tuple | None = None


def query(name: str, type: str = "string", description: str = "", **kw) -> Param:
    return Param(name, type, description, **kw)


@dataclass(frozen=True)
class Doc:
    """What one route takes and answers, for the description."""
    summary: str
    params: tuple[Param, ...] = ()
    # media type -> schema of the request body; None: the route reads no body
    body: dict[str, dict] | None = None
    body_required: bool = False
    # status -> (description, {media type: {"schema": ...}} or None for no described content)
    responses: dict[int, tuple[str, dict | None]] = field(default_factory=dict)
    path_params: dict[str, str] = field(default_factory=dict)  # name -> description
    tags: tuple[str, ...] = ()


def _openapi_path(pattern: str) -> str:
    return re.sub(r"\{(\w+):path\}", r"{\1}", pattern)


def _path_names(pattern: str) -> list[str]:
    return re.findall(r"\{(\w+)(?::path)?\}", pattern)


def _operation_id(method: str, path: str) -> str:
    words = re.sub(r"[^A-Za-z0-9]+", "_", path).strip("_") or "root"
    return f"{method.lower()}_{words}"


def describe(router: Router, title: str, description: str, version: str) -> dict[str, Any]:
    """The OpenAPI document of everything ``router`` serves, in the order it was added."""
    secured = router.token is not None
    paths: dict[str, dict] = {}
    for pattern, methods, doc, route in router.described:
        if doc is None:
            doc = Doc(summary=(getattr(route.handler, "__doc__", None) or route.handler.__name__).strip().split("\n")[0])
        path = _openapi_path(pattern)
        error = OIP_ERROR if route.errors is oip_error else TS_ERROR
        item = paths.setdefault(path, {})
        for method in methods:
            op: dict[str, Any] = {"operationId": _operation_id(method, path), "summary": doc.summary}
            if doc.tags:
                op["tags"] = list(doc.tags)
            params = [{"name": name, "in": "path", "required": True, "schema": {"type": "string"},
                       **({"description": doc.path_params[name]} if name in doc.path_params else {})}
                      for name in _path_names(pattern)]
            for p in doc.params:
                schema: dict[str, Any] = {"type": p.type}
                if p.enum:
                    schema["enum"] = list(p.enum)
                entry = {"name": p.name, "in": p.where, "required": p.required, "schema": schema}
                if p.description:
                    entry["description"] = p.description
                params.append(entry)
            if params:
                op["parameters"] = params
            if doc.body is not None and method in ("POST", "PUT", "PATCH", "DELETE"):
                op["requestBody"] = {"required": doc.body_required,
                                     "content": {mt: ({"schema": s} if "schema" not in s else s)
                                                 for mt, s in doc.body.items()}}
            responses: dict[str, Any] = {}
            for status, (text, content) in sorted(doc.responses.items()):
                responses[str(status)] = {"description": text, **({"content": content} if content else {})}
            if not responses:
                responses["200"] = {"description": "OK"}
            # every other answer is an error in the route's style (400, 404, 405, 413, 503, ...)
            responses["default"] = {"description": "An error", "content": JSON(error)}
            op["responses"] = responses
            if secured and route.auth:
                op["security"] = [{"bearerAuth": []}]
            item[method.lower()] = op
    doc_out: dict[str, Any] = {"openapi": OPENAPI_VERSION,
                               "info": {"title": title, "description": description, "version": version},
                               "paths": paths}
    if secured:
        doc_out["components"] = {"securitySchemes": {"bearerAuth": {"type": "http", "scheme": "bearer"}}}
    return doc_out


API_DOC = Doc("This API's OpenAPI description", responses={200: ("The OpenAPI 3 document", JSON({"type": "object"}))},
              tags=("API description",))


def add_api_description(router: Router, title: str, description: str) -> None:
    """``OPTIONS /`` and ``GET /api-description`` answer ``router``'s description.

    Add it last: the document is built on the first ask from the routes then registered, and
    kept. It needs no token (it says what the port offers, not what it holds).
    """
    from server import __version__

    cached: list[bytes] = []

    async def api_description(req: Request) -> Response:
        if not cached:
            cached.append(orjson.dumps(describe(router, title, description, __version__), option=orjson.OPT_INDENT_2))
        return Response(cached[0], 200, "application/json")

    router.add("OPTIONS", "/", api_description, auth=False, doc=API_DOC)
    router.add("GET", "/api-description", api_description, auth=False, doc=API_DOC)
