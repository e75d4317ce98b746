"""Running a workflow's DAG: every node is a registered model version (``{workflow}__{node}``;
a function of the handler file is one too, as in TorchServe), called through the data plane,
so batching, deadlines, metrics and monitoring apply to each node and no node runs on the
event loop (function nodes run in their instance's thread or process like any handler).

As TorchServe's DagExecutor: the start node gets the request's own inputs and headers; a node
with one parent gets that parent's answer as ``body``; a node with several gets one input per
parent, named by the parent (the handler sees ``{"m1": b"...", "m2": b"..."}``). A node's
answer is the bytes its handler's answer is sent as. Nodes whose parents are done run at once,
concurrently. A node that fails is tried again up to its ``retry-attempts``, each try with its
``timeout-ms`` as deadline; then the request fails 500 "Error executing NODE" (TorchServe's
words, then why). The answer: the one leaf's bytes (application/json, as TorchServe labels
it), or with several leaves a JSON object {leaf: its answer as JSON}.
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson

from server.core.dataplane import DataPlane
from server.core.errors import ErrorKind, OspreyError
from server.core.types import Field, InferenceResponse, Protocol, new_request
from server.workflows.spec import WorkflowSpec

__all__ = ["run_dag", "node_model"]

# failures a node is tried again for (TorchServe retries any failed or timed-out node); a full
# queue, a client gone or a node unregistered are answered as they are
_RETRIED = (ErrorKind.PREDICTION_FAILED, ErrorKind.INTERNAL, ErrorKind.DEADLINE, ErrorKind.BAD_INPUT,
            ErrorKind.UNAVAILABLE, ErrorKind.OUT_OF_MEMORY)


def node_model(workflow: str, node: str) -> str:
    """The registered model of a workflow's node, named as TorchServe names it."""
    return f"{workflow}__{node}"


async def _call(dataplane: DataPlane, workflow: str, spec: WorkflowSpec, node: str, fields: dict[str, Field],
                headers: dict[str, Any], request_id: str, client: Any) -> bytes:
    settings = spec.nodes[node]
    tries = settings.retry_attempts + 1
    last: OspreyError | None = None
    for attempt in range(tries):
        rid = f"{request_id}-{node}" + (f"-{attempt}" if attempt else "")
        ticket = new_request(Protocol.REST, node_model(workflow, node), None, request_id=rid, fields=dict(fields),
                             headers=dict(headers), timeouts=(settings.timeout_ms / 1000,), client=client)
        try:
            out = await dataplane.infer(ticket)
        except OspreyError as exc:
            if exc.kind not in _RETRIED:
                if exc.kind is ErrorKind.NOT_FOUND:  # its model was unregistered by hand
                    raise OspreyError(ErrorKind.INTERNAL, f"Error executing {node}: {exc.message}") from None
                raise
            last = exc
            continue
        if out.status >= 400:  # a status its handler set: what the handler said with it, too
            said = bytes(out.body)[:300].decode("utf-8", "replace").strip()
            last = OspreyError(ErrorKind.INTERNAL, f"its handler answered status {out.status}" +
                               (f": {said}" if said else ""))
            continue
        return bytes(out.body)
    raise OspreyError(ErrorKind.INTERNAL, f"Error executing {node} (tried {tries} time{'s' if tries > 1 else ''}; "
                                          f"last failure: {last.message if last else 'unknown'})")


def _inputs(spec: WorkflowSpec, node: str, answers: dict[str, bytes]) -> dict[str, Field]:
    parents = spec.parents[node]
    if len(parents) == 1:
        return {"body": Field(answers[parents[0]])}
    return {p: Field(answers[p]) for p in parents}


def _json(body: bytes) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        return body.decode("utf-8", "replace")  # TorchServe fails here; its text is kept instead


async def run_dag(dataplane: DataPlane, workflow: str, spec: WorkflowSpec, fields: dict[str, Field],
                  headers: dict[str, Any], request_id: str, client: Any = None) -> InferenceResponse:
    """Run ``spec`` for one request; the workflow's answer."""
    answers: dict[str, bytes] = {}
    waiting = {n: len(p) for n, p in spec.parents.items()}
    running: dict[asyncio.Task, str] = {}

    def start(node: str, inputs: dict[str, Field]) -> None:
        task = asyncio.ensure_future(_call(dataplane, workflow, spec, node, inputs, headers, request_id, client))
        running[task] = node

    start(spec.start, fields)
    try:
        while running:
            done, _ = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                node = running.pop(task)
                answers[node] = task.result()  # a failed node fails the request (the others are cancelled below)
                for child in spec.children[node]:
                    waiting[child] -= 1
                    if waiting[child] == 0:
                        start(child, _inputs(spec, child, answers))
    finally:
        for task in running:
            task.cancel()
    leaves = [n for n in spec.order if not spec.children[n]]
    if len(leaves) == 1:
        return InferenceResponse(body=answers[leaves[0]], content_type="application/json")
    return InferenceResponse(body=orjson.dumps({leaf: _json(answers[leaf]) for leaf in leaves}),
                             content_type="application/json")
