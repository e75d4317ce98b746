"""Ending a server started in a session of its own (``start_new_session=True``), for the
benchmark's helper servers. Standard library only: it also runs in the peers' environments."""

from __future__ import annotations

import os
import signal
import subprocess

__all__ = ["stop_group"]


def stop_group(proc: subprocess.Popen | None, timeout: float) -> None:
    """SIGTERM to ``proc``'s process group, SIGKILL after ``timeout`` seconds; nothing if it has ended."""
    if proc is None or proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
