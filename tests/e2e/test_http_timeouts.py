"""Slow clients: a request that arrives too slowly gets 408 and its connection closes; a
connection that never sends a request is closed; a slow but steady upload is served.

Against the real server with ``request_read_timeout=1`` and ``keep_alive_timeout=2``
(config.properties), on raw sockets.
"""

from __future__ import annotations

import json
import socket
import time

import httpx
import pytest

from tests.models import mlp_archive
from tests.raw_http import connect, read_all

ROW = json.dumps([float(i) for i in range(16)]).encode()


@pytest.fixture(scope="module")
def srv(osprey_module, tmp_path_factory):
    store = tmp_path_factory.mktemp("store")
    mlp_archive(store)
    return osprey_module(["mlp.mar"], store, config={"request_read_timeout": 1, "keep_alive_timeout": 2})


def _still_serves(srv) -> None:
    assert httpx.post(f"{srv.inference}/predictions/mlp", content=ROW, timeout=30,
                      headers={"content-type": "application/json"}).status_code == 200


def test_headers_that_never_finish_get_408_and_the_connection_closes(srv):
    with connect(srv) as sock:
        t0 = time.monotonic()
        sock.sendall(b"POST /predictions/mlp HTTP/1.1\r\nHost: a\r\n")
        answer = read_all(sock)
        waited = time.monotonic() - t0
    assert answer.startswith(b"HTTP/1.1 408 ")
    assert b"request headers not received within 1 s" in answer
    assert 0.8 < waited < 10
    _still_serves(srv)


def test_trickling_header_bytes_does_not_extend_the_deadline(srv):
    with connect(srv) as sock:
        t0 = time.monotonic()
        sock.sendall(b"POST /predictions/mlp HTTP/1.1\r\n")
        sock.settimeout(0.3)
        answer = b""
        for i in range(40):  # one header line every 0.3 s: a slowloris
            try:
                sock.sendall(b"X-Slow-%d: 1\r\n" % i)
            except OSError:
                break
            try:
                chunk = sock.recv(65536)
            except socket.timeout:
                continue
            answer += chunk
            if not chunk or b"\r\n\r\n" in answer:
                break
        waited = time.monotonic() - t0
    assert answer.startswith(b"HTTP/1.1 408 "), answer
    assert waited < 6  # 1 s after the first byte, not 1 s after the last


def test_a_body_that_stalls_gets_408(srv):
    with connect(srv) as sock:
        sock.sendall(b"POST /predictions/mlp HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(ROW) + ROW[:10])
        answer = read_all(sock)
    assert answer.startswith(b"HTTP/1.1 408 ") and b"request body not received within 1 s" in answer
    assert json.loads(answer.split(b"\r\n\r\n", 1)[1]) == {
        "code": 408, "type": "RequestTimeoutException", "message": "request body not received within 1 s"}
    _still_serves(srv)
    assert "Traceback" not in srv.log()  # the handler-less end of a request is not an error


def test_errors_before_the_application_answer_in_the_body_of_the_api_asked(srv):
    """A stalled body or a request the parser refuses under /v2 gets the Open Inference
    Protocol's {"error": ...}, as every other /v2 error does (TorchServe's body elsewhere)."""
    with connect(srv) as sock:
        sock.sendall(b"POST /v2/models/mlp/infer HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100\r\n\r\n{\"inputs\"")
        answer = read_all(sock)
    assert answer.startswith(b"HTTP/1.1 408 ") and json.loads(answer.split(b"\r\n\r\n", 1)[1]) == {
        "error": "request body not received within 1 s"}, answer
    with connect(srv) as sock:
        sock.sendall(b"POST /v2/models/mlp/infer HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n"
                     b"Content-Length: 3\r\n\r\n{}")
        answer = read_all(sock)
    assert answer.startswith(b"HTTP/1.1 400 "), answer
    body = json.loads(answer.split(b"\r\n\r\n", 1)[1])
    assert list(body) == ["error"] and "Content-Length" in body["error"], body
    _still_serves(srv)


def test_a_slow_but_steady_upload_is_served(srv):
    with connect(srv) as sock:
        sock.sendall(b"POST /predictions/mlp HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(ROW))
        for i in range(0, len(ROW), len(ROW) // 4 + 1):  # about 2 s in all, never 1 s without data
            sock.sendall(ROW[i:i + len(ROW) // 4 + 1])
            time.sleep(0.5)
        answer = read_all(sock)
    assert answer.startswith(b"HTTP/1.1 200 "), answer
    assert len(json.loads(answer.split(b"\r\n\r\n", 1)[1])) == 4


def test_a_connection_that_sends_nothing_is_closed_after_the_keep_alive_timeout(srv):
    with connect(srv) as sock:
        t0 = time.monotonic()
        assert read_all(sock) == b""
        assert 1.5 < time.monotonic() - t0 < 12
    _still_serves(srv)


def test_bare_line_breaks_do_not_keep_a_connection_open(srv):
    """The parser skips CRLFs before a request without starting one: still an idle connection."""
    with connect(srv) as sock:
        t0 = time.monotonic()
        sock.sendall(b"\r\n")
        time.sleep(0.5)
        sock.sendall(b"\r\n")
        assert read_all(sock) == b""
        assert time.monotonic() - t0 < 12


def test_a_kept_alive_connection_serves_requests_beyond_the_read_timeout(srv):
    """The read timeout times arrivals, not the connection: a client idle between requests for
    longer than it (but within keep-alive) is served as usual."""
    with httpx.Client(timeout=30) as client:
        for _ in range(2):
            r = client.post(f"{srv.inference}/predictions/mlp", content=ROW, headers={"content-type": "application/json"})
            assert r.status_code == 200, r.text
            time.sleep(1.3)
