"""The monitor: takes observations from the instances, analyses them in one background thread.

``observe`` is the only call on the request side (instance threads, or the event loop for
process instances): a bounded ``deque.append`` and a length check, no lock, no analysis.
Past ``queue_size`` waiting observations new ones are dropped and counted: monitoring loses
rows before serving loses time.

The background thread wakes every ``tick`` (or at once for ``drain``/``close``), empties the
deque into one :class:`VersionMonitor` per version (drift: binning, windows, episodes), flushes
counts to the store, and re-reads the shared state every ``refresh`` seconds so ``status``
and ``render`` (called on the event loop) read a snapshot and never wait on Redis. Quality
(labels, live metrics) is a separate part per version made by ``quality_factory``; the monitor
feeds it observations, delegates feedback to it in a worker thread, and embeds its status.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from typing import Any, Callable, Protocol, Sequence

from server.core.capture import UNMATCHED_SHOWN, FeedbackItem, FeedbackResult, Observation
from server.core.errors import show
from server.core.osthread import name_os_thread
from server.core.types import InferenceResponse

from .drift.version import CHUNKS_PER_WINDOW, VersionMonitor
from .families import escape, fmt, render_family
from .store import Store, open_store

__all__ = ["Monitor", "QualityPart", "QualityFactory"]

log = logging.getLogger("osprey.monitoring")


class QualityPart(Protocol):
    """Live quality of one version (``monitoring/quality/``): the monitor's delegate."""

    def record(self, obs: Observation) -> None:
        """Keep the observation's predictions for joins (background thread)."""

    def feedback(self, items: Sequence[FeedbackItem]) -> FeedbackResult:
        """Join labels by request id (a worker thread; may block on Redis)."""

    def status(self) -> dict[str, Any]:
        """The ``quality`` object of the monitoring JSON."""

    def render_lines(self) -> list[str]:
        """Prometheus sample lines (no HELP/TYPE: the monitor writes those once per family) of
        osprey_feedback_total{model,version,result}, osprey_quality{model,version,metric},
        osprey_quality_degraded{model,version}."""

    def tick(self) -> None:
        """Flush what was buffered while the store was down, refresh the cached metrics
        (background thread, every ``refresh`` seconds; optional)."""


# (model, version, the version's MonitoringConfig, its model_dir, the store) -> part or None
QualityFactory = Callable[[str, str, Any, Any, Store], "QualityPart | None"]

FEEDBACK_WAIT_S = 2.0  # longest a feedback call waits for queued observations to be recorded
# longest a feedback call that came while predictions were flowing waits for the predictions of its
# ids that are still on their way (a loaded machine can hand them over later than CAPTURE_DELAY_S)
FEEDBACK_SETTLE_S = 10.0
CAPTURE_DELAY_S = 0.6  # an instance hands a prediction over at most this long after answering it

_FAMILIES = {  # name -> (type, help)
    "osprey_drift_score": ("gauge", "Drift score of a feature in the last closed window (the version's method)."),
    "osprey_drift_detected": ("gauge", "1 while a drift episode is open."),
    "osprey_drift_episodes_total": ("counter", "Drift episodes opened (shared across replicas: use max)."),
    "osprey_monitored_requests_total": ("counter", "Rows this replica analysed for drift."),
    "osprey_monitoring_degraded": ("gauge", "1 while monitoring of the version is degraded (Redis down, hook fails)."),
    "osprey_monitoring_dropped_total": ("counter", "Observations dropped because the monitor's queue was full."),
    "osprey_feedback_total": ("counter", "Feedback labels received, by result (matched, unmatched, invalid)."),
    "osprey_quality": ("gauge", "Live quality metric over the last window of labelled predictions."),
    "osprey_quality_degraded": ("gauge", "1 while live quality is below its baseline by more than the tolerance."),
}


