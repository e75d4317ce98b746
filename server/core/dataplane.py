"""The data plane: the only API the REST and gRPC front ends call.

``infer`` puts a request on its model version's batcher and awaits its own answer.
Deadlines, queueing and batching live in the batcher; what every request passes through
once (metrics, access log, later capture for drift and feedback joins) is an *observer*:
a callable ``(model_version | None, request, outcome)`` called when a request ends.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable, Iterable

from server.core.errors import ErrorKind, OspreyError
from server.core.registry import ModelVersion, Registry
from server.core.types import InferenceRequest, InferenceResponse

__all__ = ["DataPlane", "Observer", "RefusalObserver", "LoopGuard"]

log = logging.getLogger("osprey.dataplane")

Observer = Callable[[ModelVersion | None, InferenceRequest, Any], None]
# Called for a request refused by :meth:`DataPlane.admit` (model version or None, protocol, error):
# no request object exists yet; a counter increment, nothing more.
RefusalObserver = Callable[[ModelVersion | None, str, OspreyError], None]


class LoopGuard:
    """Admits a share of new requests that shrinks while the event loop itself is overloaded.

    For a small model the event loop, not the model, is the bottleneck: past its capacity,
    requests wait unread in the sockets, where no queue bound sees them, and the latency of
    every answer grows without limit. Every ``interval`` seconds a timer measures how late it
    fires (the loop's lag). A tick that finds the lag above ``limit`` *and* at least
    ``min_arrivals`` requests arrived since the last tick (so one pause of a quiet server does
    not count) cuts the admitted share by a fifth; a tick without lag raises it by 1/20, back
    to all (AIMD). Refused requests cost the loop a fraction of admitted ones, so the loop
    catches up and keeps serving close to its capacity. Admission spreads the share evenly
    (a credit counter, no randomness).
    """

    def __init__(self, loop, limit: float, interval: float = 0.01, min_arrivals: int = 32):
        self.loop, self.limit, self.interval, self.min_arrivals = loop, limit, interval, min_arrivals
        self.share = 1.0  # fraction of new requests admitted
        self.arrivals = 0  # requests asking for admission since the last tick
        self.refused = 0
        self._credit = 0.0
        self._expected = 0.0
        self._timer = None

    def start(self) -> None:
        if self.limit > 0 and self._timer is None:
            self._expected = self.loop.time() + self.interval
            self._timer = self.loop.call_at(self._expected, self._tick)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.share = 1.0

    def _tick(self) -> None:
        now = self.loop.time()
        lag = now - self._expected
        if lag > self.limit and self.arrivals >= self.min_arrivals:
            self.share = max(0.05, self.share * 0.8)
        elif self.share < 1.0:
            self.share = min(1.0, self.share + 0.05)
        self.arrivals = 0
        self._expected = now + self.interval
        self._timer = self.loop.call_at(self._expected, self._tick)

    def admit(self) -> bool:
        self.arrivals += 1
        if self.share >= 1.0:
            return True
        self._credit += self.share
        if self._credit >= 1.0:
            self._credit -= 1.0
            return True
        self.refused += 1
        return False


class DataPlane:
    def __init__(self, registry: Registry, observers: Iterable[Observer] = (),
                 refusal_observers: Iterable[RefusalObserver] = ()):
        self.registry = registry
        self.observers: list[Observer] = list(observers)
        self.refusal_observers: list[RefusalObserver] = list(refusal_observers)
        self.started = True  # False while the startup models are loading
        self.guard: LoopGuard | None = None  # set by the server (overload_loop_lag)

    # --- admission ------------------------------------------------------------------
    def admit(self, model: str, version: str | None = None, protocol: str = "rest") -> ModelVersion:
        """Would a request for this model version be queued now? Raises NOT_FOUND, QUEUE_FULL
        (503, Retry-After) or UNAVAILABLE (no instance) if not; O(1).

        Front ends call it as soon as they know the model, before reading or decoding the
        request body, so that refusing the excess of an overload costs next to nothing and the
        loop's time goes to the requests that will run. A refusal is counted (refusal
        observers) but not logged and not passed to the request observers (there is no request
        yet). Admission is a snapshot: :meth:`infer` checks the queue bound again.
        """
        mv = None
        try:
            mv = self.registry.get(model, version)
            mv.batcher.admit()
            guard = self.guard
            if guard is not None and not guard.admit():
                mv.batcher.refused += 1
                raise OspreyError(ErrorKind.QUEUE_FULL, mv.batcher._overloaded_message, retry_after=1)
        except OspreyError as exc:
            for observer in self.refusal_observers:
                observer(mv, protocol, exc)
            raise
        return mv

    # --- inference ------------------------------------------------------------------
    async def infer(self, req: InferenceRequest) -> InferenceResponse:
        t = req.timings
        if not t.received:
            t.received = time.monotonic()
        try:
            mv = self.registry.get(req.model, req.version)
        except OspreyError as exc:
            self._notify(None, req, exc)
            raise
        limit = t.received + mv.config.response_timeout_s
        if req.deadline is None or req.deadline > limit:
            req.deadline = limit
        try:
            response = await mv.batcher.submit(req)
        except OspreyError as exc:
            self._notify(mv, req, exc)
            raise
        except BaseException:  # cancelled by the caller: never ran or its answer is dropped
            self._notify(mv, req, OspreyError(ErrorKind.CANCELLED, "cancelled by the client"))
            raise
        response.model_version = mv.version
        self._notify(mv, req, response)
        return response

    def _notify(self, mv: ModelVersion | None, req: InferenceRequest, outcome: Any) -> None:
        for observer in self.observers:
            try:
                observer(mv, req, outcome)
            except Exception:  # an observer must never fail a request
                log.exception("observer %r failed", observer)

    # --- health and metadata --------------------------------------------------------
    def live(self) -> bool:
        return True

    def healthy(self) -> bool:
        """TorchServe's /ping: every model has at least its minimum of ready instances."""
        return self.started and all(mv.ready_instances >= mv.config.min_workers for mv in self.registry.all_versions())

    def ready(self) -> bool:
        return self.healthy()

    def model_ready(self, name: str, version: str | None = None) -> bool:
        return self.registry.get(name, version).ready

    def model(self, name: str, version: str | None = None) -> ModelVersion:
        return self.registry.get(name, version)
