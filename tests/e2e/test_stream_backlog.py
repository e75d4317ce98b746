"""A client that does not read its streamed answer is cut, and the server's memory with it.

A handler streams intermediate responses without waiting for the client (its thread serves a
whole batch). When a client stops reading, what it has not taken waits on the server; past
``server.protocols.stall.MAX_BACKLOG`` bytes, with nothing taken for
``stream_stall_timeout`` seconds, the server resets that connection and drops what waited (logged), and goes on
serving everyone else. A streaming gRPC call (TorchServe's StreamPredictions, OIP's
ModelStreamInfer) is cut the same way: the call is cancelled.
"""

from __future__ import annotations

import json
import socket
import struct
import time
from types import SimpleNamespace

import grpc
import httpx
import pytest
from tritonclient.grpc import service_pb2 as oip, service_pb2_grpc as oip_grpc  # (the OIP messages, as the other tests)

from server.protocols.grpc import streams
from server.protocols.grpc.generated import inference_pb2, inference_pb2_grpc
from server.protocols.stall import MAX_BACKLOG, MAX_HELD
from tests.e2e.test_frontends import served_by
from tests.gates import Gate, wait_for, wait_until
from tests.models import handler_archive

FLOOD_HANDLER = '''
import json


def handle(data, context):
    """Streams ``parts`` parts of 1 MiB each for the request, then answers "done"; ``first``:
    the first part is that many MiB; with a ``gate`` (tests/gates.py), holds after the first
    part until the gate opens."""
    if data is None:  # (the load's call, TorchServe's way)
        return None
    body = data[0]["body"]
    ask = json.loads(body) if isinstance(body, (bytes, bytearray)) else body
    part = b"x" * (1 << 20)
    for i in range(int(ask["parts"])):
        context.send_intermediate(0, b"y" * (ask["first"] << 20) if i == 0 and ask.get("first") else part)
        if i == 0 and ask.get("gate"):
            from tests.gates import hold
            hold(ask["gate"])
    return [b"done"]
'''