class Monitor:
    """``server.core.capture.MonitorPort``: drift here, quality delegated per version.

    ``resolve(model, version)`` returns the registry's ModelVersion (``.archive.model_dir``,
    ``.config.monitoring``) or None. ``store`` defaults to Redis when ``settings.redis_url`` is
    set, else this process. ``clock`` is wall time for windows and episodes (tests own it);
    ``tick`` is how often the idle thread looks at the queue, ``refresh`` how often it re-reads
    shared state and checks ``window_seconds``, ``retry`` how often a dead store is retried.
    ``status`` may read the version's profile from disk on its first call (once per version).
    """

    def __init__(self, settings: Any, resolve: Callable[[str, str], Any],
                 quality_factory: QualityFactory | None = None, *, store: Store | None = None,
                 clock: Callable[[], float] = time.time, queue_size: int = 10_000, tick: float = 0.1,
                 refresh: float = 1.0, retry: float = 1.0, start: bool = True, dataset: Any = None):
        self.settings, self.resolve, self.quality_factory = settings, resolve, quality_factory
        self.dataset = dataset  # monitoring.dataset.LabelledData (inputs held for labels), or None
        self.store = store if store is not None else open_store(getattr(settings, "redis_url", ""))
        self.clock = clock
        self.enabled = bool(getattr(settings, "monitoring", True))
        self.queue_size, self.tick, self.refresh_s, self.retry_s = queue_size, tick, refresh, retry
        self.dropped = 0
        # longest an instance takes to hand a prediction over after answering it (a monitor in
        # its own process adds the hop there: monitoring.process)
        self.capture_delay = CAPTURE_DELAY_S
        self._queue: deque[Observation] = deque()
        self._last_observed = float("-inf")  # monotonic time of the last observation taken or answer sent
        self._versions: dict[tuple[str, str], VersionMonitor | None] = {}  # None: off or unknown
        self._lock = threading.Lock()  # guards _versions
        self._cond = threading.Condition()
        self._wake = threading.Event()
        self._gen = self._served = 0
        self._closed = False
        self._last_refresh: dict[tuple[str, str], float] = {}
        self._retry_at: dict[tuple[str, str], float] = {}
        self._thread = threading.Thread(target=self._run, name="osprey-monitor", daemon=True)
        if start:
            self._thread.start()

    # -- request side ------------------------------------------------------------------------------
    def observe(self, obs: Observation) -> None:
        if not self.enabled:
            return
        if len(self._queue) >= self.queue_size:
            self.dropped += 1
            return
        self._queue.append(obs)
        self._last_observed = time.monotonic()

    def answered(self, mv: Any, ticket: Any, outcome: Any) -> None:
        """A request observer (the data plane's, O(1), on the event loop): an answer left now.
        Its observation reaches :meth:`observe` up to CAPTURE_DELAY_S later, so a label sent
        right after the answer must wait for it even when nothing was observed for a while (see
        feedback). A successful answer of a model with retraining has its request's inputs held
        for its label (``dataset.hold``: a reference appended, nothing copied)."""
        self._last_observed = time.monotonic()
        if (mv is not None and mv.config.retraining is not None and type(outcome) is InferenceResponse
                and outcome.status == 200 and self.dataset is not None):
            self.dataset.hold(mv, ticket.request)

    # -- versions ------------------------------------------------------------------------------------
    def _ensure(self, model: str, version: str) -> VersionMonitor | None:
        """The version's monitor, made on first use; None when unknown or monitoring is off."""
        key = (model, version)
        with self._lock:
            if key in self._versions:
                return self._versions[key]
            vm = None
            mv = self.resolve(model, version)
            config = getattr(getattr(mv, "config", None), "monitoring", None)
            if mv is not None and config is not None and config.enabled and self.enabled:
                model_dir = getattr(getattr(mv, "archive", None), "model_dir", None)
                quality = None
                if self.quality_factory is not None:
                    try:
                        quality = self.quality_factory(model, version, config, model_dir, self.store)
                    except Exception:
                        log.exception("event=quality_part_failed model=%s version=%s", model, version)
                vm = VersionMonitor(model, version, config, model_dir, self.store, self.clock, quality)
            if mv is not None:  # unknown versions are not cached: they may be registered later
                self._versions[key] = vm
            return vm

    def _all(self) -> list[tuple[tuple[str, str], VersionMonitor]]:
        with self._lock:
            return [(k, v) for k, v in self._versions.items() if v is not None]

    # -- background thread ------------------------------------------------------------------------------
    def _run(self) -> None:
        name_os_thread("osprey-monitor")
        while True:
            self._wake.wait(self.tick)
            self._wake.clear()
            with self._cond:
                if self._closed:
                    self._cond.notify_all()
                    return
                gen = self._gen
            try:
                self._pass(force=gen != self._served)
            except Exception:  # never let the thread die: monitoring would stop silently
                log.exception("event=monitor_pass_failed")
            with self._cond:
                self._served = gen
                self._cond.notify_all()

    def _flush(self, key: tuple[str, str], vm: VersionMonitor, force: bool, check_time: bool = False) -> None:
        now = time.monotonic()
        if force or now >= self._retry_at.get(key, 0.0):
            if not vm.flush(check_time):
                self._retry_at[key] = now + self.retry_s  # a dead store is retried once per retry_s

    def _pass(self, force: bool) -> None:
        if self.dataset is not None:
            self.dataset.process()
        touched: set[tuple[str, str]] = set()
        while True:
            try:
                obs = self._queue.popleft()
            except IndexError:
                break
            vm = self._ensure(obs.model, obs.version)
            if vm is not None:
                key = (obs.model, obs.version)
                vm.record(obs)
                touched.add(key)
                if len(vm.pending) >= CHUNKS_PER_WINDOW:  # a window's worth: send it before reading more
                    self._flush(key, vm, False)
        now = time.monotonic()
        for key, vm in self._all():
            due = force or now - self._last_refresh.get(key, 0.0) >= self.refresh_s  # time-closes, re-reads
            if vm.pending or vm.unscored or key in touched or due:
                self._flush(key, vm, force, check_time=due)
            if key in touched or due:
                self._last_refresh[key] = now
                vm.refresh()
            if due and vm.quality is not None and hasattr(vm.quality, "tick"):
                # predictions buffered while Redis was down reach the shared log without waiting
                # for this replica's next request (a label sent to another replica joins them)
                try:
                    vm.quality.tick()
                except Exception:
                    log.exception("event=quality_tick_failed model=%s version=%s", *key)

    def drain(self, timeout: float = 10.0) -> bool:
        """Test hook: wait until everything observed before this call is analysed and the
        snapshots re-read (and buffered counts retried). True when done within ``timeout``."""
        with self._cond:
            self._gen += 1
            target = self._gen
            self._wake.set()
            return self._cond.wait_for(lambda: self._served >= target or self._closed, timeout)

    # -- MonitorPort ------------------------------------------------------------------------------------
    def status(self, model: str, version: str) -> dict[str, Any]:
        """The monitoring JSON; KeyError when the version is not registered."""
        vm = self._ensure(model, version)
        if vm is not None:
            if (model, version) not in self._last_refresh:
                self._wake.set()  # first ask on this replica: read the shared state soon
            return vm.status()
        if self.resolve(model, version) is None:
            raise KeyError(f"no version {version!r} of model {model!r}")
        return {"model": model, "version": version, "reference": None, "degraded": "monitoring is off",
                "requests": 0, "windows": 0,
                "drift": {"detected": False, "score": 0.0, "method": None, "episode": None, "episodes": 0,
                          "features": []},
                "quality": None, "history": []}

    async def feedback(self, model: str, version: str, items: Sequence[FeedbackItem],
                       answered_at: float | None = None, others: Sequence[str] = (),
                       flushed: bool = False, marks: Sequence[str] = ()) -> FeedbackResult:
        """Join labels to the predictions of ``version``. ``others``: more versions of the model
        (a label sent without a version, while a canary or a traffic split serves several): each
        label joins the version whose prediction log holds its request id, ``version`` those no
        version holds. ``answered_at``: the monotonic time the server last sent an answer, when
        that is known elsewhere (a monitor in its own process: the front end's :meth:`answered`).
        ``flushed``: the data plane's barrier ran (every instance of these versions handed its
        capture over before this call); with this process's own store (no replicas) nothing
        else can be on its way, so the join waits only for what is queued to be recorded.
        ``marks``: what a monitor process had to read first (``monitoring.process`` waits for
        them and passes none here)."""
        versions = [version, *(v for v in others if v != version)]
        # A label may come right after its answer: instances hand their predictions over within
        # CAPTURE_DELAY_S of answering (capture is amortized across batches), and this monitor
        # records what is queued on its next pass. While predictions are flowing, wait that long
        # and record what is queued before joining, so such a label joins instead of counting
        # as unmatched (feedback is not latency-bound; an idle version joins at once). A process
        # instance sending to a monitor process hands its held inputs over with the same delay.
        joins = False
        for v in versions:
            vm = await asyncio.to_thread(self._ensure, model, v)
            joins = joins or self._retraining(model, v) is not None or (vm is not None and vm.quality is not None)
        last = self._last_observed if answered_at is None else max(self._last_observed, answered_at)
        if flushed and getattr(self.store, "redis", None) is None:
            # (a pass may be recording what came just before this call: wait for it, whatever
            # the queue holds now)
            if joins:
                await asyncio.to_thread(self.drain, FEEDBACK_WAIT_S)
        elif joins and time.monotonic() - last < self.capture_delay + 0.5:
            await asyncio.sleep(self.capture_delay)
            recorded = await asyncio.to_thread(self.drain, FEEDBACK_WAIT_S)
            # Under load the delay above is not a bound (an instance busy with more traffic, a
            # monitor pass short of CPU): while predictions keep arriving or wait to be recorded,
            # wait for those of the ids no version holds yet, up to FEEDBACK_SETTLE_S. An id that
            # is not on its way (unknown, expired) stops the wait once everything observed is
            # recorded and nothing was observed for capture_delay.
            await asyncio.to_thread(self._settle, model, versions, items, recorded)
        elif joins and self._queue:
            await asyncio.to_thread(self.drain, FEEDBACK_WAIT_S)
        if len(versions) == 1:
            return await self._join(model, version, items)
        groups = await asyncio.to_thread(self._route, model, versions, items)
        results = [await self._join(model, v, group) for v, group in groups.items() if group]
        return merged(results) if results else FeedbackResult()

    def _logs(self, model: str, versions: Sequence[str]) -> list[tuple[str, Any]]:
        """(version, its quality part) for each of ``versions`` whose prediction log can say
        which request ids it holds."""
        out = []
        for v in versions:
            vm = self._ensure(model, v)
            quality = vm.quality if vm is not None else None
            if quality is not None and hasattr(quality, "holds"):
                out.append((v, quality))
        return out

    def _settle(self, model: str, versions: list[str], items: Sequence[FeedbackItem], recorded: bool) -> None:
        """Wait (a worker thread) until every item's request id is held by one of ``versions``'
        prediction logs, while observations keep arriving or wait to be recorded (``recorded``:
        the last drain finished), at most FEEDBACK_SETTLE_S."""
        parts = [quality for _, quality in self._logs(model, versions)]
        if not parts:
            return
        missing = [str(it.request_id) for it in items]
        deadline = time.monotonic() + FEEDBACK_SETTLE_S
        while True:
            try:
                for quality in parts:
                    if missing:
                        missing = [rid for rid, h in zip(missing, quality.holds(missing)) if not h]
            except Exception:  # the store is down: the join says so
                return
            now = time.monotonic()
            if not missing or now >= deadline or (recorded and now - self._last_observed > self.capture_delay):
                return
            recorded = self.drain(min(FEEDBACK_WAIT_S, deadline - now))
            if recorded and time.monotonic() - now < 0.05:  # at once: give the predictions on their way time to come
                time.sleep(0.05)

    def _retraining(self, model: str, version: str) -> Any:
        """The version's enabled retraining section (its labels become training rows), or None."""
        if self.dataset is None:
            return None
        retraining = getattr(getattr(self.resolve(model, version), "config", None), "retraining", None)
        return retraining if retraining is not None and retraining.enabled else None

    def _route(self, model: str, versions: list[str], items: Sequence[FeedbackItem]) -> dict[str, list[FeedbackItem]]:
        """{version: its items}: each item to the first version whose prediction log holds its
        request id; those no version holds (unknown, expired, or a version without quality) to
        the first version, which answers them as unmatched."""
        groups: dict[str, list[FeedbackItem]] = {v: [] for v in versions}
        left = list(items)
        for v, quality in self._logs(model, versions):
            if not left:
                break
            try:
                held = quality.holds([str(it.request_id) for it in left])
            except Exception:  # the store is down: the first version's join says so (503)
                log.warning("event=feedback_route_failed model=%s version=%s", model, v, exc_info=True)
                break
            groups[v] += [it for it, h in zip(left, held) if h]
            left = [it for it, h in zip(left, held) if not h]
        groups[versions[0]] += left
        return groups

    async def _join(self, model: str, version: str, items: Sequence[FeedbackItem]) -> FeedbackResult:
        """Join ``items`` to ``version``'s predictions (live quality) and held inputs (retraining)."""
        vm = await asyncio.to_thread(self._ensure, model, version)
        retraining = self._retraining(model, version)
        quality = vm.quality if vm is not None else None
        if quality is None:
            result = FeedbackResult(errors=[f"no quality monitoring for {model} {version}"])
            result.add_unmatched([it.request_id for it in items])
        else:
            result = await asyncio.to_thread(quality.feedback, items)
        if retraining is not None:
            # only labels the model can take become training rows: one it cannot (a class the
            # model does not have) would fail every retraining that read it. Judged per example
            # (a request of several records takes a list) from the model's outputs, not from the
            # kept prediction, which may have expired while the held inputs have not
            fresh = list(items)
            if quality is not None:
                # what the quality join refused against the kept prediction (a class the model does
                # not have, a list whose length is not the request's examples) stays out; without
                # a kept prediction (expired) the labels are judged by the model's outputs
                refused = dict(await asyncio.to_thread(quality.check_labels, fresh) or {})
                refused.update((i, "") for i in result.rejected)
                if refused:
                    for it in fresh:
                        if it.index in refused and it.index not in result.rejected:  # else named already
                            result.errors.append(f"feedback[{it.index}] (request_id {show(it.request_id)}): "
                                                 f"{refused[it.index]}; not kept for retraining")
                    fresh = [it for it in fresh if it.index not in refused]
            if fresh:
                try:
                    result.kept = await asyncio.to_thread(self.dataset.join, model, version, fresh,
                                                          retraining.max_rows)
                except Exception:
                    log.exception("event=dataset_join_failed model=%s version=%s", model, version)
        return result

    def forget(self, model: str, version: str) -> None:
        with self._lock:
            self._versions.pop((model, version), None)
        self._last_refresh.pop((model, version), None)
        self._retry_at.pop((model, version), None)
        self.store.forget(model, version)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        self.store.close()

    # -- Prometheus ------------------------------------------------------------------------------------
    async def exposition(self) -> str:
        """:meth:`render` for the metrics endpoint (a monitor in its own process is asked)."""
        return self.render()

    def render(self, with_dropped: bool = True) -> str:
        """Text exposition of the drift families (and the quality parts' lines); without
        osprey_monitoring_dropped_total when ``with_dropped`` is false (a monitor in its own
        process: the server keeps that counter's running total, see monitoring.remote)."""
        lines: dict[str, list[str]] = {name: [] for name in _FAMILIES}

        def add(name: str, labels: str, value: float) -> None:
            lines[name].append(f"{name}{{{labels}}} {fmt(float(value))}\n" if labels else f"{name} {fmt(value)}\n")

        for (model, version), vm in sorted(self._all(), key=lambda kv: kv[0]):
            m = vm.metrics()
            base = f'model="{escape(model)}",version="{escape(version)}"'
            for feature, score in m["scores"]:
                add("osprey_drift_score", f'{base},feature="{escape(feature)}"', score)
            add("osprey_drift_detected", base, m["detected"])
            add("osprey_drift_episodes_total", base, m["episodes"])
            add("osprey_monitored_requests_total", base, m["requests"])
            add("osprey_monitoring_degraded", base, m["degraded"])
            if vm.quality is not None:
                try:
                    for line in vm.quality.render_lines():
                        name = line.split("{", 1)[0].split(" ", 1)[0]
                        lines.setdefault(name, []).append(line if line.endswith("\n") else line + "\n")
                except Exception:
                    log.exception("event=quality_render_failed model=%s version=%s", model, version)
        if with_dropped:
            add("osprey_monitoring_dropped_total", "", float(self.dropped))
        out = []
        for name, body in lines.items():
            if body:
                kind, doc = _FAMILIES.get(name, ("untyped", name))
                out.append(render_family(name, kind, doc, body))
        return "".join(out)


def merged(results: Sequence[FeedbackResult]) -> FeedbackResult:
    """One answer for labels joined to several versions (each result of its own items)."""
    out = FeedbackResult()
    for r in results:
        out.accepted += r.accepted
        out.invalid += r.invalid
        out.kept += r.kept
        out.errors += r.errors
        out.rejected |= r.rejected
        out.unmatched += r.unmatched
        out.unmatched_ids += r.unmatched_ids[:max(0, UNMATCHED_SHOWN - len(out.unmatched_ids))]
    return out

