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
faster than the largest: the benchmark's ResNet-sized CNN on two cores runs 16 images 11%
faster than 32 (median of 8 paired rounds, benchmarks/CHANGES.md session 24), and a queue that
always holds ``batchSize`` requests sent it batches of 32 only. While the queue holds a whole
batch, every PROBE_EVERY-th batch of a slow model is the other size (half when running whole
batches, whole when running halves), and each probe is paired with the other size's moving
average at that moment: ``2 * t(half) / t(whole)``. The mean of the last PAIRS pairs decides:
halves when it is below 1 - SPLIT_GAIN, whole batches when it is not. Pairing each probe with
the batches just around it keeps the machine's slow drift out of the comparison, and the mean
of several pairs its batch-to-batch noise: session 17 capped batches from single run times of
each size, and on this machine (±7% a batch) that settled on the wrong size as often as on the
right one. Only at saturation: below it, the hold's target (halves when measured faster,
:meth:`Batcher.target`) already decides, and a cap there measured worse (session 17).
A probe costs at most half a batch at the worse size every PROBE_EVERY batches.
"""

from __future__ import annotations

import collections

__all__ = ["BatchCurve", "SLOW_S"]

ALPHA = 0.2  # weight of a new run time in its size's moving average
REFIT_EVERY = 8  # batches between two refits of est
STALE_AFTER = 512  # batches after which a size's run time counts only if no size has a newer one
# Batches faster than this (at some size in the upper half of those measured) are not aimed: their run time is
# mostly the instance thread waiting for the GIL, not the model's work, and the loop's timers
# have millisecond resolution. The benchmark's MLP (0.4 ms at any size) measured 9-13% slower
# aimed than left alone (benchmarks/CHANGES.md, session 17).
SLOW_S = 0.001
PROBE_EVERY = 16  # saturated batches between two probes of the other size
PAIRS = 8  # probes whose mean ratio decides (fewer, from the first one: decided from what there is)
SPLIT_GAIN = 0.03  # two half batches must take this much less time than one whole to run halves


class BatchCurve:
    __slots__ = ("max_size", "runs", "seen", "batches", "est", "slow", "_until", "split", "pairs", "_saturated",
                 "_probe")

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
        self.pairs: collections.deque[float] = collections.deque(maxlen=PAIRS)  # 2 t(half) / t(whole), per probe
        self._saturated = 0  # saturated batches taken
        self._probe = 0  # size of the probe batch taken and not yet observed (0: none)

    def take(self, queued: int) -> tuple[int, bool]:
        """(most requests the next batch takes, whether it is a probe) with ``queued`` live
        requests waiting. Below saturation, or for a fast model or a small max_size, up to
        max_size as always; at saturation halves or wholes as the probes decided (module doc)."""
        whole = self.max_size
        half = whole // 2
        if queued < whole or not self.slow or half < 2:
            return whole, False
        self._saturated += 1
        if self._saturated % PROBE_EVERY == 0:  # (a probe never observed, its instance lost, is replaced)
            self._probe = whole if self.split else half
            return self._probe, True
        return (half if self.split else whole), False

    def _paired(self, size: int, seconds: float) -> None:
        """A probe batch of ``size`` ran for ``seconds``: pair it with the other size's average."""
        whole, half = self.max_size, self.max_size // 2
        other = self.runs[whole if size == half else half]
        self._probe = 0
        if other <= 0:
            if size == whole:  # running halves with nothing measured at the whole size: start afresh
                self.split = False
            return
        ratio = 2 * seconds / other if size == half else 2 * other / seconds
        self.pairs.append(ratio)
        self.split = sum(self.pairs) / len(self.pairs) < 1 - SPLIT_GAIN

    def observe(self, size: int, seconds: float, probe: bool = False) -> None:
        """A batch of ``size`` requests ran for ``seconds`` (``probe``: it was taken as one)."""
        if probe:
            if size == self._probe and seconds > 0:
                self._paired(size, seconds)  # (before its own run time joins the average)
            else:  # requests of it were cancelled or expired in the queue: not a pair
                self._probe = 0
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
