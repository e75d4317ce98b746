"""A client that does not read its streamed answer is cut, and the server's memory with it.

A handler streams intermediate responses without waiting for the client (its thread serves a
whole batch). When a client stops reading, what it has not taken waits on the server; past
``server.protocols.rest.chunked.MAX_BACKLOG`` bytes, with nothing taken for
``stream_stall_timeout`` seconds, the server resets that connection and drops what waited (logged), and goes on
serving everyone else.
"""

from __future__ import annotations

import json
import socket
import time

import httpx

from server.protocols.rest.chunked import MAX_BACKLOG
from tests.gates import wait_until
from tests.models import handler_archive

FLOOD_HANDLER = '''
def handle(data, context):
    """Streams ``parts`` parts of 1 MiB each for the request, then answers "done"."""
    if data is None:  # (the load's call, TorchServe's way)
        return None
    parts = int(data[0]["body"]["parts"])
    part = b"x" * (1 << 20)
    for _ in range(parts):
        context.send_intermediate(0, part)
    return [b"done"]
'''


def _request(parts: int) -> bytes:
    body = json.dumps({"parts": parts}).encode()
    return (b"POST /predictions/flood HTTP/1.1\r\nHost: osprey\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body)) + body


def _read_all(sock: socket.socket) -> tuple[bytes, bool]:
    """Everything until the server closes or resets the connection; (data, reset?)."""
    got = bytearray()
    sock.settimeout(60)
    try:
        while True:
            chunk = sock.recv(1 << 20)
            if not chunk:
                return bytes(got), False
            got += chunk
    except ConnectionResetError:
        return bytes(got), True


def test_a_client_that_stops_reading_a_streamed_answer_is_cut_and_others_are_served(osprey, store):
    handler_archive(store, "flood", FLOOD_HANDLER, config={"batchSize": 1})
    srv = osprey(["flood=flood.mar"], store, config={"stream_stall_timeout": 2})
    port = int(srv.inference.rsplit(":", 1)[1])
    parts = MAX_BACKLOG // (1 << 20) * 2  # twice what may wait for one client
    stalled = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # (before connecting: a small window)
    stalled.connect(("127.0.0.1", port))
    stalled.sendall(_request(parts))
    # it reads nothing: the parts wait on the server until there are too many
    wait_until(lambda: "is not reading its streamed answer" in srv.log(), timeout=60,
               what="the server to cut the client that does not read")
    data, reset = _read_all(stalled)
    stalled.close()
    assert reset, f"closed after {len(data)} bytes instead of reset"  # what waited in the socket went too
    # the server goes on: a client that reads gets its whole streamed answer
    with httpx.Client(timeout=60) as client:
        r = client.post(f"{srv.inference}/predictions/flood", json={"parts": 3})
        assert r.status_code == 200 and r.headers.get("transfer-encoding") == "chunked"
        assert r.content == b"x" * (3 << 20) + b"done"
        assert client.get(f"{srv.inference}/ping").json() == {"status": "Healthy"}


def test_a_client_that_reads_slowly_is_not_cut(osprey, store):
    """However far behind the handler a client falls, it is not cut while it keeps reading: every
    byte it takes counts (the socket's send queue moves), not only whole parts."""
    handler_archive(store, "flood", FLOOD_HANDLER, config={"batchSize": 1})
    srv = osprey(["flood=flood.mar"], store, config={"stream_stall_timeout": 3})
    port = int(srv.inference.rsplit(":", 1)[1])
    parts = MAX_BACKLOG // (1 << 20) * 2
    slow = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    slow.connect(("127.0.0.1", port))
    slow.sendall(_request(parts))
    slow.settimeout(30)
    got = 0
    start = time.monotonic()
    while time.monotonic() - start < 8:  # 4 KiB at a time, under 40 KiB/s: far behind the handler
        chunk = slow.recv(4096)
        assert chunk, f"closed after {got} bytes"
        got += len(chunk)
        time.sleep(0.1)
    assert "is not reading its streamed answer" not in srv.log()
    assert got < parts << 20  # (it was behind the whole time)
    slow.close()
