"""Keep CPython's garbage collector off the request path of a long-running server.

Once models are loaded the process holds a few hundred thousand long-lived objects (torch,
handlers, models: 181,000 with one small model). A full (generation 2) collection walks
all of them while holding the GIL, so every request in flight waits: 70-110 ms per full
collection on the benchmark machine, two of them in 20 s of load. ``gc.freeze()`` moves
the objects that exist into a permanent generation the collector skips; full collections
then walk only what was allocated since (2.6-7 ms measured under the same load).

Freezing excludes objects from the *cyclic* collector only; reference counting still frees
them. What a removed model leaves in reference cycles is returned by :func:`release`, which
unfreezes, collects once and freezes again: one full collection on the event loop (tens of
milliseconds), after an unregistration or a scale-down, once the removed instances' threads
have ended (the registry waits for them; removals close together share one collection).
"""

from __future__ import annotations

import gc
import logging
import time

__all__ = ["freeze", "release"]

log = logging.getLogger("osprey.heap")


def freeze() -> None:
    """Once models are loaded (at startup, and after each run-time load): collect what loading
    left, freeze the rest. Only objects allocated since the last freeze are walked."""
    t0 = time.perf_counter()
    gc.collect()
    gc.freeze()
    log.debug("heap frozen: %d objects in %.1f ms", gc.get_freeze_count(), (time.perf_counter() - t0) * 1e3)


def release() -> None:
    """After a model was removed: let the collector see everything again, then freeze again."""
    gc.unfreeze()
    freeze()
