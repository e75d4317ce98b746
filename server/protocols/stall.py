"""A streamed answer's client that stops reading: the limit, the measure and the check shared by
the server's chunked REST answers (:mod:`server.protocols.rest.chunked`), streaming gRPC calls
(:mod:`server.protocols.grpc.streams`) and the front-end processes (:mod:`server.frontends.child`).
Past :data:`MAX_BACKLOG` bytes waiting for one client, with nothing taken for
``stream_stall_timeout`` seconds, the client is cut; each caller says what "taken" means (parts
sent, bytes its socket still holds) and how a cut is made. A client that reads, but slower than
the model writes, is cut once :data:`MAX_HELD` bytes wait for it, whatever the setting: the
handler never waits for a client, so nothing else bounds what waits (``StallWatch.held``: the
server makes it at least twice ``max_response_size``, so that one allowed part always fits).
Standard library only: a front end imports it without the server's data plane."""

from __future__ import annotations

import asyncio
import fcntl
import sys
import termios
from typing import Any, Callable

__all__ = ["MAX_BACKLOG", "MAX_HELD", "StallWatch", "set_held", "unacknowledged"]

MAX_BACKLOG = 64 << 20  # bytes of parts waiting for one client while it takes nothing for a while
MAX_HELD = 4 * MAX_BACKLOG  # bytes of parts waiting for one client however it reads (at least)


class StallWatch:
    """The check of the rule for one answer. :meth:`arm` (after bytes were added) starts it when
    ``waiting()`` is over ``limit``; every ``stall_s`` seconds it compares ``progress()`` with
    what it said before: unchanged (the client took nothing) calls ``on_stall()``, changed checks
    again. Once ``waiting()`` is back under the limit (say 0 when the answer has ended or was
    cut), it stops. ``stall_s`` 0: never cut for taking nothing. Over ``held`` bytes at an
    ``arm``, ``on_stall()`` is called at once, whatever ``stall_s``. ``why`` says which rule cut,
    for the caller's log line and status."""

    held = MAX_HELD  # set once a process: max(MAX_HELD, 2 * max_response_size) (set_held)

    __slots__ = ("_loop", "_stall_s", "_limit", "_waiting", "_progress", "_on_stall", "_handle", "why")

    def __init__(self, loop: asyncio.AbstractEventLoop, stall_s: float, limit: int, waiting: Callable[[], int],
                 progress: Callable[[], Any], on_stall: Callable[[], None]):
        self._loop, self._stall_s, self._limit = loop, stall_s, limit
        self._waiting, self._progress, self._on_stall = waiting, progress, on_stall
        self._handle: asyncio.TimerHandle | None = None
        self.why = ""

    def arm(self) -> None:
        waiting = self._waiting()
        if waiting > self.held:
            self.cancel()
            self.why = (f"{waiting} bytes waiting, more than the {self.held >> 20} MiB a stream may hold: "
                        "the client reads slower than the model writes")
            self._on_stall()
        elif self._handle is None and self._stall_s > 0 and waiting > self._limit:
            self._handle = self._loop.call_later(self._stall_s, self._check, self._progress())

    def _check(self, then: Any) -> None:  # on the loop, stall_s after the backlog grew past its limit
        self._handle = None
        if self._waiting() <= self._limit:
            return
        now = self._progress()
        if now == then:  # the client took nothing meanwhile
            self.why = (f"{self._waiting()} bytes waiting, nothing taken for {self._stall_s:g} s, "
                        "stream_stall_timeout")
            self._on_stall()
        else:
            self._handle = self._loop.call_later(self._stall_s, self._check, now)

    def cancel(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None


def set_held(max_response_size: int) -> None:
    """The cap on what waits for one client in this process: :data:`MAX_HELD`, or twice the
    largest part the server sends (``max_response_size``) if that is more."""
    StallWatch.held = max(MAX_HELD, 2 * int(max_response_size or 0))


def unacknowledged(transport) -> int | None:
    """Bytes the connection's socket has sent that the client has not acknowledged (Linux
    ``SIOCOUTQ``), or None where that cannot be asked."""
    try:
        sock = transport.get_extra_info("socket")
        buf = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
    except Exception:
        return None
    return int.from_bytes(buf, sys.byteorder, signed=True)
