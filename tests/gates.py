"""Deterministic "the instance is busy" for queueing tests.

A request whose body carries ``{"gate": PATH}`` makes the test handlers (RECORDING_HANDLER,
IDS_HANDLER) create ``PATH.entered`` and then hold their call until ``PATH`` exists. A test
sends the gated request, waits until it is in the handler, queues what it wants queued
(waiting until the server counts it), then opens the gate: the same order on a loaded 2-core
machine and a fast 16-core one, where fixed sleeps guess at it. A gate never opened fails
its call after 60 s, longer than :func:`wait_until` waits, so a test that waited in vain
fails on its own assertion first.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable

__all__ = ["Gate", "wait_until", "pending", "hold", "alive"]


def wait_for(check: Callable[[], object], timeout: float = 60.0, what: str = "condition", poll: float = 0.05):
    """Poll ``check`` until it returns something true, and return that; an AssertionError naming
    ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def wait_until(predicate: Callable[[], bool], timeout: float = 20.0, what: str = "the condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)


def hold(gate: str, limit: float = 60.0) -> None:
    """In a test handler (in the server process): say the call has entered, then wait for
    the gate to open; after ``limit`` seconds fail loudly, since a test waited in vain."""
    open(gate + ".entered", "w").close()
    end = time.monotonic() + limit
    while not os.path.exists(gate):
        if time.monotonic() > end:
            raise RuntimeError("gate never opened")
        time.sleep(0.002)


def pending(srv, model: str) -> int:
    """Requests accepted and waiting in the model's queue (TorchServe's describe API)."""
    import httpx

    return httpx.get(f"{srv.management}/models/{model}", timeout=30).json()[0]["jobQueueStatus"]["pendingRequests"]


class Gate:
    def __init__(self, folder: Path, name: str = "gate"):
        self.path = Path(folder) / name
        self.path.unlink(missing_ok=True)
        Path(f"{self.path}.entered").unlink(missing_ok=True)

    @property
    def value(self) -> str:
        """What goes in the request body's ``gate`` field."""
        return str(self.path)

    def wait_entered(self, timeout: float = 30.0) -> None:
        wait_until(Path(f"{self.path}.entered").exists, timeout, "the gated request to reach the handler")

    def open(self) -> None:
        self.path.touch()


def alive(pid: int) -> bool:
    """Is process ``pid`` running (a zombie nobody reaped yet counts as gone)?"""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
