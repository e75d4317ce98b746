"""The limit and the measure of a streamed answer's client that stops reading, shared by the
server's chunked answers (:mod:`server.protocols.rest.chunked`) and the front-end processes
(:mod:`server.frontends.child`). Standard library only: a front end imports it without the
server's data plane."""

from __future__ import annotations

import fcntl
import sys
import termios

__all__ = ["MAX_BACKLOG", "unacknowledged"]

MAX_BACKLOG = 64 << 20  # bytes of parts waiting for one client while it takes nothing for a while


def unacknowledged(transport) -> int | None:
    """Bytes the connection's socket has sent that the client has not acknowledged (Linux
    ``SIOCOUTQ``), or None where that cannot be asked."""
    try:
        sock = transport.get_extra_info("socket")
        buf = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
    except Exception:
        return None
    return int.from_bytes(buf, sys.byteorder, signed=True)
