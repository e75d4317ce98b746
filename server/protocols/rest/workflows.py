"""TorchServe's workflow APIs: management (port 8081) ``POST /workflows?url=&workflow_name=``,
``GET /workflows``, ``GET|DELETE /workflows/{name}``; inference (port 8080)
``POST /wfpredict/{name}``. Wire format only: server.workflows does the work."""

from __future__ import annotations

from server.protocols.rest.asgi import Request, Response, Router, json_response
from server.protocols.rest.forms import fields_from_body
from server.protocols.rest.management import float_param, int_param, query_params, str_param
from server.protocols.rest.openapi import JSON, STATUS, TS_ERROR, Doc, query
from server.workflows.manager import Workflows

__all__ = ["add_workflow_management_routes", "add_workflow_inference_routes"]

_TAG = ("Workflows",)
_NAME = {"workflow": "A registered workflow's name"}
LISTING = {"type": "object", "properties": {
    "nextPageToken": {"type": "string"},
    "workflows": {"type": "array", "items": {"type": "object", "properties": {
        "workflowName": {"type": "string"}, "workflowUrl": {"type": "string"}}}}}, "required": ["workflows"]}
DESCRIPTION = {"type": "array", "items": {"type": "object", "properties": {
    "workflowName": {"type": "string"}, "workflowUrl": {"type": "string"}, "minWorkers": {"type": "integer"},
    "maxWorkers": {"type": "integer"}, "batchSize": {"type": "integer"}, "maxBatchDelay": {"type": "integer"},
    "workflowDag": {"type": "string"}, "models": {"type": "array", "items": {"type": "string"}}}}}
REGISTER_PARAMS = (
    query("url", description="The workflow archive: a .war file in the workflow store"),
    query("workflow_name", description="The name to register under (default: the archive's)"),
    query("response_timeout", "number", "Seconds a node's prediction may take"),
    query("startup_timeout", "number", "Seconds a node's worker may take to load"),
)


def add_workflow_management_routes(router: Router, workflows: Workflows) -> None:
    async def register(req: Request) -> Response:
        p = query_params(req)
        url = "" if p.get("url") == "" else str_param(p, "url")
        return json_response(await workflows.register(url, str_param(p, "workflow_name"),
                                                      response_timeout=float_param(p, "response_timeout"),
                                                      startup_timeout=float_param(p, "startup_timeout")))

    async def listing(req: Request) -> Response:
        p = query_params(req)
        return json_response(workflows.list(int_param(p, "limit", 100), int_param(p, "next_page_token", 0)))

    async def describe(req: Request) -> Response:
        return json_response(workflows.describe(req.params["workflow"]))

    async def unregister(req: Request) -> Response:
        return json_response(await workflows.unregister(req.params["workflow"]))

    error = JSON(TS_ERROR)
    router.add("POST", "/workflows", register, doc=Doc(
        "Register a workflow (.war): its models and functions become models {workflow}__{node}",
        params=REGISTER_PARAMS, body=JSON({"type": "object", "properties": {p.name: {"type": p.type}
                                                                             for p in REGISTER_PARAMS}}),
        responses={200: ("Registered", JSON(STATUS)),
                   500: ("As TorchServe: a node's model could not be registered (the others are taken out again)",
                         error)}, tags=_TAG))
    router.add("GET", "/workflows", listing, doc=Doc(
        "List the registered workflows", params=(
            query("limit", "integer", "The most workflows in one page (default 100)"),
            query("next_page_token", "integer", "Where the page starts (the last page's nextPageToken)")),
        responses={200: ("A page of workflows", JSON(LISTING))}, tags=_TAG))
    router.add("GET", "/workflows/{workflow}", describe, doc=Doc(
        "Describe a workflow", path_params=_NAME, responses={200: ("The workflow", JSON(DESCRIPTION))}, tags=_TAG))
    router.add("DELETE", "/workflows/{workflow}", unregister, doc=Doc(
        "Unregister a workflow and its models", path_params=_NAME, responses={200: ("Unregistered", JSON(STATUS))},
        tags=_TAG))


def add_workflow_inference_routes(router: Router, workflows: Workflows) -> None:
    async def predict(req: Request) -> Response:
        fields = fields_from_body(req.body, req.content_type)
        headers = req.headers
        headers.setdefault("explain", "False")
        headers.setdefault("url_path", "")
        for name, f in fields.items():
            headers.setdefault(name, {"content-type": f.content_type})  # TorchServe per-field entry
        out = await workflows.predict(req.params["workflow"], fields, headers, req.request_id, req.connection())
        return Response(out.body, out.status, out.content_type, out.headers or None)

    router.add(("POST", "PUT", "GET"), "/wfpredict/{workflow}", predict, doc=Doc(
        "Run a workflow's DAG on the request (the leaf node's answer)", path_params=_NAME,
        body={"application/json": {}, "application/octet-stream": {"type": "string", "format": "binary"},
              "text/plain": {"type": "string"}},
        responses={200: ("The leaf node's answer, or {leaf: answer} with several leaves",
                         {"application/json": {"schema": {}}}),
                   500: ("As TorchServe: a node failed (Error executing NODE)", JSON(TS_ERROR)),
                   503: ("A node's queue is full", JSON(TS_ERROR))}, tags=_TAG))