def _request(parts: int) -> bytes:
    body = json.dumps({"parts": parts}).encode()
    return (b"POST /predictions/flood HTTP/1.1\r\nHost: osprey\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body)) + body


def _connect(srv, frontends: int) -> socket.socket:
    """A connection with a small receive window, accepted by a front end when there are front
    ends (connections are opened until the kernel hands one to a front end), else by the server."""
    port = int(srv.inference.rsplit(":", 1)[1])
    for _ in range(300):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # (before connecting: a small window)
        sock.connect(("127.0.0.1", port))
        if frontends == 1:
            return sock
        pid = wait_for(lambda: served_by(srv, SimpleNamespace(sock=sock)), 30, "the connection to be accepted")
        if pid != srv.proc.pid:
            return sock
        sock.close()
    raise AssertionError("no connection landed on a front end")


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


# frontends=2: connections are served by front-end processes that relay to the server, and the
# parts wait there (server/frontends/child.py): the same rule
FRONTENDS = pytest.mark.parametrize("frontends", [1, 2], ids=["server", "front-ends"])


@FRONTENDS
def test_a_client_that_stops_reading_a_streamed_answer_is_cut_and_others_are_served(osprey, store, frontends):
    handler_archive(store, "flood", FLOOD_HANDLER, config={"batchSize": 1})
    srv = osprey(["flood=flood.mar"], store, config={"stream_stall_timeout": 2, "frontends": frontends})
    parts = MAX_BACKLOG // (1 << 20) * 2  # twice what may wait for one client
    stalled = _connect(srv, frontends)
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


@FRONTENDS
def test_however_a_client_reads_no_stream_holds_more_than_the_cap(osprey, store, frontends):
    """The stall rule off (``stream_stall_timeout`` 0), a client that takes nothing still cannot
    make the server hold more than MAX_HELD bytes for it: nothing else bounds what waits, since
    the handler never waits for a client (a client reading slower than the model writes)."""
    handler_archive(store, "flood", FLOOD_HANDLER, config={"batchSize": 1})
    srv = osprey(["flood=flood.mar"], store, config={"stream_stall_timeout": 0, "frontends": frontends})
    parts = MAX_HELD // (1 << 20) + 32
    held = _connect(srv, frontends)
    held.sendall(_request(parts))
    wait_until(lambda: f"more than the {MAX_HELD >> 20} MiB a stream may hold" in srv.log(), timeout=60,
               what="the server to cut the stream at its cap")
    data, _ = _read_all(held)  # reset, or (cut by the server behind a front end) closed: never the whole answer
    held.close()
    assert len(data) < parts << 20 and not data.endswith(b"done\r\n0\r\n\r\n"), len(data)
    with httpx.Client(timeout=60) as client:
        assert client.post(f"{srv.inference}/predictions/flood", json={"parts": 2}).content == b"x" * (2 << 20) + b"done"


@FRONTENDS
def test_a_client_that_reads_slowly_is_not_cut(osprey, store, frontends):
    """However far behind the handler a client falls (up to the cap on what may wait for it,
    MAX_HELD, twice what this test sends), it is not cut while it keeps reading: every byte it
    takes counts (the socket's send queue moves), not only whole parts."""
    handler_archive(store, "flood", FLOOD_HANDLER, config={"batchSize": 1})
    srv = osprey(["flood=flood.mar"], store, config={"stream_stall_timeout": 3, "frontends": frontends})
    parts = MAX_BACKLOG // (1 << 20) * 2
    slow = _connect(srv, frontends)
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


def _ask(parts: int, gate: str | None) -> dict:
    """The flood's request; gated, its first part is 6 MiB: more than the client's gRPC buffers
    take unread (its write waits for the client), under max_response_size's 6.25 MiB."""
    return {"parts": parts, "gate": gate, "first": 6} if gate else {"parts": parts}


def _stream_predictions(channel, parts: int, gate: str | None = None):
    stub = inference_pb2_grpc.InferenceAPIsServiceStub(channel)
    call = stub.StreamPredictions(inference_pb2.PredictionsRequest(
        model_name="flood", input={"body": json.dumps(_ask(parts, gate)).encode()}), timeout=120)
    return call, lambda resp: resp.prediction


def _model_stream_infer(channel, parts: int, gate: str | None = None):
    stub = oip_grpc.GRPCInferenceServiceStub(channel)
    body = json.dumps(_ask(parts, gate)).encode()
    request = oip.ModelInferRequest(model_name="flood", id="flood-1")
    request.inputs.append(oip.ModelInferRequest.InferInputTensor(name="body", datatype="BYTES", shape=[1]))
    request.raw_input_contents.append(struct.pack("<I", len(body)) + body)

    def one(resp):
        assert not resp.error_message, resp.error_message
        raw = resp.infer_response.raw_output_contents[0]
        return raw[4:4 + struct.unpack_from("<I", raw)[0]]

    return stub.ModelStreamInfer(iter([request]), timeout=120), one


GRPC_STREAMS = pytest.mark.parametrize("start", [_stream_predictions, _model_stream_infer],
                                       ids=["StreamPredictions", "ModelStreamInfer"])


@GRPC_STREAMS
def test_a_grpc_stream_holds_no_more_than_the_cap(osprey, store, tmp_path, start):
    """The client is told why, also when the cut comes while the call's first message waits
    for the client (6 MiB, held by flow control; the gate holds the handler until the call's
    headers reached the client). Before the server sent its initial metadata on its own, gRPC
    refused that status and the client waited for its deadline."""
    handler_archive(store, "flood", FLOOD_HANDLER, config={"batchSize": 1})
    srv = osprey(["flood=flood.mar"], store, config={"stream_stall_timeout": 0})
    parts = MAX_HELD // (1 << 20) + 32
    gate = Gate(tmp_path)
    with grpc.insecure_channel(srv.grpc, options=[("grpc.max_receive_message_length", 8 << 20)]) as channel:
        call, _ = start(channel, parts, gate=gate.value)
        gate.wait_entered()
        call.initial_metadata()  # (the headers are out: the first part is written, or being written)
        gate.open()
        wait_until(lambda: "a stream may hold" in srv.log(), timeout=60, what="the server to cut the call at its cap")
        with pytest.raises(grpc.RpcError) as info:
            for _ in call:
                pass
        assert info.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert f"more than the {MAX_HELD >> 20} MiB a stream may hold" in info.value.details()


@GRPC_STREAMS
def test_a_grpc_client_that_stops_reading_its_stream_is_cut_and_others_are_served(osprey, store, start):
    handler_archive(store, "flood", FLOOD_HANDLER, config={"batchSize": 1})
    srv = osprey(["flood=flood.mar"], store, config={"stream_stall_timeout": 2})
    parts = streams.MAX_BACKLOG // (1 << 20) * 2  # twice what may wait for one client
    options = [("grpc.max_receive_message_length", 8 << 20)]
    with grpc.insecure_channel(srv.grpc, options=options) as stalled:
        call, _ = start(stalled, parts)  # started, and nothing read: flow control holds the rest on the server
        wait_until(lambda: "is not reading its stream" in srv.log(), timeout=60,
                   what="the server to cut the call whose client does not read")
        got = 0
        with pytest.raises(grpc.RpcError) as info:
            for _ in call:  # what the client's own buffers had taken before the cut, then the end
                got += 1
        assert info.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED, (info.value.code(), info.value.details())
        assert "is not reading its stream" in info.value.details()
        assert got < parts
    # the server goes on: a client that reads gets its whole stream
    with grpc.insecure_channel(srv.grpc, options=options) as channel:
        call, value = start(channel, 3)
        assert [value(r) for r in call] == [b"x" * (1 << 20)] * 3 + [b"done"]
    assert httpx.get(f"{srv.inference}/ping", timeout=30).json() == {"status": "Healthy"}
