"""The data plane: the only API the REST and gRPC front ends call.

``infer`` routes a request to its model version, puts it on that version's batcher and
awaits its own answer. The answer carries everything an adapter needs to encode it (the
version that answered and its declared outputs), so no adapter looks the model up again
after inference: a version unregistered meanwhile never turns an answer into a 404.
Deadlines, queueing and batching live in the batcher; what every request passes through
once (metrics, access log, later capture for drift and feedback joins) is an *observer*:
a callable ``(model_version | None, ticket, outcome)`` called when a request ends; the
first one keeps each version's live counters (:func:`server.core.stats.count`,
:meth:`DataPlane.version_stats`).

A request that names no version goes to the model's default, or, while the model has canary
weights or a shadow (``Registry.routes``, :mod:`server.core.routing`), to the version its
weights draw; a request the default answered is then copied to the shadow version once the
answer is in hand (:mod:`server.core.shadow`): the client never waits for the copy.

An answer larger than ``max_response_size`` (the setting; TorchServe's key, 6,553,500 bytes by
default: its frontend refuses a bigger message from its worker, answers 500 "Worker died." and
restarts the worker), or a streamed part larger than it, is answered 500 naming its size and the
limit, on every protocol; the instance goes on serving. Counted: the body the handler's output
was encoded to, plus the bytes of the tensors it gave (what an adapter then encodes for the
wire: an OIP JSON answer takes more); each part as its stream sends it
(:mod:`server.core.answer_size`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Callable, Iterable, Sequence

import orjson

from server.core.answer_size import BoundedStream, over
from server.core.capture import FeedbackItem, FeedbackResult, MonitorPort
from server.core.errors import ErrorKind, OspreyError, from_status
from server.core import shadow as shadows
from server.core.registry import ModelVersion, Registry
from server.core.stats import count
from server.core.types import InferenceResponse, Protocol, Ticket, new_request

__all__ = ["DataPlane", "Observer", "RefusalObserver"]

log = logging.getLogger("osprey.dataplane")
TOO_LARGE_LOG_INTERVAL_S = 60.0  # at most one line a minute a version for answers over max_response_size

# longest a feedback call waits for the model's instances to hand their capture to the monitor
# (the barrier before a join; an instance busy with a long batch runs it after that batch)
CAPTURE_BARRIER_S = 5.0
REFUSING_WINDOW_S = 1.0  # how long after a refusal the front ends keep asking admit() first

Observer = Callable[[ModelVersion | None, Ticket, Any], None]
# Called for a request refused by :meth:`DataPlane.admit` (model version, protocol, error):
# no request object exists yet; a counter increment, nothing more.
RefusalObserver = Callable[[ModelVersion, Protocol, OspreyError], None]


class DataPlane:
    def __init__(self, registry: Registry, observers: Iterable[Observer] = (),
                 refusal_observers: Iterable[RefusalObserver] = (), monitor: MonitorPort | None = None,
                 max_response_size: int = 0):
        self.registry = registry
        # bytes an answer may hold (the setting, TorchServe's meaning); 0: no limit (see infer)
        self.max_response_size = max(0, int(max_response_size))
        self._on_part_refused = self._part_refused  # (bound once: given to every streaming request)
        self._too_large_logged: dict[tuple[str, str], list] = {}  # version -> [last logged, refused since]
        # the event loop requests run on, for adapters that hand it to other threads (asking
        # asyncio for it costs a getpid() system call per request: it checks the loop's process)
        self.loop: asyncio.AbstractEventLoop | None = getattr(registry, "loop", None)
        self.monitor = monitor  # drift, feedback and live quality (server.serve wires it), or None: off
        self.observers: list[Observer] = [count, *observers]
        self.refusal_observers: list[RefusalObserver] = list(refusal_observers)
        self.started = True  # False while the startup models are loading
        self._refusing_until = 0.0  # monotonic: admission checks run until then (see refusing)
        self._shadow_tasks: set[asyncio.Task] = set()  # shadow copies running (held until they end)

    # --- admission ------------------------------------------------------------------
    def refusing(self) -> bool:
        """Requests were refused for a full queue (or no worker) within the last
        REFUSING_WINDOW_S: front ends then ask :meth:`admit` before reading a body. At other
        times they skip it (it costs a few percent of the loop at full speed); the batcher
        still refuses at submit, and that refusal opens the window."""
        return time.monotonic() < self._refusing_until


    def admit(self, model: str, version: str | None = None, protocol: Protocol = Protocol.REST) -> ModelVersion | None:
        """Would a request for this model version be queued now? Raises QUEUE_FULL (503,
        Retry-After) or UNAVAILABLE (no instance) if not; O(1). Returns the model version, or
        None for an unknown model or version: that request goes on to :meth:`infer`, which
        answers NOT_FOUND through the request observers (metrics, access log) as before.

        Front ends call it as soon as they know the model, before reading or decoding the
        request body, so that refusing the excess of an overload costs next to nothing and the
        loop's time goes to the requests that will run. A refusal is counted (refusal
        observers) but not logged and not passed to the request observers (there is no request
        yet). Admission is a snapshot: :meth:`infer` checks the queue bound again.
        """
        try:
            mv = self.registry.get(model, version)
        except OspreyError:
            return None
        try:
            mv.batcher.admit()
        except OspreyError as exc:
            self._refusing_until = time.monotonic() + REFUSING_WINDOW_S
            for observer in self.refusal_observers:
                observer(mv, protocol, exc)
            raise
        return mv

    # --- inference ------------------------------------------------------------------
    async def infer(self, ticket: Ticket) -> InferenceResponse:
        req = ticket.request
        routes = self.registry.routes  # empty unless some model has canary weights or a shadow
        copy = shadow = None
        try:
            if routes and not req.version:
                mv = self.registry.route(req.model)
                shadow = self.registry.shadow_for(mv)
                if shadow is not None:
                    copy = shadows.copy_of(ticket, shadow.version)  # before the champion can touch its inputs
            else:
                mv = self.registry.get(req.model, req.version)
        except OspreyError as exc:
            self._notify(None, ticket, exc)
            raise
        # responseTimeout runs from when the request's batch is dispatched (the batcher sets the
        # deadline then, TorchServe's way): time in the queue counts only against a client's own
        # deadline, so a burst queued behind slow batches is not answered 504 for waiting
        ticket.run_timeout = mv.config.response_timeout_s
        ticket.model_version = mv.version
        ticket.output_specs = mv.signature.outputs
        limit = self.max_response_size
        bounded = None
        if limit and ticket.stream is not None:
            bounded = ticket.stream = BoundedStream(ticket.stream, limit, self._on_part_refused, mv, ticket)
        try:
            response = await mv.batcher.submit(ticket)
        except OspreyError as exc:
            if exc.kind is ErrorKind.QUEUE_FULL or exc.kind is ErrorKind.UNAVAILABLE:
                self._refusing_until = time.monotonic() + REFUSING_WINDOW_S
            self._notify(mv, ticket, exc)
            raise
        except BaseException:  # cancelled by the caller: never ran or its answer is dropped
            self._notify(mv, ticket, OspreyError(ErrorKind.CANCELLED, "cancelled by the client"))
            raise
        response.model_version = mv.version
        response.output_specs = ticket.output_specs
        if limit:
            size = over(response, limit) if len(response.body) > limit or response.tensors else 0
            # a refused part has usually failed the request already (_part_refused); its answer can
            # still come first: the batcher drains finished batches early when a full batch waits
            part = bounded.refused if bounded is not None else 0
            if size or part:  # a part refused first: the client's answer is incomplete from there
                exc = self._too_large(mv, part or size, limit, part=bool(part))
                self._notify(mv, ticket, exc)
                raise exc
        self._notify(mv, ticket, response)
        if copy is not None:
            task = asyncio.get_running_loop().create_task(shadows.run_copy(shadow, copy, response))
            self._shadow_tasks.add(task)
            task.add_done_callback(self._shadow_tasks.discard)
        return response

    def _part_refused(self, bounded: BoundedStream) -> None:
        """A streamed part over the limit (on the instance's thread): the request fails now, on
        the loop, while its handler runs on (``bounded`` drops the rest of its parts)."""
        fut = bounded.ticket.future  # (made when it was queued, before any batch could run it)
        if fut is None:
            return

        def fail() -> None:
            if not fut.done():
                fut.set_exception(self._too_large(bounded.model, bounded.refused, bounded.limit, part=True))
        try:
            fut.get_loop().call_soon_threadsafe(fail)
        except RuntimeError:  # the loop has closed (shutdown): nobody is waiting
            pass

    def _too_large(self, mv: ModelVersion, size: int, limit: int, part: bool = False) -> OspreyError:
        """The error for an answer over max_response_size, logged at most once a minute a version
        (with how many more were refused since), as a full queue is."""
        now, key = time.monotonic(), (mv.name, mv.version)
        seen = self._too_large_logged.get(key)
        if seen is None or now - seen[0] >= TOO_LARGE_LOG_INTERVAL_S:
            more = f" ({seen[1]} more refused since the last line)" if seen and seen[1] else ""
            log.warning("model %s version %s: %s of %d bytes is over max_response_size (%d); %s%s",
                        mv.name, mv.version, "a streamed part" if part else "an answer", size, limit,
                        "not sent, the request failed" if part else "answered 500", more)
            self._too_large_logged[key] = [now, 0]
        else:
            seen[1] += 1
        what = "a streamed part of" if part else "answered"
        return OspreyError(ErrorKind.INTERNAL, f"Model \"{mv.name}\" version {mv.version} {what} {size:,} bytes, more "
                                               f"than max_response_size ({limit:,} bytes); raise the setting "
                                               "max_response_size to serve answers this large")

    async def describe_handle(self, mv: ModelVersion, headers: dict[str, str] | None = None) -> dict[str, Any]:
        """TorchServe's ``customized=true`` describe: the version's handler answers one request
        whose row is empty and whose headers (the describe call's, lower-cased) carry
        ``describe: True`` (TorchServe's ``BaseHandler.handle`` then returns ``describe_handle()``).
        It queues like a request, runs in a batch of its own, and is no prediction: not
        monitored, not counted. The answer is read as TorchServe's front end reads it: a JSON
        object is the metadata, anything else (None, a list, text) is ``{}``. The handler
        failing raises its OspreyError (503 "Prediction failed", as TorchServe answers)."""
        ticket = new_request(Protocol.DESCRIBE, mv.name, mv.version, fields={},
                             headers={**(headers or {}), "describe": "True"})
        ticket.run_timeout = mv.config.response_timeout_s
        ticket.model_version = mv.version
        response = await mv.batcher.submit(ticket)
        if response.status >= 400:  # the handler refused (a status it set): that is no metadata
            raise OspreyError(from_status(response.status), response.body.decode("utf-8", "replace")[:500] or
                              f"describe_handle answered status {response.status}", status=response.status)
        try:
            value = orjson.loads(response.body) if response.body else None
        except orjson.JSONDecodeError:
            value = None
        return value if isinstance(value, dict) else {}

    def _notify(self, mv: ModelVersion | None, ticket: Ticket, outcome: Any) -> None:
        for observer in self.observers:
            try:
                observer(mv, ticket, outcome)
            except Exception:  # an observer must never fail a request
                log.exception("observer %r failed", observer)

    # --- health and metadata --------------------------------------------------------
    def live(self) -> bool:
        return True

    def healthy(self) -> bool:
        """TorchServe's /ping: every model has at least its minimum of ready instances."""
        return self.started and all(mv.unhealthy is None and mv.ready_instances >= mv.config.min_workers
                                    for mv in self.registry.all_versions())

    def ready(self) -> bool:
        return self.healthy()

    def model_ready(self, name: str, version: str | None = None) -> bool:
        return self.registry.get(name, version).ready

    def model(self, name: str, version: str | None = None) -> ModelVersion:
        return self.registry.get(name, version)

    def version_stats(self, name: str, version: str) -> dict[str, Any]:
        """Live counters of one version since it was registered: ``{requests, errors,
        latency_sum_s, latency_count}`` (see :class:`server.core.stats.VersionStats`; shadow
        copies count on the shadow version). NOT_FOUND for an unknown model or version."""
        return self.registry.get(name, version).stats.as_dict()

    # --- monitoring: feedback labels and status -----------------------------------------
    def _monitored(self, model: str, version: str | None) -> ModelVersion:
        """The version (NOT_FOUND if unknown), or UNAVAILABLE / NOT_FOUND when it is not monitored."""
        mv = self.registry.get(model, version)
        if self.monitor is None:
            raise OspreyError(ErrorKind.UNAVAILABLE, "monitoring is off on this server (setting monitoring=false): "
                                                     "no feedback or monitoring status")
        if not mv.config.monitoring.enabled:
            raise OspreyError(ErrorKind.NOT_FOUND, f"monitoring is off for model {mv.name} version {mv.version} "
                                                   "(monitoring: enabled: false in its model-config.yaml)")
        return mv

    async def feedback(self, model: str, version: str | None, items: Sequence[FeedbackItem]) -> FeedbackResult:
        """Join labels to the predictions of ``model`` (its default version unless ``version``)
        by request id. Unknown model or version: NOT_FOUND; bad items are counted, not raised.

        Without ``version``, a label joins whichever monitored version answered its request (a
        canary or a traffic split serves several, and the client cannot tell which answered)."""
        mv = self._monitored(model, version)
        others: list[ModelVersion] = []
        if version is None:
            others = [v for v in self.registry.versions(model) if v is not mv and v.config.monitoring.enabled]
        flushed, marks = await self._capture_barrier([mv, *others])
        return await self.monitor.feedback(mv.name, mv.version, items, others=[v.version for v in others],
                                           flushed=flushed, marks=marks)

    async def _capture_barrier(self, versions: list[ModelVersion]) -> tuple[bool, list[str]]:
        """Every instance of ``versions`` hands the monitor what it captured from the answers it
        sent before now (their capture is amortized: up to half a second later otherwise), so a
        label sent right after its answer finds its prediction, and one for an unknown or
        expired id need not wait for predictions that might still come. (done, the marks a
        monitor process must have read first: process instances' children post them on their
        own links). Not done when an instance cannot promise that, or did not within
        CAPTURE_BARRIER_S (a long batch): the monitor then waits for predictions on their way,
        as it always did."""
        loop = asyncio.get_running_loop()
        waits = []
        for mv in versions:
            for instance in list(mv.instances):
                barrier = getattr(instance, "flush_capture", None)
                fut = barrier(loop) if barrier is not None else None
                if fut is None:
                    for w in waits:
                        w.cancel()
                    return False, []
                waits.append(fut)
        try:
            marks = await asyncio.wait_for(asyncio.gather(*waits), CAPTURE_BARRIER_S)
        except asyncio.TimeoutError:
            return False, []
        return True, [m for m in marks if m is not None]

    async def monitoring(self, model: str, version: str | None) -> dict[str, Any]:
        """The monitoring JSON of a version (computed off the event loop: it may ask Redis)."""
        mv = self._monitored(model, version)
        return await asyncio.to_thread(self.monitor.status, mv.name, mv.version)
