"""torch's intra-op thread count for the calling thread alone.

A small model's batch is a few tiny matrix products, and MKL runs even a 32x16x64 product on
every thread torch has: on 2 CPUs each of the tiny MLP's linear layers took 70-126 us with two
threads against 8-12 us with one, whenever the OpenMP worker had gone to sleep since the last
batch (waking it is most of the cost; benchmarks/CHANGES.md, session 27). So an instance
thread that shares the event loop's CPU (:mod:`server.core.cpus`) runs torch on one thread while
its batches take under :data:`SINGLE_BELOW_S` (and gets its threads back over
:data:`MULTI_ABOVE_S`): at that length, the most one thread can cost a batch that would have
split well is about as long again, under a millisecond.

``torch.set_num_threads`` cannot say "this thread only": it also sets the count every thread
that starts later takes, so one instance would change the models loaded after it. The count
torch's parallel regions use is per thread in the libraries themselves (libgomp's nthreads
ICV, ``omp_set_num_threads``, read by ``at::get_num_threads``; MKL's local count, which torch
sets with ``mkl_set_num_threads_local``), so :func:`set_for_this_thread` sets both, in torch's
own copies (a second libgomp loaded by another wheel has its own counts). Where either cannot
be found it does nothing and says so.
"""

from __future__ import annotations

import ctypes
import glob
import logging
import os
import sys

__all__ = ["SINGLE_BELOW_S", "MULTI_ABOVE_S", "set_for_this_thread", "threads_here"]

log = logging.getLogger("osprey.omp")

SINGLE_BELOW_S = 0.001  # a joined instance thread runs torch on one thread while its batches take less ...
MULTI_ABOVE_S = 0.002  # ... and gets torch's count back once they take more than this (hysteresis)

# (omp_set_num_threads, MKL's C entry point of mkl_set_num_threads_local: mkl_service.h maps the
# lower-case name to MKL_Set_Num_Threads_Local, and the lower-case symbols are the Fortran
# interface, which takes a pointer), or () when unavailable
_libs: tuple | None = None


def _find() -> tuple:
    global _libs
    if _libs is not None:
        return _libs
    _libs = ()
    torch = sys.modules.get("torch")
    if torch is None or not sys.platform.startswith("linux"):
        return _libs
    libdir = os.path.join(os.path.dirname(torch.__file__), "lib")
    mode = os.RTLD_NOLOAD | os.RTLD_LAZY  # only the copies torch loaded, never a second one
    try:
        gomp = next(ctypes.CDLL(path, mode=mode) for path in sorted(glob.glob(os.path.join(libdir, "libgomp*.so*"))))
        cpu = ctypes.CDLL(os.path.join(libdir, "libtorch_cpu.so"), mode=mode)
        omp_set, mkl_set = gomp.omp_set_num_threads, cpu.MKL_Set_Num_Threads_Local
    except (StopIteration, OSError, AttributeError) as exc:
        log.info("torch's OpenMP or MKL thread count cannot be set per thread here (%s): "
                 "small models' instance threads keep torch's thread count", exc or "no libgomp in torch/lib")
        return _libs
    omp_set.argtypes, mkl_set.argtypes = [ctypes.c_int], [ctypes.c_int]
    omp_set.restype, mkl_set.restype = None, ctypes.c_int
    _libs = (omp_set, mkl_set)
    return _libs


def threads_here() -> int:
    """torch's intra-op thread count in the calling thread (0 without torch)."""
    torch = sys.modules.get("torch")
    return int(torch.get_num_threads()) if torch is not None else 0


def set_for_this_thread(threads: int) -> bool:
    """Run the calling thread's torch operations on ``threads`` threads, leaving every other
    thread's count, and the count new threads take, as they are; False where it cannot."""
    libs = _find()
    if not libs or threads < 1:
        return False
    # torch sets a thread's counts up at its first question, from the process's count: ask
    # first, or that would undo what is set here
    threads_here()
    omp_set, mkl_set = libs
    omp_set(threads)
    mkl_set(threads)
    return True
