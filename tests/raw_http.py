"""Raw sockets to a test server's inference port, for what an HTTP client library would not send."""

from __future__ import annotations

import socket


def connect(srv, timeout: float = 15) -> socket.socket:
    host, port = srv.inference.split("//")[1].split(":")
    return socket.create_connection((host, int(port)), timeout=timeout)


def read_all(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection."""
    out = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return out
        out += chunk
