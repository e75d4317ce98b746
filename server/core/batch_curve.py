"""How long a model version's batches run by size, learned from the batches it runs.

The batcher's hold asks this (server/core/batching.py) whether waiting for more requests
pays: ``est[n]`` is the run time of a batch of ``n`` (measured, else interpolated between
the sizes measured, or extended along the line through the two nearest), and ``slow`` says
whether batches run long enough to be worth aiming at all (SLOW_S).

Measurements older than STALE_AFTER batches stop counting once newer ones exist, so the
first, cold batches do not steer the batcher for good.

Written here rather than taken from a library: this is the batcher's own policy (TorchServe,
Triton and MLServer have no such curve; Triton's model analyzer measures offline).
Everything runs on the event loop: O(1) per batch, plus a refit of O(batch_size) every
REFIT_EVERY batches (8 times less often for fast batches) or when a size is first measured.

**Half batches at saturation** (:meth:`BatchCurve.take`). Some models run a middle size
faster than the largest: the benchmark's ResNet-sized CNN on two cores runs 16 images about
10% faster than 32 raw, and served at c=128 answered 7.6% more with halves (5 paired rounds,
benchmarks/CHANGES.md session 24), but a queue that always holds ``batchSize`` requests sent it
batches of 32 only. While the queue holds a whole batch, a slow model runs a *trial* of TRIAL
batches of the other size (halves while running whole batches, wholes while running halves)
each time TRIAL batches of the running size were measured, until TRIALS trials have been run,
then one every EXPLORE_EVERY batches.
The trial's wall time per request, from the end of its SETTLE-th batch to the end of its last
(gaps between batches included: what a client sees), is compared with that of the TRIAL
batches of the running size before it, and the mean of the last TRIALS comparisons decides:
halves when they take under 1 - SPLIT_GAIN of the time a request takes in wholes. A trial is
dropped when the queue runs dry during it or some of its requests leave the queue. Only for a
version with one instance: with several, batches of both sizes run at once and no run of one
size can be timed (whole batches, as before).

Why runs of batches and wall time, not single batches' run times: a lone half batch between
whole ones runs while the event loop reads the whole batch's clients' next requests (the CNN:
32 bodies of 150 KB), and measured 4% *slower* per request than its whole neighbours in the
server; a run of 16 halves ran each 8.6% slower than the wholes around it, batch by batch,
and still served more requests a second: the gaps between batches shrank. Runs of halves
answered 7.6% more. Session 17 capped batches
from single run times and settled on the wrong size as often as on the right one. Only at
saturation: below it the hold's target (halves when measured faster, :meth:`Batcher.target`)
decides. After the first TRIALS trials, a trial costs at most TRIAL batches at the worse size
every EXPLORE_EVERY.
"""

from __future__ import annotations

import collections

__all__ = ["BatchCurve", "SLOW_S", "RUNNING", "TRIED"]

ALPHA = 0.2  # weight of a new run time in its size's moving average
REFIT_EVERY = 8  # batches between two refits of est
STALE_AFTER = 512  # batches after which a size's run time counts only if no size has a newer one
# Batches faster than this (at some size in the upper half of those measured) are not aimed: their run time is
# mostly the instance thread waiting for the GIL, not the model's work, and the loop's timers
# have millisecond resolution. The benchmark's MLP (0.4 ms at any size) measured 9-13% slower
# aimed than left alone (benchmarks/CHANGES.md, session 17).
SLOW_S = 0.001
EXPLORE_EVERY = 256  # saturated batches between two trials of the other size
TRIAL = 16  # batches in a trial, and batches of the running size it is compared with
SETTLE = 2  # batches not counted at a trial's start and after it: the loop still carries the other size's clients
TRIALS = 4  # trials whose mean decides (the first ones run one after another; the first decides alone)
SPLIT_GAIN = 0.03  # halves must take this much less time a request than whole batches
RUNNING, TRIED = 1, 2  # what BatchCurve.take says a batch taken at saturation is (0: below it)


