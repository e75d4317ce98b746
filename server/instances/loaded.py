"""How an instance's loading thread tells the event loop that loading has ended, and what
the registry is told then: the same for thread and process instances."""

from __future__ import annotations

import asyncio
import threading
from typing import Any, Callable

from server.core.errors import ErrorKind, OspreyError, StartupTimeout
from server.core.instance import InstanceStatus

__all__ = ["LoadSignal", "raise_unless_ready"]


class LoadSignal(threading.Event):
    """Set once, by the thread that loads the instance; awaited on the loop without holding an
    executor thread (64 instances loading at once must not take every thread of the default
    executor: archive extraction at register needs one)."""

    def __init__(self) -> None:
        super().__init__()
        self._wake: Callable[[], None] | None = None

    def set(self) -> None:
        super().set()
        wake = self._wake
        if wake is not None:
            try:
                wake()
            except RuntimeError:  # the loop has closed: nobody is waiting
                pass

    async def until_set(self, timeout: float) -> bool:
        """Wait on the loop at most ``timeout`` seconds; True if loading has ended."""
        loop = asyncio.get_running_loop()
        woken = loop.create_future()

        def wake() -> None:
            if not woken.done():
                woken.set_result(None)

        self._wake = lambda: loop.call_soon_threadsafe(wake)
        if self.is_set():  # the thread may have finished before the callback was there
            wake()
        try:
            await asyncio.wait_for(woken, timeout)
        except asyncio.TimeoutError:
            pass
        return self.is_set()

    def forget_waiter(self) -> None:
        self._wake = None


def raise_unless_ready(inst: Any, loaded: bool, timeout: float) -> None:
    """The registry's answer once waiting has ended: nothing if ``inst`` is READY, else why not."""
    if not loaded:
        raise StartupTimeout(ErrorKind.UNAVAILABLE, f"model {inst.name} did not load within {timeout:g} s (startupTimeout)")
    if inst.status == InstanceStatus.STOPPED:
        raise OspreyError(ErrorKind.UNAVAILABLE, f"model {inst.name} was stopped while loading")
    if inst.status != InstanceStatus.READY:
        raise OspreyError(ErrorKind.BAD_INPUT, f"model {inst.name} failed to load: {inst.error}")
