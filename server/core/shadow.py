"""Shadow copies: a request the default version answered, run again on the model's shadow
version, its answer compared with the champion's and discarded.

The client never waits for a copy: the data plane snapshots the request before the champion
runs (:func:`copy_of`, so a handler that changes its input arrays in place changes nothing
here), and once the champion has answered, starts :func:`run_copy` as a task. A copy that
finds the shadow's queue full (or no worker) is dropped and counted, never queued behind.
Each copy ends as one of :data:`RESULTS`, counted on the shadow version
(``ModelVersion.shadow_results``; ``osprey_shadow_requests_total{model,version,result}``).

What "agree" means (:func:`agree`): the same status, and outputs that are close (relative
1e-2, absolute 1e-3) or, for scores, have the same top class: a ``{label: score}`` mapping
has the same top label, a list of two or more numbers or a float tensor's last axis the same
index of its largest entry. Anything else (text, labels, booleans) must be equal.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import numpy as np
import orjson

from server.core.errors import ErrorKind, OspreyError
from server.core.types import InferenceRequest, InferenceResponse, Ticket, Timings

__all__ = ["RESULTS", "agree", "copy_of", "run_copy"]

log = logging.getLogger("osprey.shadow")

RESULTS = ("agree", "disagree", "error", "dropped")
REL_TOL, ABS_TOL = 1e-2, 1e-3


def copy_of(ticket: Ticket, version: str) -> Ticket:
    """A new ticket for ``version`` carrying a snapshot of ``ticket``'s inputs (same request
    id, so feedback labels join to the shadow's predictions too); no client, no deadline yet."""
    req = ticket.request
    tensors = req.tensors
    if tensors is not None:
        tensors = {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in tensors.items()}
    work = InferenceRequest(model=req.model, version=version, request_id=req.request_id, protocol=req.protocol,
                            fields=dict(req.fields), tensors=tensors, tensor_meta=req.tensor_meta,
                            outputs=req.outputs, headers=dict(req.headers))
    return Ticket(work)


async def run_copy(shadow: Any, copy: Ticket, champion: InferenceResponse) -> str:
    """Run ``copy`` on the ``shadow`` version; count and return its result (one of RESULTS).
    Never raises (it runs as a task nobody awaits)."""
    results, batcher = shadow.shadow_results, shadow.batcher
    now = time.monotonic()
    copy.timings = Timings(received=now)
    copy.request.deadline = now + shadow.config.response_timeout_s
    result = "dropped"
    if batcher.pending < batcher.queue_size and batcher.instances > 0:
        try:
            answer = await batcher.submit(copy)
        except OspreyError as exc:
            result = "dropped" if exc.kind is ErrorKind.QUEUE_FULL else "error"
            if result == "error":
                shadow.stats.add(exc.status, 0.0)
        except Exception:  # cancelled (server stopping) or a bug: never the champion's problem
            log.debug("shadow copy on %s %s failed", shadow.name, shadow.version, exc_info=True)
            result = "error"
        else:
            shadow.stats.add(answer.status, time.monotonic() - now)
            try:
                result = "agree" if agree(champion, answer) else "disagree"
            except Exception:  # outputs that cannot be compared (e.g. a bfloat16 tensor): they differ
                result = "disagree"
    results[result] = results.get(result, 0) + 1
    return result


def agree(champion: InferenceResponse, shadow: InferenceResponse) -> bool:
    """Do two answers say the same thing? (see the module's docstring)"""
    if champion.status != shadow.status:
        return False
    if champion.tensors is not None or shadow.tensors is not None:
        a, b = champion.tensors or {}, shadow.tensors or {}
        return a.keys() == b.keys() and all(_same_array(a[k], b[k]) for k in a)
    if champion.body == shadow.body:
        return True
    try:
        return _same(orjson.loads(champion.body), orjson.loads(shadow.body))
    except (orjson.JSONDecodeError, TypeError):
        return False


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _same(a: Any, b: Any) -> bool:
    if _number(a) and _number(b):
        return math.isclose(a, b, rel_tol=REL_TOL, abs_tol=ABS_TOL)
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a):
            return True
        scores = len(a) > 1 and len(b) > 1 and all(_number(v) for v in (*a.values(), *b.values()))
        return scores and max(a, key=a.__getitem__) == max(b, key=b.__getitem__)
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return False
        if all(_same(x, y) for x, y in zip(a, b)):
            return True
        scores = len(a) > 1 and all(_number(v) for v in (*a, *b))
        return scores and a.index(max(a)) == b.index(max(b))
    return a == b


def _same_array(a: Any, b: Any) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        return False
    if a.dtype.kind not in "fiu" or b.dtype.kind not in "fiu":
        return bool(np.array_equal(a, b))
    if np.allclose(a, b, rtol=REL_TOL, atol=ABS_TOL):
        return True
    scores = a.ndim >= 1 and a.shape[-1] > 1 and a.dtype.kind == "f"
    return bool(scores and np.array_equal(a.argmax(axis=-1), b.argmax(axis=-1)))
