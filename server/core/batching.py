"""Per-model-version dynamic batcher: bounded queue, deadlines, cancellation.

Work-conserving at low load: whenever an instance is idle and requests are queued, the
queued requests leave as one batch of up to ``batch_size``. While every instance is busy,
arrivals queue up and leave together. The only wait ever added is a short *hold*, for the
clients a batch has just answered:

- the *target* of a batch is the requests clients have had outstanding lately (queued plus
  running, the most over the last DEMAND_WINDOW dispatches) shared among the instances, at
  most ``batch_size``; half of that when two half batches run no slower than one whole, so
  one half runs while the other's clients come back (32 clients of the benchmark's CNN:
  batches of 16, 174 req/s, against 31 and 1 in turn, 162). A lone client's target is 1: its
  request never waits;
- an idle instance with fewer than the target queued waits for more when running the target
  as one batch is measurably faster than as two (HOLD_GAIN; run times by size are learned
  from the batches themselves, server/core/batch_curve.py), for at most
  ``min(max_batch_delay, the target's run time)`` (never under HOLD_MIN_S), counted from when
  it became idle or from the oldest queued arrival, whichever is later (TorchServe's worker,
  once free, likewise waits up to maxBatchDelay for its batch to fill);
- without it, closed-loop clients that the last batch answered come back just after the
  instance has left with the one or two queued meanwhile: batches alternate small and large
  (1 and 7 for eight clients of the benchmark's CNN, 130 req/s; 8 and 8 with the hold, 160).

While the queue holds a whole batch or more (saturation), a model that measurably serves
requests faster in half batches is sent halves (``BatchCurve.take``: decided from trials of 16
batches of the other size, now and then, against the 16 batches of the running size before
each; the benchmark's CNN answered 7.6% more at c=128 in halves on two cores).

A model whose batches run in under a millisecond (``BatchCurve.slow`` false: the benchmark's
MLP) is not aimed: its run times are mostly its thread waiting for the GIL, and aiming it
measured 9-13% slower. Its only hold is for a burst in progress: while recent batches were much
larger than what is queued, an idle instance waits at most ``min(max_batch_delay, recent
batch time)`` after the oldest queued request arrived.

Everything here runs on the event loop; instances run batches in their own threads and
call back :meth:`Batcher._done` on the loop. Cancelled or expired requests are dropped
before a batch is formed; a request's future is resolved once (set only if not done), so a
caller that cancels never takes its batch-mates down with it.

Nothing a request carries can jam the batcher: a deadline that is not a finite time is
refused at :meth:`Batcher.submit`. If handing a batch to an instance raises, that instance
is retired (stopped, never idle again, logged with the traceback) and only that batch's
requests are answered, with a generic error; the other instances go on serving.

Requests refused on a full queue are counted and logged as one ``event=queue_full`` line
per model version per QUEUE_FULL_LOG_INTERVAL_S (the first refusal opens the window, the
line at its end carries how many were refused in it), so a burst cannot flood the log.
Instances can be lost (a child process died, a hung one was replaced): :meth:`Batcher.lose`
answers only the requests that instance was running. A handoff still running
``hang_after_s`` after it started (the model's responseTimeout plus a grace) is reported
to ``on_hung(instance, seconds)``; the registry decides what to do (kill, abandon, restart).
While the registry restarts instances (``restarting``) requests keep queueing.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import math
import time
from typing import Callable, Iterable

from server.core.batch_curve import BatchCurve
from server.core.errors import ErrorKind, OspreyError
from server.core.events import event
from server.core.instance import InstanceStatus
from server.core.types import Protocol, Ticket

__all__ = ["Batcher"]

_DESCRIBE = Protocol.DESCRIBE
log = logging.getLogger("osprey.batching")

SWEEP_INTERVAL = 0.01  # seconds between checks of queued requests' deadlines
DEADLINE_SLACK_S = 0.005  # a hung handoff's requests due within this are answered as timed out (timer rounding)
BUNDLE_BUDGET_S = 0.001  # most work (seconds) one handoff to an instance may carry
MAX_BUNDLE = 32  # most batches in one handoff
QUEUE_FULL_LOG_INTERVAL_S = 5.0  # at most one queue_full line per model version this often
DEMAND_WINDOW = 8  # dispatches over which the most outstanding requests is remembered
HOLD_GAIN = 1.05  # hold only if two batches (queued now, the rest later) take this much longer than one
HOLD_MIN_S = 0.001  # no aimed hold shorter than this: the loop's timers have millisecond resolution


class _Completions:
    """What instances hand back, collected for the loop: stands in for the loop in
    ``Instance.submit`` (its ``call_soon_threadsafe`` is the only method instances call).

    An instance thread appends its outcomes here and wakes the loop as before; the batcher also
    runs them *early*, from :meth:`Batcher.admit` and :meth:`Batcher.submit`, i.e. between two
    requests the loop is reading. Under overload one loop iteration reads hundreds of requests;
    without this an instance that finished early in the iteration waited, idle, for its end
    before it got its next batch, and the queue bound let only ``queue_size`` requests in per
    iteration: the model starved while the loop refused work.
    """

    __slots__ = ("loop", "items")

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.items: collections.deque = collections.deque()

    def call_soon_threadsafe(self, callback, *args) -> None:  # from an instance thread
        self.items.append((callback, args))
        self.loop.call_soon_threadsafe(self.run)

    def run(self) -> None:  # on the loop
        items = self.items
        while items:
            callback, args = items.popleft()
            try:
                callback(*args)
            except Exception:  # one failing completion must not strand the others (or the caller)
                log.exception("completion %r failed", callback)


class Batcher:
    def __init__(self, name: str, version: str, *, batch_size: int, max_batch_delay_s: float,
                 queue_size: int, loop: asyncio.AbstractEventLoop,
                 on_batch: Callable[[list[Ticket]], None] | None = None,
                 hang_after_s: float | None = None, on_hung: Callable | None = None,
                 running_timeout: Callable[[], OspreyError] | None = None):
        self.name, self.version = name, version
        self.batch_size = max(1, int(batch_size))
        self.max_batch_delay_s = max(0.0, float(max_batch_delay_s))
        self.queue_size = max(1, int(queue_size))
        self.loop = loop
        self.queue: collections.deque[Ticket] = collections.deque()
        self.idle: list = []
        self.busy: set = set()
        self.in_flight = 0
        self._retiring: set = set()
        self._timer: asyncio.TimerHandle | None = None  # the hold
        self._sweeper: asyncio.TimerHandle | None = None  # queued deadlines
        self._batch_timers: dict[int, asyncio.TimerHandle] = {}  # running deadlines
        self._ewma_exec = 0.0
        self._ewma_batch = 1.0  # recent batch sizes: the hold of a model whose batches run fast
        self.batching = self.batch_size > 1  # batchSize 1: no hold, nothing to learn
        self.curve = BatchCurve(self.batch_size)  # run time by batch size: whether a hold pays
        self._aimed = False  # the curve says batches run long enough to aim (BatchCurve.slow)
        self._marked: tuple[list, int] | None = None  # the last batch taken at saturation, what BatchCurve.take said it was
        self._freed = 0.0  # when an instance last became idle
        self._demand_now = 0  # most requests outstanding (queued + running) since the last dispatch
        self._demand: collections.deque[int] = collections.deque(maxlen=DEMAND_WINDOW)
        self.on_batch = on_batch
        self._full_refused = 0  # refused on a full queue since the last queue_full line
        self._full_timer: asyncio.TimerHandle | None = None  # ends the window, logs the line
        self.hang_after_s = hang_after_s
        self.on_hung = on_hung
        # the error a request still running at its deadline is answered (server/core/worker_lines.py)
        self.running_timeout = running_timeout or (lambda: OspreyError(
            ErrorKind.DEADLINE, "Request timed out while running (deadline exceeded)"))
        self.hung_in_a_row = 0  # handoffs reported hung since one last finished (TorchServe's failedInfReqs)
        self.restarting = 0  # instances the registry is restarting: requests may queue for them
        self._running: dict = {}  # instance -> [handoff (list of batches), start time, reported hung]
        self._watchdog: asyncio.TimerHandle | None = None  # checks running handoffs while there are any
        self._completions = _Completions(loop)
        self._dead = 0  # queue entries already answered (marked queued == 2), not yet dropped
        self.refused = 0  # requests refused because the queue was full (admission or submit)
        self._full_message = (f"Model \"{name}\" version {version}: job queue is full "
                              f"({self.queue_size} requests waiting); retry later")
        self._no_worker_message = (f"Model \"{name}\" version {version} has no worker to serve inference request. "
                                   "Please use scale workers API to add workers.")

    # --- instances ------------------------------------------------------------------
    @property
    def instances(self) -> int:
        return len(self.idle) + len(self.busy) - len(self._retiring) + self.restarting

    def add_instance(self, inst) -> None:
        self.idle.append(inst)
        self._freed = time.monotonic()
        self._dispatch()

    def remove_instances(self, count: int) -> list:
        """Take ``count`` instances out of service; busy ones leave after their batch."""
        removed = []
        while count > 0 and self.idle:
            removed.append(self.idle.pop())
            count -= 1
        for inst in list(self.busy):
            if count <= 0:
                break
            if inst not in self._retiring:
                self._retiring.add(inst)
                removed.append(inst)
                count -= 1
        for inst in removed:
            if inst not in self._retiring:
                inst.stop()
        return removed

    def all_instances(self) -> Iterable:
        return [*self.idle, *self.busy]

    # --- requests -------------------------------------------------------------------
    @property
    def pending(self) -> int:
        """Requests waiting for an instance: O(1). Entries already answered while queued (deadline
        passed, caller cancelled) are not counted; a request whose client went away is, until a
        dispatch finds it gone."""
        return len(self.queue) - self._dead

    def admit(self) -> None:
        """Raise what :meth:`submit` would raise for the queue's state (full, no instance), without a
        request: the front ends call it before reading or decoding a body, so refusing is cheap."""
        if self._completions.items and len(self.queue) - self._dead >= self.batch_size:
            self._completions.run()  # an instance is done and a full batch waits: hand it over now
        if len(self.queue) - self._dead >= self.queue_size:
            raise self._queue_full()
        if self.instances <= 0:
            raise OspreyError(ErrorKind.UNAVAILABLE, self._no_worker_message)

    def submit(self, req: Ticket) -> asyncio.Future:
        """Queue ``req``; its future is resolved once with the answer or an OspreyError."""
        if self._completions.items and len(self.queue) - self._dead >= self.batch_size:
            self._completions.run()  # as in admit
        if len(self.queue) - self._dead >= self.queue_size:
            raise self._queue_full()
        if self.instances <= 0:
            raise OspreyError(ErrorKind.UNAVAILABLE, self._no_worker_message)
        if req.deadline is not None and not (isinstance(req.deadline, (int, float)) and math.isfinite(req.deadline)):
            raise OspreyError(ErrorKind.BAD_INPUT, f"Request deadline must be a finite time, got {req.deadline!r} "
                                                   "(check the request's 'timeout' and the model's responseTimeout)")
        if req.deadline is not None and req.deadline <= time.monotonic():
            raise OspreyError(ErrorKind.DEADLINE, "Request deadline passed before it could be queued")
        fut = self.loop.create_future()
        fut.add_done_callback(functools.partial(self._answered, req))
        req.future = fut
        req.queued = 1
        self.queue.append(req)
        if self._aimed:
            outstanding = self.in_flight + len(self.queue) - self._dead
            if outstanding > self._demand_now:
                self._demand_now = outstanding
        if self.idle:
            self._dispatch()
        if self.queue and self._sweeper is None:
            self._sweeper = self.loop.call_later(SWEEP_INTERVAL, self._sweep)
        return fut

    def _queue_full(self) -> OspreyError:
        """The error for a request refused on a full queue (at admission or submit); counted
        for the metrics and for the rate-limited queue_full log line."""
        self.refused += 1
        self._full_refused += 1
        if self._full_timer is None:
            self._full_timer = self.loop.call_later(QUEUE_FULL_LOG_INTERVAL_S, self._log_queue_full)
        return OspreyError(ErrorKind.QUEUE_FULL, self._full_message, retry_after=1)

    def _log_queue_full(self) -> None:
        if self._full_timer is not None:
            self._full_timer.cancel()
            self._full_timer = None
        if self._full_refused:
            event(log, "queue_full", logging.WARNING, model=self.name, version=self.version,
                  refused=self._full_refused, queue_size=self.queue_size, window_s=QUEUE_FULL_LOG_INTERVAL_S)
            self._full_refused = 0

    def _answered(self, req: Ticket, fut: asyncio.Future) -> None:
        """``req``'s future is done. If it is still queued (its caller cancelled, its deadline passed),
        it no longer counts against the queue bound; the entry itself leaves at the next dispatch or
        when half the queue is such entries (O(queue) then: O(1) amortized per entry)."""
        if req.queued == 1:
            req.queued = 2
            self._dead += 1
            if self._dead > 32 and self._dead * 2 > len(self.queue):
                self._purge()

    # --- deadlines: one sweep timer for the queue, one timer per running batch ------
    def _sweep(self) -> None:
        """Answer queued requests whose deadline has passed (every SWEEP_INTERVAL while queued)."""
        self._sweeper = None
        now = time.monotonic()
        answered = False
        for r in self.queue:
            if r.future.done():
                answered = True
            elif r.deadline is not None and r.deadline <= now:
                r.future.set_exception(OspreyError(ErrorKind.DEADLINE, "Request timed out in the queue (deadline exceeded)"))
                answered = True
        if answered:  # this pass is O(queue) already: drop the answered entries with it
            self._purge()
        if self.queue:
            self._sweeper = self.loop.call_later(SWEEP_INTERVAL, self._sweep)

    def _expire_running(self, batch: list[Ticket]) -> None:
        """Answer 504 to requests of a running batch whose deadline has passed; re-arm for the rest.

        Loop timers may fire a little early (uvloop rounds to milliseconds), so a request
        not yet due keeps a timer of its own batch rather than being forgotten.
        """
        now = time.monotonic()
        pending = self._answer_due(batch, now + 0.0005)
        if pending:
            self._batch_timers[id(batch)] = self.loop.call_later(min(pending) - now, self._expire_running, batch)
        else:
            self._batch_timers.pop(id(batch), None)

    def _purge(self) -> None:
        """Drop every entry already answered (deadline, cancelled): rebuilds the deque, O(queue); called
        by the sweep (which walks the queue anyway) and when half the queue is dead, never per refusal."""
        live = collections.deque()
        for r in self.queue:
            if r.future.done():
                r.queued = 0
            else:
                live.append(r)
        self.queue = live
        self._dead = 0

    # --- dispatch -------------------------------------------------------------------
    def target(self) -> int:
        """The batch size an idle instance waits for (see the module's docstring): the most
        requests outstanding lately, shared among the instances, at most batch_size; half of
        that when two half batches run no slower than one whole (then one half runs while the
        other half's clients come back, where one whole batch would leave the instance idle
        for their round trip)."""
        demand = max(self._demand_now, max(self._demand, default=0))
        target = min(self.batch_size, -(-demand // max(1, len(self.idle) + len(self.busy))))
        half = (target + 1) // 2
        est = self.curve.est
        return half if target >= 4 and 2 * est[half] <= est[target] else target

    def _hold(self, now: float) -> float:
        """Seconds to keep waiting for more requests before sending a partial batch.

        Worth it when running what is queued now and the rest of the target later takes
        HOLD_GAIN times as long as running the target at once: for a model whose run time
        grows in proportion to the batch it never is."""
        queued = len(self.queue) - self._dead
        if queued >= self.batch_size or self.max_batch_delay_s <= 0:
            return 0.0
        if not self._aimed:  # fast batches: wait only while a burst is on, at most one batch's time
            if self._ewma_batch < 2 * queued + 2:
                return 0.0
            return self.queue[0].timings.received + min(self.max_batch_delay_s, self._ewma_exec) - now
        target = self.target()
        est = self.curve.est
        limit = min(self.max_batch_delay_s, est[target])
        if queued >= target or limit < HOLD_MIN_S or est[queued] + est[target - queued] < HOLD_GAIN * est[target]:
            return 0.0
        return max(self.queue[0].timings.received, self._freed) + limit - now

    def _on_timer(self) -> None:
        self._timer = None
        self._dispatch(force=True)

    def _bundle_limit(self) -> int:
        """How many batches one handoff to an instance may carry.

        Waking a thread and waking the loop back cost tens of microseconds each; when
        batches are fast (tiny models, batchSize 1) an instance takes several queued
        batches at once, runs them back to back and reports once. Only while no other
        instance is idle, and never more than BUNDLE_BUDGET_S of work, so latency stays put.
        """
        if len(self.idle) > 1 or self._ewma_exec <= 0:
            return 1
        return max(1, min(MAX_BUNDLE, int(BUNDLE_BUDGET_S / self._ewma_exec)))

    def _take(self, now: float, most: int) -> list[Ticket]:
        """Up to ``most`` live requests from the head of the queue."""
        batch: list[Ticket] = []
        queue = self.queue
        while queue and len(batch) < most:
            r = queue[0]
            # a describe runs in a batch of its own (one already cancelled is only dropped below)
            alone = r.request.protocol is _DESCRIBE and not r.future.done()
            if alone and batch:
                break
            queue.popleft()
            if r.queued == 2:
                self._dead -= 1
            r.queued = 0
            fut = r.future
            if fut.done():  # cancelled by its caller or expired
                continue
            if r.client is not None and r.client.disconnected:
                fut.cancel()
                continue
            if r.deadline is not None and now >= r.deadline:
                fut.set_exception(OspreyError(ErrorKind.DEADLINE, "Request timed out in the queue (deadline exceeded)"))
                continue
            r.timings.dispatched = now
            if r.run_timeout is not None:  # the model's responseTimeout, from now (TorchServe's count)
                limit = now + r.run_timeout
                if r.request.deadline is None or r.request.deadline > limit:
                    r.request.deadline = limit
            batch.append(r)
            if alone:
                break
        return batch

    def _dispatch(self, force: bool = False) -> None:
        while self.idle and self.queue:
            now = time.monotonic()
            if not force:
                wait = self._hold(now)
                if wait > 0:
                    if self._timer is None:
                        self._timer = self.loop.call_later(wait, self._on_timer)
                    return
            limit = self._bundle_limit()
            batches = []
            size, mark = self.batch_size, 0
            if self._aimed:  # at saturation, half batches where they measured faster (BatchCurve.take)
                size, mark = self.curve.take(len(self.queue) - self._dead, len(self.idle) + len(self.busy))
                if mark:
                    limit = 1  # the curve times runs of single batches
            while self.queue and len(batches) < limit:
                batch = self._take(now, size)
                if batch:
                    batches.append(batch)
            if not batches:
                continue
            if mark:
                self._marked = (batches[0], mark)
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            for batch in batches:
                self._arm(batch, now)
            inst = self.idle.pop()
            self.busy.add(inst)
            for batch in batches:
                self.in_flight += len(batch)
                if batch[0].request.protocol is not _DESCRIBE:
                    self._ewma_batch += 0.2 * (len(batch) - self._ewma_batch)
            if self._aimed:
                self._demand.append(self._demand_now)
                self._demand_now = self.in_flight + len(self.queue) - self._dead
            self._running[inst] = [batches, now, False]
            if self._watchdog is None and self.hang_after_s is not None:
                self._watchdog = self.loop.call_later(self._watch_interval(), self._check_hung)
            try:
                inst.submit(batches, self._completions, self._done)
            except Exception:  # the instance is broken: retire it, answer only these requests
                log.exception("model %s version %s: handing a batch to instance %s failed; retiring the instance",
                              self.name, self.version, getattr(inst, "id", "?"))
                self.busy.discard(inst)
                self._retiring.discard(inst)
                self._running.pop(inst, None)
                inst.stop()
                for batch in batches:
                    self.in_flight -= len(batch)
                    self._fail_batch(batch, OspreyError(
                        ErrorKind.INTERNAL, f"Model \"{self.name}\" version {self.version}: could not hand the batch "
                                            "to an instance; the server log has the details"))
                if self.instances <= 0:  # that was the last one: queued requests would wait for nothing
                    self.fail_all(OspreyError(ErrorKind.UNAVAILABLE, f"Model \"{self.name}\" version {self.version} "
                                                                     "has no worker left to serve inference requests"))

    def _arm(self, batch: list[Ticket], now: float) -> None:
        """Start the running-deadline timer of ``batch`` (deadlines are finite: see submit)."""
        deadlines = [r.deadline for r in batch if r.deadline is not None]
        if deadlines:
            self._batch_timers[id(batch)] = self.loop.call_later(min(deadlines) - now, self._expire_running, batch)

    def _fail_batch(self, batch: list[Ticket], error: OspreyError) -> None:
        timer = self._batch_timers.pop(id(batch), None)
        if timer is not None:
            timer.cancel()
        for r in batch:
            if not r.future.done():
                r.future.set_exception(error)

    def _answer_due(self, batch: list[Ticket], until: float) -> list[float]:
        """Answer the running timeout to the requests of ``batch`` due by ``until``; the deadlines
        of those not due yet."""
        later = []
        for r in batch:
            if r.deadline is None or r.future.done():
                continue
            if r.deadline <= until:
                r.future.set_exception(self.running_timeout())
            else:
                later.append(r.deadline)
        return later

    def _watch_interval(self) -> float:
        """How often the watchdog looks at running handoffs: one timer per batcher, not per handoff."""
        return max(0.05, min(1.0, self.hang_after_s / 4))

    def _check_hung(self) -> None:
        """Report each handoff running past ``hang_after_s`` once; re-arm while any runs."""
        self._watchdog = None
        now = time.monotonic()
        for inst, entry in list(self._running.items()):
            if not entry[2] and now - entry[1] >= self.hang_after_s and self.on_hung is not None:
                entry[2] = True
                # its requests already due get the running-deadline answer, not the lost worker's:
                # with no grace (TorchServe's lifecycle) this check and their timer fall due in the
                # same millisecond, and a timer firing a hair early re-arms and would lose the race
                for batch in entry[0]:
                    self._answer_due(batch, now + DEADLINE_SLACK_S)
                self.hung_in_a_row += 1
                try:
                    self.on_hung(inst, now - entry[1])
                except Exception:
                    log.exception("model %s version %s: hang handler failed", self.name, self.version)
        if self._running and self.hang_after_s is not None:
            self._watchdog = self.loop.call_later(self._watch_interval(), self._check_hung)

    def lose(self, inst, error: OspreyError) -> None:
        """``inst`` is gone (crashed, killed, abandoned): answer ``error`` to what it was running,
        never hand it work again; a late ``_done`` from it is ignored."""
        entry = self._running.pop(inst, None)
        for batch in entry[0] if entry is not None else ():
            self.in_flight -= len(batch)
            self._fail_batch(batch, error)
        self.busy.discard(inst)
        self._retiring.discard(inst)
        if inst in self.idle:
            self.idle.remove(inst)
        if self.instances <= 0:  # nothing left and nothing coming back: queued requests would wait in vain
            self.fail_all(OspreyError(ErrorKind.UNAVAILABLE, f"Model \"{self.name}\" version {self.version} "
                                                             "has no worker left to serve inference requests"))
        else:
            self._dispatch()

    def _done(self, inst, batches: list[list[Ticket]], outcomes: list[list]) -> None:
        entry = self._running.get(inst)
        if entry is None or entry[0] is not batches:  # the instance was lost meanwhile: already answered
            return
        del self._running[inst]
        self.hung_in_a_row = 0
        for batch, batch_outcomes in zip(batches, outcomes):
            timer = self._batch_timers.pop(id(batch), None)
            if timer is not None:
                timer.cancel()
            self.in_flight -= len(batch)
            describe = bool(batch) and batch[0].request.protocol is _DESCRIBE  # no prediction: not learnt from
            if batch and batch[0].timings.finished and not describe:
                t = batch[0].timings
                took = t.finished - t.started
                self._ewma_exec += 0.2 * (took - self._ewma_exec)
                if self.batching:
                    marked = self._marked
                    mark = 0
                    if marked is not None and marked[0] is batch:
                        mark = marked[1]
                        self._marked = None
                    self.curve.observe(len(batch), took, mark, t.finished)
                    self._aimed = self.curve.slow
            for r, outcome in zip(batch, batch_outcomes):
                fut = r.future
                if not fut.done():
                    if isinstance(outcome, OspreyError):
                        fut.set_exception(outcome)
                    else:
                        fut.set_result(outcome)
            if self.on_batch is not None and not describe:
                try:
                    self.on_batch(batch)
                except Exception:  # an observer must never keep the instance busy
                    log.exception("model %s version %s: batch observer failed", self.name, self.version)
        self.busy.discard(inst)
        if inst in self._retiring:
            self._retiring.discard(inst)
            inst.stop()
        elif inst.status == InstanceStatus.READY:
            self.idle.append(inst)
            if self._aimed:
                self._freed = time.monotonic()
        self._dispatch()

    def release(self) -> None:
        """The version is unregistered and its instances have ended: drop every reference
        (instances, the batch observer, timers), so nothing here keeps them alive."""
        for timer in (self._timer, self._sweeper, self._watchdog, *self._batch_timers.values()):
            if timer is not None:
                timer.cancel()
        self._timer = self._sweeper = self._watchdog = None
        self._batch_timers.clear()
        self._running.clear()
        self.idle.clear()
        self.busy.clear()
        self._retiring.clear()
        self.on_batch = self.on_hung = None

    def fail_all(self, error: OspreyError) -> None:
        """Answer every queued request with ``error`` (model unloaded)."""
        while self.queue:
            r = self.queue.popleft()
            r.queued = 0
            if not r.future.done():
                r.future.set_exception(error)
        self._dead = 0
        for timer in (self._timer, self._sweeper):
            if timer is not None:
                timer.cancel()
        self._timer = self._sweeper = None
        self._log_queue_full()  # the refusals of an open window, now
