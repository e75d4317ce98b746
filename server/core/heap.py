"""Keep CPython's garbage collector off the request path of a long-running server.

Once models are loaded the process holds a few hundred thousand long-lived objects (torch,
handlers, models: 181,000 with one small model). A full (generation 2) collection walks
all of them while holding the GIL, so every request in flight waits: 70-110 ms per full
collection on the benchmark machine, two of them in 20 s of load. ``gc.freeze()`` moves
the objects that exist into a permanent generation the collector skips; full collections
then walk only what was allocated since (2.6-7 ms measured under the same load).

Young collections are rarer too (:data:`GEN0_THRESHOLD`): CPython's default collects the
youngest generation every 700 net allocations, and a server allocates that many in a few
requests. Each such collection cost 0.5-1.3 ms of held GIL in the server under load (it walks
the young objects of every thread, batches' tensors and the monitor's buffers included, and
frees the request path's cycles): 2 us of every tiny-MLP request with monitoring off and 6-9
us with it on, at c=32 (gc callbacks, session 10, benchmarks/DRIFT.md). Every 10,000 it was
0.1 and 0.5 us, and the memory it lets wait is a few MB of young objects at most.

Freezing excludes objects from the *cyclic* collector only; reference counting still frees
them. What a removed model leaves in reference cycles is returned by :func:`release`, which
unfreezes, collects once and freezes again: one full collection on the event loop (tens of
milliseconds), after an unregistration or a scale-down, once the removed instances' threads
have ended (the registry waits for them; removals close together share one collection).
Before that, the registry cuts its own references to the removed version, so reference
counting frees most of it and nothing frozen pins it.

What is freed stays in glibc's malloc arenas (one per thread that allocated) unless given
back: :func:`trim` calls ``malloc_trim(0)`` after a release. Measured over 50 register /
unregister cycles of minilm_embedding (90 MB of weights): RSS after each release 270-275 MB
with it, 289-319 MB without and a lasting step to 386 MB after 45 cycles (arena
fragmentation). It takes 3-30 ms, so the registry runs it in an executor thread (ctypes
releases the GIL), never on the event loop.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
import time

__all__ = ["hold", "freeze", "release", "trim", "GEN0_THRESHOLD"]

log = logging.getLogger("osprey.heap")

GEN0_THRESHOLD = 10_000  # net allocations between young collections (CPython's default: 700)

_held = False  # the collector is off until the first freeze (see hold)


def hold() -> None:
    """At a server's start: no collection until the startup models are loaded, when
    :func:`freeze` collects once and turns the collector back on (a collector already off
    stays off). Importing torch allocates a few hundred thousand long-lived objects, and the
    collections their allocations trigger walk them again and again: ``import torch`` took
    0.91-0.94 s with the collector off against 1.01-1.16 s with it on (3 runs each, 2 cores).
    The benchmark's five models answered 0.05-0.17 s sooner after a start (medians of two
    interleaved runs of 8-10 starts; 3% less CPU), and the startup freeze's single collection
    walks no more than before."""
    global _held
    if gc.isenabled():
        gc.disable()
        _held = True


def freeze() -> None:
    """Once models are loaded (at startup, and after each run-time load): collect what loading
    left, freeze the rest. Only objects allocated since the last freeze are walked."""
    global _held
    t0 = time.perf_counter()
    gc.collect()
    gc.freeze()
    if _held:
        _held = False
        gc.enable()
    young, older, oldest = gc.get_threshold()
    if 0 < young < GEN0_THRESHOLD:  # 0: the collector was turned off on purpose; higher: the user's own
        gc.set_threshold(GEN0_THRESHOLD, older, oldest)
    log.debug("heap frozen: %d objects in %.1f ms", gc.get_freeze_count(), (time.perf_counter() - t0) * 1e3)


def release() -> None:
    """After a model was removed: let the collector see everything again, then freeze again."""
    gc.unfreeze()
    freeze()


def _malloc_trim():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim
        return None


_TRIM = _malloc_trim()


def trim() -> None:
    """Give the free memory of every malloc arena back to the system (glibc); blocking:
    call it off the event loop."""
    if _TRIM is not None:
        t0 = time.perf_counter()
        _TRIM(0)
        log.debug("malloc_trim in %.1f ms", (time.perf_counter() - t0) * 1e3)
