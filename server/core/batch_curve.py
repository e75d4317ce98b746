"""What a model version's batches cost by size, learned from the batches it runs.

The batcher aims its batches with this (server/core/batching.py), for a model whose batches
run long enough to be worth aiming (``slow``: SLOW_S): which size serves the
most requests per second (``best``), whether batches should stop short of ``batch_size``
(``cap``: a compute-bound model can run a middle size faster than the largest; a
ResNet-sized CNN on two cores serves 189 images/s at 16 and 172 at 32), and how long any
size takes (``est``), so a hold can tell whether waiting for more requests pays.

Traffic alone measures only the sizes it happens to make: a batcher that settled at 32
would never learn that 16 runs faster. So every PROBE_EVERY dispatches :meth:`probe`
names one size to try, round robin over the powers of two up to the demand (a probe is one
batch in PROBE_EVERY, at a size within a factor of two of the usual ones: a fraction of a
percent of throughput). Measurements older than STALE_AFTER batches stop counting once
newer ones exist, so the first, cold batches do not steer the batcher for good.

Written here rather than taken from a library: this is the batcher's own policy (TorchServe,
Triton and MLServer have no such curve; Triton's model analyzer measures offline).
Everything runs on the event loop, O(1) per batch except a refit of O(batch_size) every
REFIT_EVERY batches or when a size is first measured.
"""

from __future__ import annotations

__all__ = ["BatchCurve"]

ALPHA = 0.2  # weight of a new run time in its size's moving average
REFIT_EVERY = 8  # batches between two refits of best, cap and est
PROBE_EVERY = 16  # dispatches between two probes
STALE_AFTER = 512  # batches after which a size's run time counts only if no size has a newer one
BEST_MARGIN = 1.05  # a middle size caps batches only when this much faster than every larger one
# Batches faster than this (at the largest size measured) are not steered at all (no cap, no
# probe): their run time is mostly the instance thread waiting for the GIL, not the model's
# work, and the loop's timers have millisecond resolution. The benchmark's MLP (0.4 ms at any
# size) measured 13% slower steered than left alone (benchmarks/CHANGES.md, session 17).
SLOW_S = 0.001


class BatchCurve:
    __slots__ = ("max_size", "runs", "seen", "batches", "best", "best_rate", "cap", "est", "slow",
                 "_until", "_grid", "_dispatches", "_probes")

    def __init__(self, max_size: int):
        self.max_size = max(1, int(max_size))
        n = self.max_size + 1
        self.runs = [0.0] * n  # moving average of a batch's run time (s), by size; 0: never measured
        self.seen = [0] * n  # the batch count when each size was last measured
        self.batches = 0
        self.best = 0  # the size measured to serve the most requests/s; 0 until one is measured
        self.best_rate = 0.0
        self.cap = self.max_size  # most requests one batch should carry
        self.slow = False  # batches run long enough (SLOW_S) for best, cap, est and probes to apply
        self.est = [0.0] * n  # run time (s) of each size: measured, else estimated
        self._until = REFIT_EVERY
        grid, size = [], 2
        while size < self.max_size:
            grid.append(size)
            size *= 2
        self._grid = grid + [self.max_size] if self.max_size > 1 else []
        self._dispatches = 0
        self._probes = 0

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

    def probe(self, demand: int) -> int:
        """Called once per dispatch: every PROBE_EVERY-th call, a size to try next (at most
        ``demand``, the requests one instance can expect), else 0."""
        self._dispatches += 1
        if self._dispatches % PROBE_EVERY or not self.slow:
            return 0
        grid = [s for s in self._grid if s <= demand]
        if len(grid) < 2:
            return 0
        self._probes += 1
        return grid[self._probes % len(grid)]

    def _refit(self) -> None:
        """Best size, cap, and a run time for every size: a size not measured is interpolated
        between its measured neighbours, or extended along the line through the two nearest,
        never shorter than a smaller size's."""
        runs, seen, now = self.runs, self.seen, self.batches
        measured = [i for i in range(1, len(runs)) if runs[i] > 0]
        known = [i for i in measured if now - seen[i] <= STALE_AFTER] or measured
        if not known:
            return
        self.best_rate, self.best = max((i / runs[i], i) for i in known)
        self.slow = runs[known[-1]] >= SLOW_S
        above = [i / runs[i] for i in known if i > self.best]
        steer = self.slow and above and self.best_rate >= BEST_MARGIN * max(above)
        self.cap = self.best if steer else self.max_size
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
