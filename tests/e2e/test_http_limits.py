"""A request's line and headers are bounded (setting ``max_header_size``): past it the client
gets 431 (414 for the request line alone) as a JSON error naming the setting, the connection
closes after the answer, and the server goes on serving. Without the bound, the HTTP parser
keeps a header whole in memory however long it grows (a 30 MB header was served).

Against the real server with ``max_header_size=16384``, on raw sockets.
"""

from __future__ import annotations

import json

import httpx
import pytest

from tests.models import mlp_archive
from tests.raw_http import connect, read_all

ROW = json.dumps([float(i) for i in range(16)]).encode()
LIMIT = 16384


@pytest.fixture(scope="module")
def srv(osprey_module, tmp_path_factory):
    store = tmp_path_factory.mktemp("store")
    mlp_archive(store)
    return osprey_module(["mlp.mar"], store, config={"max_header_size": LIMIT})


def _exchange(srv, raw: bytes) -> bytes:
    """Send ``raw`` (as far as the server reads it) and return all it answers until it closes."""
    with connect(srv, timeout=30) as sock:
        try:
            sock.sendall(raw)
        except (BrokenPipeError, ConnectionResetError):
            pass
        return read_all(sock)


def _error(answer: bytes, status: int) -> str:
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 %d " % status), answer[:300]
    assert b"connection: close" in head.lower()
    err = json.loads(body)
    assert err["code"] == status and "max_header_size" in err["message"], err
    return err["message"]


def _still_serves(srv) -> None:
    r = httpx.post(f"{srv.inference}/predictions/mlp", content=ROW, timeout=30,
                   headers={"content-type": "application/json", "x-big": "b" * (LIMIT // 2)})
    assert r.status_code == 200, r.text


def test_one_header_over_the_limit_is_431(srv):
    answer = _exchange(srv, b"POST /predictions/mlp HTTP/1.1\r\nHost: a\r\nX-Foo: " + b"a" * (LIMIT * 2)
                       + b"\r\nContent-Length: %d\r\n\r\n%s" % (len(ROW), ROW))
    assert "request headers larger than 16384 bytes" in _error(answer, 431)
    _still_serves(srv)


def test_a_huge_header_is_refused_while_it_arrives_not_held_whole(srv):
    """The header never ends: the answer can only come from the bytes counted as they arrive
    (the parser reports a header when it is complete)."""
    with connect(srv) as sock:
        sock.sendall(b"GET /ping HTTP/1.1\r\nHost: a\r\nX-Foo: ")
        try:
            for _ in range(64):  # up to 4 MB, 64 KiB a send, until the server answers
                sock.sendall(b"a" * 65536)
        except (BrokenPipeError, ConnectionResetError):
            pass
        answer = read_all(sock)
    _error(answer, 431)
    _still_serves(srv)


def test_many_small_headers_over_the_limit_are_431(srv):
    headers = b"".join(b"X-H%d: v\r\n" % i for i in range(3000))
    _error(_exchange(srv, b"GET /ping HTTP/1.1\r\nHost: a\r\n" + headers + b"\r\n"), 431)
    _still_serves(srv)


def test_a_request_line_over_the_limit_is_414(srv):
    answer = _exchange(srv, b"GET /" + b"p" * (LIMIT + 100) + b" HTTP/1.1\r\nHost: a\r\n\r\n")
    assert "request line longer than 16384 bytes" in _error(answer, 414)
    _still_serves(srv)


def test_over_the_limit_under_v2_answers_in_the_oip_error_shape(srv):
    """Under /v2 the 414 and 431 bodies are the Open Inference Protocol's {"error": ...}, as every
    other /v2 error; TorchServe's {"code", "type", "message"} elsewhere (the tests above)."""
    for raw, status in ((b"POST /v2/models/mlp/infer HTTP/1.1\r\nHost: a\r\nX-Foo: " + b"a" * (LIMIT * 2)
                         + b"\r\nContent-Length: 2\r\n\r\n{}", 431),
                        (b"GET /v2/models/" + b"m" * (LIMIT + 100) + b" HTTP/1.1\r\nHost: a\r\n\r\n", 414)):
        head, _, body = _exchange(srv, raw).partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 %d " % status), head
        err = json.loads(body)
        assert list(err) == ["error"] and "max_header_size" in err["error"], err
    _still_serves(srv)


@pytest.mark.parametrize("raw, needle", [
    (b"POST /predictions/mlp HTTP/1.1\r\nHost: a\r\nContent-Length: -5\r\n\r\n", "Content-Length"),
    (b"POST /predictions/mlp HTTP/1.1\r\nHost: a\r\nX-Bad: a\x01b\r\nContent-Length: 2\r\n\r\n[]", "header value"),
    (b"POST /predictions/mlp HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n[]\r\n0\r\n\r\n",
     "Transfer-Encoding"),
], ids=["negative-length", "control-char", "length-and-chunked"])
def test_a_request_the_parser_refuses_gets_a_json_400_naming_what_it_found(srv, raw, needle):
    head, _, body = _exchange(srv, raw).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 "), head
    err = json.loads(body)
    assert err["code"] == 400 and err["message"].startswith("Invalid HTTP request received: "), err
    assert needle.lower() in err["message"].lower(), err
    _still_serves(srv)
