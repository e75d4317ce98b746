"""server.core.omp: torch's thread count set for one thread, without touching any other thread's
or the count threads started later take (torch.set_num_threads would change both)."""

from __future__ import annotations

import ctypes
import os
import threading

import pytest
import torch

from server.core import omp

pytestmark = pytest.mark.skipif(not omp._find(), reason="torch's libgomp or MKL cannot be reached here")


def _mkl_threads() -> int:
    """MKL's thread count for the calling thread (its C entry point in torch's library)."""
    lib = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so"),
                      mode=os.RTLD_NOLOAD | os.RTLD_LAZY)
    return lib.MKL_Get_Max_Threads()


def _in_thread(fn):
    out = {}

    def run():
        out["value"] = fn()

    t = threading.Thread(target=run)
    t.start()
    t.join()
    return out["value"]


def test_one_thread_changes_its_own_count_and_no_other():
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # (as torch_threads 2 does: MKL's count too)
    try:
        def joined():
            assert omp.set_for_this_thread(1)
            mine = (torch.get_num_threads(), _mkl_threads())
            later = _in_thread(lambda: (torch.get_num_threads(), _mkl_threads()))
            assert omp.set_for_this_thread(2)
            return mine, later, (torch.get_num_threads(), _mkl_threads())

        mine, later, restored = _in_thread(joined)  # (a thread torch has not set up yet)
        assert mine == (1, 1)
        assert later == (2, 2)  # a thread started after it takes the process's count
        assert restored == (2, 2)
        assert torch.get_num_threads() == 2 and _mkl_threads() == 2  # the calling thread's: untouched
    finally:
        torch.set_num_threads(before)


def test_a_count_under_one_is_refused():
    assert omp.set_for_this_thread(0) is False
