"""Starting retraining jobs over REST, on the management port (management token).

``POST /models/{model}/retrain[?version=V&reason=TEXT]`` (or the same as a JSON body,
``{"version": "V", "reason": "TEXT"}``) -> 202 with the job (or 200 with the job already queued
or running for the model). Unknown model: 404; a model without a training
entry point: 400 saying so.

``POST /retraining/jobs/{id}/challenger?archive=NAME``: a running job registers the archive it
wrote into the model store (``MODEL-vVERSION-JOB.mar``, nothing else); works with the model
API off, since it cannot register anything a job did not produce.

``POST /alerts``: Alertmanager's webhook (``webhook_configs: [{url: http://HOST:8081/alerts}]``).
Firing OspreyDriftDetected / OspreyQualityDegraded alerts start the same job the monitor would
(one per model and episode, within the model's cooldown); other alerts are ignored. Answers 200
with ``{"jobs": [...], "ignored": n, "errors": [...]}``; a body that is not Alertmanager's JSON
is a 400 naming what is wrong.
"""

from __future__ import annotations

from typing import Any

import orjson

from server.core.errors import ErrorKind, OspreyError
from server.protocols.rest.asgi import Request, Response, Router, json_response
from server.protocols.rest.openapi import JSON, Doc, query

_TAG = ("Retraining",)

__all__ = ["add_trigger_routes"]


def _job_json(job: Any) -> dict:
    return job.as_dict() if hasattr(job, "as_dict") else dict(job)


def _retrain_body(body: bytes) -> dict[str, str]:
    """The optional JSON body of a retrain call: ``{"version": "...", "reason": "..."}``, the same
    as the query parameters; anything else is a 400 naming it (never silently ignored)."""
    if not body or not bytes(body).strip():
        return {}
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise OspreyError(ErrorKind.BAD_INPUT, f"the retrain body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise OspreyError(ErrorKind.BAD_INPUT, f"the retrain body must be a JSON object such as "
                                               f"{{\"version\": \"1.0\", \"reason\": \"...\"}}, got {type(data).__name__}")
    unknown = sorted(set(data) - {"version", "reason"})
    if unknown:
        raise OspreyError(ErrorKind.BAD_INPUT, f"unknown key(s) {', '.join(map(repr, unknown))} in the retrain body; "
                                               f"it takes 'version' and 'reason'")
    out = {}
    for key, value in data.items():
        if value is None:
            continue
        if not isinstance(value, str):  # a version as a number would lose digits: 1.10 is 1.1
            raise OspreyError(ErrorKind.BAD_INPUT, f"{key!r} in the retrain body must be a string, got "
                                                   f"{type(value).__name__}")
        if value:
            out[key] = value
    return out


def add_trigger_routes(router: Router, triggers: Any) -> None:
    async def retrain(req: Request) -> Response:
        q = req.query
        given = {k: q[k] for k in ("version", "reason") if q.get(k)}
        for key, value in _retrain_body(req.body).items():
            if key in given and given[key] != value:
                raise OspreyError(ErrorKind.BAD_INPUT, f"{key!r} is {given[key]!r} in the query and {value!r} in the "
                                                       f"body; give it once")
            given[key] = value
        version = given.get("version") or None
        reason = given.get("reason") or ""
        job, created = await triggers.manual(req.params["model"], version, reason=reason)
        return json_response({"created": created, "job": _job_json(job)}, 202 if created else 200)

    async def alerts(req: Request) -> Response:
        if not req.body:
            raise OspreyError(ErrorKind.BAD_INPUT, "the alerts body is empty: expected Alertmanager's webhook JSON")
        try:
            payload = orjson.loads(req.body)
        except orjson.JSONDecodeError as exc:
            raise OspreyError(ErrorKind.BAD_INPUT, f"the alerts body is not valid JSON: {exc}") from None
        return json_response(await triggers.alert(payload), 200)

    async def challenger(req: Request) -> Response:
        archive = req.query.get("archive") or ""
        mv = await triggers.register_challenger(req.params["id"], archive)
        return json_response({"status": f"Model \"{mv.name}\" Version: {mv.version} registered for job "
                                        f"{req.params['id']}", "model": mv.name, "version": mv.version}, 200)

    started = JSON({"type": "object", "properties": {"created": {"type": "boolean"}, "job": {"type": "object"}},
                    "required": ["created", "job"]})
    router.add(("POST",), "/models/{model}/retrain", retrain, doc=Doc(
        "Start a retraining job for the model (its archive needs a training entry point)",
        params=(query("version", description="The version to retrain (default: the default version)"),
                query("reason", description="Why, kept in the job's record")),
        body=JSON({"type": "object", "additionalProperties": False, "properties": {
            "version": {"type": "string"}, "reason": {"type": "string"}}}),
        responses={202: ("Job queued", started), 200: ("A job was already queued or running", started)},
        path_params={"model": "A registered model's name"}, tags=_TAG))
    router.add(("POST",), "/retraining/jobs/{id}/challenger", challenger, doc=Doc(
        "A running job registers the archive it wrote (MODEL-vVERSION-JOB.mar)",
        params=(query("archive", description="The archive's file name in the model store", required=True),),
        responses={200: ("Registered", JSON({"type": "object", "properties": {
            "status": {"type": "string"}, "model": {"type": "string"}, "version": {"type": "string"}}}))},
        path_params={"id": "The running job's id"}, tags=_TAG))
    router.add(("POST",), "/alerts", alerts, doc=Doc(
        "Alertmanager's webhook: firing OspreyDriftDetected / OspreyQualityDegraded alerts start retraining",
        body=JSON({"type": "object", "properties": {"alerts": {"type": "array", "items": {"type": "object"}}}}),
        body_required=True,
        responses={200: ("What was done", JSON({"type": "object", "properties": {
            "jobs": {"type": "array"}, "ignored": {"type": "integer"}, "errors": {"type": "array"}}}))}, tags=_TAG))
