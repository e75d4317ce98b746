"""The garbage collector as Prometheus sees it: pauses by generation and the frozen heap.

A full collection holds the GIL for as long as it walks the heap, so every request in
flight waits for it; when a latency tail has no other explanation, this is where to look.
``osprey_gc_pause_seconds{generation}`` times every collection (a ``gc.callbacks`` hook:
two clock reads per collection, about one collection per several hundred allocations);
``osprey_gc_frozen_objects`` is the heap Osprey froze after loading models
(:mod:`server.heap`), which full collections skip.
"""

from __future__ import annotations

import gc
import time

from .families import Histogram, fmt, render_family

__all__ = ["GcCollector", "PAUSE_BUCKETS", "gc_collector"]

PAUSE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


class GcCollector:
    """A ``gc`` callback that times each collection; :meth:`render` gives the text exposition.

    The callback runs in whichever thread triggered the collection, always with the GIL held
    and never concurrently with another collection, so plain counters are safe.
    """

    def __init__(self) -> None:
        self.pause = Histogram("osprey_gc_pause_seconds",
                               "Garbage collector pauses (the GIL is held, but for finalizers that release it), by generation",
                               ("generation",), PAUSE_BUCKETS)
        self._by_gen = [self.pause.child(str(g)) for g in range(3)]
        self._started = 0.0
        gc.callbacks.append(self._callback)

    def render(self) -> str:
        frozen = render_family("osprey_gc_frozen_objects", "gauge",
                               "Objects frozen out of the cyclic garbage collector",
                               [f"osprey_gc_frozen_objects {fmt(gc.get_freeze_count())}\n"])
        return self.pause.render() + frozen

    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        elif self._started:
            self._by_gen[info["generation"]].observe(time.perf_counter() - self._started)
            self._started = 0.0


_collector: GcCollector | None = None


def gc_collector() -> GcCollector:
    """The process's one collector (the garbage collector is per process; one callback is enough)."""
    global _collector
    if _collector is None:
        _collector = GcCollector()
    return _collector
