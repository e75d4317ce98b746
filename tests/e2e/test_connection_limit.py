"""Open connections on the inference port are bounded (setting ``max_connections``), so that a
client opening connections without end cannot take every file descriptor of the server. Past the
limit a new connection is answered 503 (naming the setting) and closed at once; the connections
already open, the management and metrics ports and the server's own files keep working.

Before the bound, 400 idle connections to a server whose open-files limit was 200 made it reset
new connections, and its own work failed meanwhile ("retraining dispatcher: scan failed ...
Too many open files"). The server also raises its soft open-files limit to the hard one at
start, as the JVM does for TorchServe.
"""

from __future__ import annotations

import shutil
import socket

import httpx
import pytest

from tests.gates import wait_until
from tests.models import mlp_archive
from tests.prometheus_helpers import sample_value
from tests.raw_http import read_all

PING = b"GET /ping HTTP/1.1\r\nHost: a\r\n\r\n"


def _open_and_ping(port: int) -> socket.socket:
    """A connection the server has accepted and answered on (kept open)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(PING)
    got = b""
    while b"\r\n\r\n" not in got or not got.rstrip().endswith(b"}"):
        chunk = sock.recv(65536)
        assert chunk, got
        got += chunk
    assert got.startswith(b"HTTP/1.1 200"), got
    return sock


def _refused(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        return read_all(sock)


def _pings(port: int) -> bool:
    try:
        _open_and_ping(port).close()
        return True
    except (AssertionError, OSError):
        return False


def test_past_max_connections_a_new_connection_is_503_and_the_rest_go_on(osprey, store):
    mlp_archive(store)
    srv = osprey(["mlp.mar"], store, config={"max_connections": 5})
    port = srv.ports["inference"]
    held = [_open_and_ping(port) for _ in range(5)]
    answer = _refused(port)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503") and b"retry-after: 1" in head.lower()
    assert b"max_connections 5" in body
    # the management and metrics ports are not counted: an operator can still look in
    assert httpx.get(f"{srv.management}/models", timeout=30).status_code == 200
    assert "osprey" in httpx.get(f"{srv.metrics}/metrics", timeout=30).text
    # the connections already open are served as before
    held[0].sendall(PING)
    assert held[0].recv(65536).startswith(b"HTTP/1.1 200")
    # a refused client already sending a large body still reads the 503 (a lingering close, not a reset)
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        big = b"x" * (2 << 20)
        sock.sendall(b"POST /predictions/mlp HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(big) + big)  # read and dropped: no broken pipe
        answer = read_all(sock)
    assert answer.startswith(b"HTTP/1.1 503") and b"max_connections 5" in answer, answer[:200]
    # and in Prometheus: both refusals counted, the held connections open; other ports have no limit
    assert sample_value(srv.metrics, "osprey_connections_refused_total", port="inference") == 2
    assert sample_value(srv.metrics, "osprey_connections_open", port="inference") >= 5
    assert sample_value(srv.metrics, "osprey_connections_open", port="metrics") >= 1  # (this scrape's)
    assert sample_value(srv.metrics, "osprey_connections_refused_total", port="management") is None
    held.pop().close()  # one closes: a new connection is served again
    wait_until(lambda: _pings(port), what="a new connection to be served after one closed")
    assert "event=connections_refused" in srv.log() and "max_connections=5" in srv.log()
    for s in held:
        s.close()


@pytest.mark.skipif(shutil.which("prlimit") is None, reason="needs prlimit (util-linux)")
def test_the_default_limit_keeps_file_descriptors_for_the_server(osprey, store):
    """Hard open-files limit 320: the server raises its soft limit to it and, without a setting,
    takes the larger of 320 - 256 and half of it: 160 connections. 170 idle connections leave it
    able to open its files."""
    mlp_archive(store)
    srv = osprey(["mlp.mar"], store, prefix=["prlimit", "--nofile=200:320", "--"])
    limits = open(f"/proc/{srv.proc.pid}/limits").read()
    line = next(x for x in limits.splitlines() if x.startswith("Max open files"))
    assert line.split()[3:5] == ["320", "320"], line
    port = srv.ports["inference"]
    held = [_open_and_ping(port) for _ in range(160)]
    refused = [_refused(port) for _ in range(10)]
    assert all(r.startswith(b"HTTP/1.1 503") and b"max_connections 160" in r for r in refused)
    # the server's own work that opens files goes on: a model registered now loads
    mlp_archive(store, "mlp2")
    r = httpx.post(f"{srv.management}/models", params={"url": "mlp2.mar", "synchronous": "true"}, timeout=60)
    assert r.status_code == 200, r.text
    assert "Too many open files" not in srv.log()
    for s in held:
        s.close()


def _answer_of(port: int) -> tuple[socket.socket, bytes]:
    """A new connection, a ping on it, and the answer's first bytes (kept open either way)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(PING)
    got = b""
    while b"\r\n\r\n" not in got:
        chunk = sock.recv(65536)
        if not chunk:
            break
        got += chunk
    return sock, got


@pytest.mark.skipif(not hasattr(socket, "SO_REUSEPORT"), reason="front ends need SO_REUSEPORT")
def test_front_ends_refusals_are_counted_with_the_servers(osprey, store):
    """With front ends each process has its own max_connections; what every one of them
    refused is in the server's osprey_connections_refused_total (the front ends' counts come
    with their heartbeat answers), and so are their open connections."""
    mlp_archive(store)
    srv = osprey(["mlp.mar"], store, config={"max_connections": 2, "frontends": 2})
    port = srv.ports["inference"]
    opened = [_answer_of(port) for _ in range(16)]  # the kernel spreads them over both listeners
    refused = sum(1 for _, head in opened if head.startswith(b"HTTP/1.1 503"))
    served = sum(1 for _, head in opened if head.startswith(b"HTTP/1.1 200"))
    assert served + refused == 16 and 2 < served <= 4 and refused >= 12, (served, refused)
    wait_until(lambda: sample_value(srv.metrics, "osprey_connections_refused_total", port="inference") == refused,
               what=f"{refused} refusals counted")
    assert sample_value(srv.metrics, "osprey_connections_open", port="inference") >= served
    for sock, _ in opened:
        sock.close()