class BatchCurve:
    __slots__ = ("max_size", "runs", "seen", "batches", "est", "slow", "_until", "split", "trials", "_home",
                 "_settle", "_saturated", "_trial_size", "_trial_left", "_trial_seen", "_trial_rows", "_trial_from",
                 "_trial_to")

    def __init__(self, max_size: int):
        self.max_size = max(1, int(max_size))
        n = self.max_size + 1
        self.runs = [0.0] * n  # moving average of a batch's run time (s), by size; 0: never measured
        self.seen = [0] * n  # the batch count when each size was last measured
        self.batches = 0
        self.est = [0.0] * n  # run time (s) of each size: measured, else estimated
        self.slow = False  # batches run long enough (SLOW_S) to aim holds with est
        self._until = REFIT_EVERY
        self.split = False  # at saturation, batches of half max_size (see take)
        self.trials: collections.deque[float] = collections.deque(maxlen=TRIALS)  # halves' time a request / wholes'
        # (size, when it ended) of the last batches of the running size, one after another
        self._home: collections.deque[tuple[int, float]] = collections.deque(maxlen=TRIAL)
        self._settle = 0  # batches of the running size still not counted after a trial
        self._saturated = 0  # saturated batches taken since the last trial
        self._trial_size = 0  # the size on trial (0: none)
        self._trial_left = 0  # trial batches still to take
        self._trial_seen = 0  # trial batches back
        self._trial_rows = 0  # requests of the trial's batches counted, and when the first started and the last ended
        self._trial_from = self._trial_to = 0.0

    def take(self, queued: int, instances: int = 1) -> tuple[int, int]:
        """(most requests the next batch takes, what it is: RUNNING or TRIED at saturation, else
        0) with ``queued`` live requests waiting. Below saturation, for a fast model, a max_size
        under 4 or more than one instance, up to max_size as always (0); at saturation halves or
        wholes as the trials decided (module doc). The batcher hands each batch's mark back to
        :meth:`observe`, one batch per handoff."""
        whole = self.max_size
        half = whole // 2
        if queued < whole or not self.slow or half < 2 or instances != 1:
            return whole, 0
        if self._trial_left:
            self._trial_left -= 1
            return self._trial_size, TRIED
        self._saturated += 1
        # the first TRIALS trials each as soon as the running size is measured again, then one every
        # EXPLORE_EVERY (which also replaces a trial whose batches never came back: its instance was lost)
        if len(self._home) == TRIAL and (self._saturated >= EXPLORE_EVERY
                                         or (len(self.trials) < TRIALS and not self._trial_size)):
            self._saturated = 0
            self._trial_size = whole if self.split else half
            self._trial_left = TRIAL - 1
            self._trial_seen = self._trial_rows = 0
            self._trial_from = self._trial_to = 0.0
            return self._trial_size, TRIED
        return (half if self.split else whole), RUNNING

    def _judge(self) -> None:
        """A trial ended: compare the requests it served a second with the running size's, and decide."""
        half = self.max_size // 2
        home = self._home
        home_rows = sum(n for n, _ in home) - home[0][0] if len(home) > 1 else 0
        home_s = home[-1][1] - home[0][1] if len(home) > 1 else 0.0  # from the first one's end: as many batches as rows
        trial_s = self._trial_to - self._trial_from
        if self._trial_rows and home_rows and trial_s > 0 and home_s > 0:
            trial, running = trial_s / self._trial_rows, home_s / home_rows  # seconds a request, gaps included
            self.trials.append(trial / running if self._trial_size == half else running / trial)
            self.split = sum(self.trials) / len(self.trials) < 1 - SPLIT_GAIN
        self._end_trial()

    def _end_trial(self) -> None:
        """No trial running; the running size is measured afresh, from SETTLE batches on."""
        self._trial_size = self._trial_left = 0
        self._settle = SETTLE
        self._home.clear()

    def observe(self, size: int, seconds: float, mark: int = 0, finished: float = 0.0) -> None:
        """A batch of ``size`` requests ran for ``seconds``, ending at ``finished`` (monotonic);
        ``mark``: what :meth:`take` said it was."""
        if not 0 < size <= self.max_size or not seconds > 0:
            return
        if self.slow:  # (fast models never run trials: nothing to follow)
            self._follow(size, mark, finished)
        self._learn(size, seconds)

    def _follow(self, size: int, mark: int, finished: float) -> None:
        if mark == TRIED or self._trial_size:
            self._trial(size, mark == TRIED, finished)
        elif mark == RUNNING and size == (self.max_size // 2 if self.split else self.max_size):
            if self._settle:
                self._settle -= 1
            else:
                self._home.append((size, finished))
        else:  # below saturation, or requests cancelled: the running size's batches are no longer in a row
            self._home.clear()

    def _trial(self, size: int, tried: bool, finished: float) -> None:
        if not tried or not self._trial_size:  # the queue ran dry during the trial: it is not a fair one
            self._end_trial()
            return
        self._trial_seen += 1
        if self._trial_seen == SETTLE:
            self._trial_from = finished  # counted from here: the requests of the batches that end after it
        elif self._trial_seen > SETTLE:
            if size != self._trial_size:  # some of its requests were cancelled in the queue
                self._end_trial()
                return
            self._trial_rows += size
            self._trial_to = finished
        if self._trial_seen >= TRIAL:
            self._judge()

    def _learn(self, size: int, seconds: float) -> None:
        self.batches += 1
        runs = self.runs
        fresh = runs[size] <= 0 or self.batches - self.seen[size] > STALE_AFTER
        runs[size] = seconds if fresh else runs[size] + ALPHA * (seconds - runs[size])
        self.seen[size] = self.batches
        self._until -= 1
        if fresh or self._until <= 0:
            self._refit()
            self._until = REFIT_EVERY if self.slow else 8 * REFIT_EVERY  # fast batches: cheaper bookkeeping

    def _refit(self) -> None:
        """A run time for every size: a size not measured is interpolated between its measured
        neighbours, or extended along the line through the two nearest, never shorter than a
        smaller size's."""
        runs, seen, now = self.runs, self.seen, self.batches
        measured = [i for i in range(1, len(runs)) if runs[i] > 0]
        known = [i for i in measured if now - seen[i] <= STALE_AFTER] or measured
        if not known:
            return
        # every size of the upper half measured runs that long: one batch stalled on the GIL
        # (a fast model's 0.4 ms batch can take 2 ms now and then) does not make it slow
        self.slow = min(runs[i] for i in known if i >= known[-1] // 2) >= SLOW_S
        est = self.est
        j = 0  # known[j] is the first measured size >= i
        for i in range(1, len(runs)):
            while j < len(known) and known[j] < i:
                j += 1
            if j < len(known) and known[j] == i:
                est[i] = max(runs[i], 1e-9)
                continue
            if len(known) == 1:
                est[i] = runs[known[0]]
                continue
            if 0 < j < len(known):
                lo, hi = known[j - 1], known[j]
            else:
                lo, hi = (known[0], known[1]) if j == 0 else (known[-2], known[-1])
            est[i] = max(runs[lo] + (runs[hi] - runs[lo]) * (i - lo) / (hi - lo), est[i - 1], 1e-9)
