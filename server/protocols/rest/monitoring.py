"""Feedback labels and the monitoring status over REST, on the inference port (inference token).

``POST /feedback/{model}[/{version}]``: body ``{"request_id": "...", "label": ...}``, a list of
them, or ``{"feedback": [...]}`` -> 200 ``{"accepted", "unmatched", "invalid"}`` (plus
``"errors"``, one line per invalid item, naming it). A body that is not such JSON is a 400
naming what is wrong (nothing is recorded); a body over ``max_request_size`` a 413; an
unknown model or version a 404. When every item is invalid (a label of the wrong type for
the model) the answer is a 400 naming them, with the same counts in its body.

``GET /monitoring/{model}[/{version}]`` -> the version's monitoring JSON.

Both go through the data plane (``DataPlane.feedback`` / ``DataPlane.monitoring``).
"""

from __future__ import annotations

import math
from typing import Any

import orjson

from server.core.capture import FeedbackItem, FeedbackResult
from server.core.dataplane import DataPlane
from server.core.errors import ErrorKind, OspreyError, show
from server.protocols.rest.asgi import Request, Response, Router, json_response
from server.protocols.rest.openapi import JSON, Doc

__all__ = ["add_monitoring_routes", "parse_feedback", "check_label", "feedback_answer", "plain_json"]

SHAPE = 'the body must be {"request_id": "...", "label": ...}, a list of them, or {"feedback": [...]}'


def _bad(message: str) -> OspreyError:
    return OspreyError(ErrorKind.BAD_INPUT, message)


def check_label(label: Any, where: str) -> None:
    """A label is a string, a number or a boolean, or a list of them: several regression outputs,
    or one label per record of a request that held several; or a list of lists of numbers: one
    label per record of a regression with several outputs (not nested deeper, not empty)."""
    if isinstance(label, (str, bool, int)):
        return
    if isinstance(label, float):
        if not math.isfinite(label):
            raise _bad(f"{where}: 'label' must be a finite number, got {label!r}")
        return
    if isinstance(label, list) and label and all(isinstance(v, (str, bool, int, float)) for v in label):
        bad = next((v for v in label if isinstance(v, float) and not math.isfinite(v)), None)
        if bad is not None:
            raise _bad(f"{where}: 'label' must hold finite numbers, got {bad!r}")
        return
    if isinstance(label, list) and label and all(  # one list of values per example (several outputs each)
            isinstance(v, list) and v and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)
            for v in label):
        bad = next((x for v in label for x in v if isinstance(x, float) and not math.isfinite(x)), None)
        if bad is not None:
            raise _bad(f"{where}: 'label' must hold finite numbers, got {bad!r}")
        return
    what = "null" if label is None else f"{type(label).__name__} {show(label)}"
    raise _bad(f"{where}: 'label' must be a string, a number, a boolean or a list of them, got {what}")


def parse_feedback(body: bytes) -> list[FeedbackItem]:
    """The body's feedback items, or a BAD_INPUT error naming what is wrong."""
    if not body:
        raise _bad(f"the feedback body is empty; {SHAPE}")
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise _bad(f"the feedback body is not valid JSON: {exc}") from None
    if isinstance(data, dict) and "feedback" in data:
        data = data["feedback"]
        if not isinstance(data, list):
            raise _bad(f"'feedback' must be a list of {{\"request_id\", \"label\"}} objects, got {type(data).__name__}")
    elif isinstance(data, dict):
        data = [data]
    elif not isinstance(data, list):
        raise _bad(f"{SHAPE}; got {type(data).__name__}")
    if not data:
        raise _bad("no feedback items: the list is empty")
    items = []
    for i, entry in enumerate(data):
        where = f"feedback[{i}]"
        if not isinstance(entry, dict):
            raise _bad(f"{where} must be an object {{\"request_id\": \"...\", \"label\": ...}}, got "
                       f"{type(entry).__name__} {show(entry)}")
        rid = entry.get("request_id")
        if isinstance(rid, int) and not isinstance(rid, bool):
            rid = str(rid)
        if not isinstance(rid, str) or not rid:
            raise _bad(f"{where}: 'request_id' must be a non-empty string (the x-request-id of the answer), "
                       f"got {show(rid)}" if "request_id" in entry else f"{where} has no 'request_id'")
        if "label" not in entry:
            raise _bad(f"{where} (request_id {show(rid)}) has no 'label'")
        check_label(entry["label"], f"{where} (request_id {show(rid)})")
        items.append(FeedbackItem(request_id=rid, label=entry["label"], index=i))
    return items


def feedback_answer(result: FeedbackResult) -> tuple[int, dict[str, Any]]:
    """(HTTP status, body): 200 with the counts; 400 with them when every item was invalid."""
    body: dict[str, Any] = result.as_dict()
    if result.errors:
        body["errors"] = result.errors
    if result.invalid and not result.accepted and not result.unmatched:
        err = _bad("no label was accepted: " + "; ".join(result.errors[:10]) +
                   (f"; and {len(result.errors) - 10} more" if len(result.errors) > 10 else ""))
        return 400, {"code": err.status, "type": err.type_name, "message": err.message, **body}
    return 200, body


_STATUS_OPTIONS = orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS


def plain_json(obj: Any) -> Any:
    """numpy scalars, tuples in sets and the like, for the status JSON."""
    item = getattr(obj, "item", None)
    if callable(item):
        return item()
    if isinstance(obj, (set, frozenset, tuple)):
        return list(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")


def add_monitoring_routes(router: Router, dataplane: DataPlane) -> None:
    async def feedback(req: Request) -> Response:
        p = req.params
        items = parse_feedback(req.body)
        result = await dataplane.feedback(p["model"], p.get("version"), items)
        status, body = feedback_answer(result)
        return json_response(body, status)

    async def monitoring(req: Request) -> Response:
        p = req.params
        status = await dataplane.monitoring(p["model"], p.get("version"))
        return Response(orjson.dumps(status, default=plain_json, option=_STATUS_OPTIONS), 200, "application/json")

    names = {"model": "A registered model's name", "version": "A version of the model"}
    item = {"type": "object", "properties": {"request_id": {"type": "string"}, "label": {}},
            "required": ["request_id", "label"]}
    feedback_body = {"oneOf": [item, {"type": "array", "items": item},
                               {"type": "object", "properties": {"feedback": {"type": "array", "items": item}},
                                "required": ["feedback"]}]}
    counts = {"type": "object", "properties": {"accepted": {"type": "integer"}, "unmatched": {"type": "integer"},
                                               "invalid": {"type": "integer"}, "kept": {"type": "integer"},
                                               "errors": {"type": "array", "items": {"type": "string"}},
                                               "unmatched_ids": {"type": "array", "items": {"type": "string"}}}}
    feedback_doc = Doc("Labels for earlier answers, joined on their x-request-id", body=JSON(feedback_body),
                       body_required=True, responses={200: ("The counts", JSON(counts))}, path_params=names,
                       tags=("Monitoring",))
    monitoring_doc = Doc("The version's monitoring status: drift, quality, feedback", path_params=names,
                         responses={200: ("The status", JSON({"type": "object"}))}, tags=("Monitoring",))
    router.add(("POST",), "/feedback/{model}", feedback, doc=feedback_doc)
    router.add(("POST",), "/feedback/{model}/{version}", feedback, doc=feedback_doc)
    router.add(("GET",), "/monitoring/{model}", monitoring, doc=monitoring_doc)
    router.add(("GET",), "/monitoring/{model}/{version}", monitoring, doc=monitoring_doc)
