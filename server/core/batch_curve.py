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

Not done: capping batches at a middle size that measured faster than the largest (a
ResNet-sized CNN on two cores runs 189 images/s at 16 and 172 at 32, raw). Tried in session
17 with probes of other sizes; on this machine the noise in single batch times (±7%) made
the cap settle at the wrong size as often as the right one (benchmarks/CHANGES.md).
"""

from __future__ import annotations

__all__ = ["BatchCurve", "SLOW_S"]

ALPHA = 0.2  # weight of a new run time in its size's moving average
REFIT_EVERY = 8  # batches between two refits of est
STALE_AFTER = 512  # batches after which a size's run time counts only if no size has a newer one
# Batches faster than this (at some size in the upper half of those measured) are not aimed: their run time is
# mostly the instance thread waiting for the GIL, not the model's work, and the loop's timers
# have millisecond resolution. The benchmark's MLP (0.4 ms at any size) measured 9-13% slower
# aimed than left alone (benchmarks/CHANGES.md, session 17).
SLOW_S = 0.001


class BatchCurve:
    __slots__ = ("max_size", "runs", "seen", "batches", "est", "slow", "_until")

    def __init__(self, max_size: int):
        self.max_size = max(1, int(max_size))
        n = self.max_size + 1
        self.runs = [0.0] * n  # moving average of a batch's run time (s), by size; 0: never measured
        self.seen = [0] * n  # the batch count when each size was last measured
        self.batches = 0
        self.est = [0.0] * n  # run time (s) of each size: measured, else estimated
        self.slow = False  # batches run long enough (SLOW_S) to aim holds with est
        self._until = REFIT_EVERY

    def observe(self, size: int, seconds: float) -> None:
        """A batch of ``size`` requests ran for ``seconds``."""
        if not 0 < size <= self.max_size or not seconds > 0:
            return
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
