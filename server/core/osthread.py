"""The operating system's name of the calling thread, so ``top -H``, ``ps -L``, py-spy and
per-thread CPU counters (``/proc/<pid>/task/*/comm``) tell an instance's thread from the
monitor's and the event loop's. Python 3.11 names its threads for itself only; Linux takes
at most 15 bytes (``prctl(PR_SET_NAME)``). Elsewhere, or if it fails, nothing happens. A thread
started by a named one inherits its name (torch's OpenMP workers started by an instance's
thread show as that instance), so per-thread CPU counts them with the instance they work for."""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

__all__ = ["name_os_thread", "instance_thread_name"]

_PR_SET_NAME = 15
_LIMIT = 15
_prctl = None
if sys.platform.startswith("linux"):
    try:
        _prctl = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True).prctl
    except (OSError, AttributeError):
        pass


def name_os_thread(name: str) -> bool:
    """Name the calling thread ``name`` (cut to 15 bytes); True when the system took it."""
    if _prctl is None:
        return False
    raw = name.encode("utf-8", "replace")[:_LIMIT]
    try:
        return _prctl(_PR_SET_NAME, ctypes.c_char_p(raw), 0, 0, 0) == 0
    except Exception:
        return False


def instance_thread_name(model: str, index: int, kind: str = "i") -> str:
    """``i:MODEL:INDEX`` (``p:`` for the thread that drives a process instance), the model's
    name cut so the index always fits in 15 bytes."""
    tail = f":{index}"
    head = f"{kind}:"
    room = _LIMIT - len(head) - len(tail)
    return head + model.encode("utf-8", "replace")[:max(room, 1)].decode("utf-8", "ignore") + tail
