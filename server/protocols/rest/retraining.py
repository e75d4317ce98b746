"""Retraining jobs over REST, on the management port (management token).

``GET /retraining/jobs[?model=M&limit=N]`` -> ``{"jobs": [...]}``: the newest first, each a job
record without its log tail (``steps`` is their count);
``GET /retraining/jobs/{id}`` -> the whole record (404 for an unknown id);
``DELETE /retraining/jobs/{id}`` -> cancel: a queued job never runs, a running job's process is
stopped; the record as it is then (404 unknown, 409 for a job that has already finished).
Errors are TorchServe's ``{"code", "type", "message"}`` like the other management routes.
"""

from __future__ import annotations

from server.core.errors import ErrorKind, OspreyError
from server.protocols.rest.asgi import Request, Response, Router, json_response
from server.protocols.rest.openapi import JSON, Doc, query

JOB = {"type": "object", "properties": {"id": {"type": "string"}, "model": {"type": "string"},
                                        "state": {"type": "string"}}}
_TAG = ("Retraining",)

__all__ = ["add_retraining_routes"]

MAX_LIMIT = 1000


def _limit(req: Request) -> int:
    raw = req.query.get("limit", "100")
    try:
        limit = int(raw)
    except ValueError:
        limit = 0
    if not 1 <= limit <= MAX_LIMIT:
        raise OspreyError(ErrorKind.BAD_INPUT, f"limit must be a whole number from 1 to {MAX_LIMIT}, got {raw!r}")
    return limit


def add_retraining_routes(router: Router, queue) -> None:
    """``queue``: the server's JobQueue (server.retraining.queue.job_queue)."""

    async def list_jobs(req: Request) -> Response:
        model = req.query.get("model") or None
        records = await queue.list(model=model, limit=_limit(req))
        return json_response({"jobs": [r.summary() for r in records]})

    async def show_job(req: Request) -> Response:
        job_id = req.params["id"]
        record = await queue.get(job_id)
        if record is None:
            raise OspreyError(ErrorKind.NOT_FOUND, f"no retraining job {job_id!r}", type_name="JobNotFoundException")
        return json_response(record.as_dict())

    async def cancel_job(req: Request) -> Response:
        record = await queue.cancel(req.params["id"])
        return json_response(record.as_dict())

    ids = {"id": "A retraining job's id"}
    router.add("GET", "/retraining/jobs", list_jobs, doc=Doc(
        "Retraining jobs, the newest first", params=(
            query("model", description="Only this model's jobs"),
            query("limit", "integer", f"The most jobs (1 to {MAX_LIMIT}, default 100)")),
        responses={200: ("The jobs", JSON({"type": "object", "properties": {"jobs": {"type": "array", "items": JOB}},
                                           "required": ["jobs"]}))}, tags=_TAG))
    router.add("GET", "/retraining/jobs/{id}", show_job, doc=Doc(
        "A retraining job's whole record", path_params=ids, responses={200: ("The job", JSON(JOB))}, tags=_TAG))
    router.add("DELETE", "/retraining/jobs/{id}", cancel_job, doc=Doc(
        "Cancel a queued or running job (409 once it has finished)", path_params=ids,
        responses={200: ("The job as it is now", JSON(JOB))}, tags=_TAG))
