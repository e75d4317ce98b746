"""The router's refusal before a request is read: bytes encoded once, asked once per request."""

from __future__ import annotations

import json

from server.core.errors import ErrorKind, OspreyError
from server.protocols.rest.asgi import Response, Router


async def _handler(req):
    return Response(b"ok")


def _router(full: list[bool], calls: list[dict], token: str | None = None) -> Router:
    def admit(params):
        calls.append(params)
        if full[0]:
            raise OspreyError(ErrorKind.QUEUE_FULL, f"Model \"{params['model']}\": job queue is full", retry_after=1)

    r = Router(max_body=1024, token=token)
    r.add(("POST", "GET"), "/predictions/{model}", _handler, admit=admit)
    return r


def test_refusal_is_a_whole_http_answer_with_retry_after_and_a_request_id():
    calls: list[dict] = []
    r = _router([True], calls)
    data = r.early_refusal("/predictions/m")
    head, body = data.split(b"\r\n\r\n", 1)
    lines = head.split(b"\r\n")
    assert lines[0] == b"HTTP/1.1 503 Service Unavailable"
    headers = dict(line.split(b": ", 1) for line in lines[1:])
    assert headers[b"retry-after"] == b"1" and headers[b"x-request-id"] and b"connection" not in headers
    assert int(headers[b"content-length"]) == len(body)
    assert json.loads(body)["message"] == 'Model "m": job queue is full'
    scope = {"method": "POST", "path": "/predictions/m", "headers": []}
    closing = r.refusal(scope, keep_alive=False)
    assert b"\r\nconnection: close\r\n" in closing.split(b"\r\n\r\n")[0]
    assert r.early_refusal("/predictions/m") != data  # a fresh request id each time


def test_an_admitted_request_is_not_asked_again_and_its_route_is_kept():
    calls: list[dict] = []
    r = _router([False], calls)
    assert r.early_refusal("/predictions/m") == b""  # admitted
    scope = {"method": "POST", "path": "/predictions/m", "headers": [], "osprey.admitted": True}
    assert r.refusal(scope, keep_alive=True) is None
    assert len(calls) == 1 and scope["osprey.route"][1] == {"model": "m"}


def test_no_early_answer_where_a_token_must_be_checked_or_for_head():
    calls: list[dict] = []
    r = _router([True], calls, token="k")
    assert r.early_refusal("/predictions/m") is None
    scope = {"method": "POST", "path": "/predictions/m", "headers": [(b"authorization", b"Bearer wrong")]}
    assert r.refusal(scope, keep_alive=True) is None  # left to the usual path: 401
    scope = {"method": "POST", "path": "/predictions/m", "headers": [(b"authorization", b"Bearer k")]}
    assert r.refusal(scope, keep_alive=True).startswith(b"HTTP/1.1 503")
    assert r.refusal({"method": "HEAD", "path": "/predictions/m", "headers": []}, keep_alive=True) is None
