"""``max_response_size``: an answer over it is answered 500 naming its size and the limit, on
every protocol, and the model goes on serving (TorchServe's frontend refuses such a message
from its worker with 500 "Worker died." and restarts the worker; before, Osprey's REST
answered it whole and only gRPC's transport refused it, with RESOURCE_EXHAUSTED)."""

from __future__ import annotations

import grpc
import httpx
import pytest

from tests.models import handler_archive
from tests.oip_stubs import pb, pb_grpc

LIMIT = 100_000

BYTES_HANDLER = '''
def handle(data, context):
    if data is None:
        return None
    return [b"x" * int(bytes(row["body"])) for row in data]
'''

TENSOR_HANDLER = '''
import numpy as np

class Sized:
    accepts_tensors = True

    def handle(self, data, context):
        return [{"tensors": {"OUT": np.zeros(int(np.asarray(row["tensors"]["N"]).reshape(-1)[0]), dtype=np.uint8)}}
                for row in data]
'''
# parts: "small" then one of N bytes then "after" (dropped once a part was refused), or, for
# "first:N", the N bytes first; the final answer is "end". "second:N:FOLDER": after its parts,
# the handler waits for FOLDER/release (30 s at most), then writes FOLDER/returned
STREAM_HANDLER = '''
import os
import time


def handle(data, context):
    if data is None:
        return None
    for i, row in enumerate(data):
        where, n, *hold = bytes(row["body"]).decode().split(":", 2)
        if where == "second":
            context.send_intermediate(i, b"small")
        context.send_intermediate(i, "y" * int(n))
        context.send_intermediate(i, b"after")
        if hold:
            for _ in range(3000):
                if os.path.exists(os.path.join(hold[0], "release")):
                    break
                time.sleep(0.01)
            open(os.path.join(hold[0], "returned"), "w").close()
    return [b"end" for _ in data]
'''

TENSOR_CONFIG = {"inputs": [{"name": "N", "datatype": "INT64", "shape": [1]}],
                 "outputs": [{"name": "OUT", "datatype": "UINT8", "shape": [-1]}]}


@pytest.fixture(scope="module")
def srv(osprey_module, tmp_path_factory):
    store = tmp_path_factory.mktemp("store")
    handler_archive(store, "sized", BYTES_HANDLER)
    handler_archive(store, "tsized", TENSOR_HANDLER, config=TENSOR_CONFIG)
    handler_archive(store, "streamy", STREAM_HANDLER)
    return osprey_module(["sized=sized.mar", "tsized=tsized.mar", "streamy=streamy.mar"], store,
                         config={"max_response_size": LIMIT})


@pytest.fixture(scope="module")
def http(srv):
    with httpx.Client(base_url=srv.inference, timeout=30) as c:
        yield c


def _said(message: str, size: int) -> None:
    assert f"{size:,} bytes" in message and f"max_response_size ({LIMIT:,} bytes)" in message, message


def test_a_torchserve_api_answer_over_the_limit_is_a_500_naming_it_and_the_model_goes_on(http):
    assert http.post("/predictions/sized", content=b"50000").content == b"x" * 50_000
    r = http.post("/predictions/sized", content=b"200000")
    assert r.status_code == 500
    body = r.json()
    assert body["type"] == "InternalServerException"
    _said(body["message"], 200_000)
    assert "x-request-id" in r.headers
    ok = http.post("/predictions/sized", content=str(LIMIT).encode())  # exactly the limit still goes out
    assert ok.status_code == 200 and len(ok.content) == LIMIT


def test_an_open_inference_answer_over_the_limit_is_a_500_naming_it(http):
    def infer(n: int) -> httpx.Response:
        return http.post("/v2/models/tsized/infer",
                         json={"inputs": [{"name": "N", "datatype": "INT64", "shape": [1], "data": [n]}]})

    r = infer(200_000)
    assert r.status_code == 500
    _said(r.json()["error"], 200_000)
    ok = infer(1_000)
    assert ok.status_code == 200
    assert ok.json()["outputs"][0]["shape"] == [1_000]


def test_grpc_answers_internal_naming_the_limit_not_the_transports_refusal(srv):
    with grpc.insecure_channel(srv.grpc) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)

        def infer(n: int):
            inp = pb.ModelInferRequest.InferInputTensor(name="N", datatype="INT64", shape=[1])
            inp.contents.int64_contents.append(n)
            return stub.ModelInfer(pb.ModelInferRequest(model_name="tsized", inputs=[inp]), timeout=30)

        with pytest.raises(grpc.RpcError) as err:
            infer(200_000)
        assert err.value.code() == grpc.StatusCode.INTERNAL
        _said(err.value.details(), 200_000)
        assert len(infer(1_000).raw_output_contents[0]) == 1_000


def test_a_streamed_part_over_the_limit_is_not_sent_and_the_answer_fails_naming_it(http):
    # a part within the limit goes out as a chunk; so does the final answer
    ok = http.post("/predictions/streamy", content=f"second:{LIMIT}".encode())
    assert ok.status_code == 200 and ok.content == b"small" + b"y" * LIMIT + b"after" + b"end"
    # the first part over it: nothing went out yet, so the answer is a 500 naming the part
    r = http.post("/predictions/streamy", content=b"first:200000")
    assert r.status_code == 500
    assert "a streamed part of 200,000 bytes" in r.json()["message"]
    _said(r.json()["message"], 200_000)
    # after a part went out the status cannot change: the answer ends without its last chunk
    # (as any request failing after its first part), and neither the big part nor any later one was sent
    got = b""
    with pytest.raises(httpx.RemoteProtocolError):
        with http.stream("POST", "/predictions/streamy", content=b"second:200000") as r:
            assert r.status_code == 200
            for chunk in r.iter_bytes():
                got += chunk
    assert got == b"small"
    assert http.post("/predictions/streamy", content=b"second:10").content == b"small" + b"y" * 10 + b"afterend"


def test_a_grpc_stream_ends_with_internal_naming_the_part_over_the_limit(srv):
    from server.protocols.grpc.generated import inference_pb2, inference_pb2_grpc

    with grpc.insecure_channel(srv.grpc) as channel:
        stub = inference_pb2_grpc.InferenceAPIsServiceStub(channel)
        got = []
        with pytest.raises(grpc.RpcError) as err:
            for r in stub.StreamPredictions(inference_pb2.PredictionsRequest(
                    model_name="streamy", input={"body": b"second:200000"}), timeout=30):
                got.append(r.prediction)
        assert got == [b"small"]
        assert err.value.code() == grpc.StatusCode.INTERNAL
        _said(err.value.details(), 200_000)
        parts = [r.prediction for r in stub.StreamPredictions(inference_pb2.PredictionsRequest(
            model_name="streamy", input={"body": b"second:3"}), timeout=30)]
        assert parts == [b"small", b"yyy", b"after", b"end"]


def test_model_stream_infer_answers_the_refused_part_in_band_and_the_stream_goes_on(srv):
    import struct

    from tritonclient.grpc import service_pb2 as oip, service_pb2_grpc as oip_grpc

    def request(body: bytes, rid: str):
        r = oip.ModelInferRequest(model_name="streamy", id=rid)
        r.inputs.append(oip.ModelInferRequest.InferInputTensor(name="body", datatype="BYTES", shape=[1]))
        r.raw_input_contents.append(struct.pack("<I", len(body)) + body)
        return r

    def text(resp) -> bytes:
        raw = resp.infer_response.raw_output_contents[0]
        return raw[4:4 + struct.unpack_from("<I", raw)[0]]

    with grpc.insecure_channel(srv.grpc) as channel:
        stub = oip_grpc.GRPCInferenceServiceStub(channel)
        answers = list(stub.ModelStreamInfer(iter([request(b"second:200000", "big")]), timeout=30))
        assert [text(a) for a in answers[:-1]] == [b"small"]
        assert answers[-1].infer_response.id == "big"
        _said(answers[-1].error_message, 200_000)
        answers = list(stub.ModelStreamInfer(iter([request(b"second:2", "ok")]), timeout=30))
        assert not any(a.error_message for a in answers)
        assert [text(a) for a in answers] == [b"small", b"yy", b"after", b"end"]


def test_the_request_fails_at_the_refused_part_not_when_its_handler_returns(srv, tmp_path):
    # a long generation: the client learns at the part refused, while the handler still runs
    from server.protocols.grpc.generated import inference_pb2, inference_pb2_grpc
    from tests.gates import wait_until

    with grpc.insecure_channel(srv.grpc) as channel:
        stub = inference_pb2_grpc.InferenceAPIsServiceStub(channel)
        got = []
        with pytest.raises(grpc.RpcError) as err:
            for r in stub.StreamPredictions(inference_pb2.PredictionsRequest(
                    model_name="streamy", input={"body": f"second:200000:{tmp_path}".encode()}), timeout=60):
                got.append(r.prediction)
        assert not (tmp_path / "returned").exists(), "the call ended only when the handler returned"
        assert got == [b"small"] and err.value.code() == grpc.StatusCode.INTERNAL
        _said(err.value.details(), 200_000)
    (tmp_path / "release").touch()
    wait_until(lambda: (tmp_path / "returned").exists(), timeout=30, what="the handler to return")


def test_a_refusal_is_counted_as_an_error_and_logged_without_a_traceback(http, srv):
    assert http.post("/predictions/sized", content=b"300000").status_code == 500
    text = httpx.get(f"{srv.metrics}/metrics", timeout=10).text
    served = [line for line in text.splitlines() if line.startswith("osprey_requests_total") and 'model="sized"' in line]
    assert any('code="500"' in line and float(line.rsplit(" ", 1)[1]) >= 1 for line in served), served
    assert http.post("/predictions/sized", content=b"300000").status_code == 500
    lines = [line for line in srv.log().splitlines() if "model sized version 1.0: an answer of" in line]
    assert len(lines) == 1 and "over max_response_size (100000); answered 500" in lines[0], lines  # one a minute
    assert "Traceback" not in srv.log()


def test_the_size_counted_for_output_tensors():
    # what the data plane counts against max_response_size, without a server
    import numpy as np
    import torch

    from server.core.answer_size import BoundedStream, over as counted, raw_part_size
    from server.core.types import InferenceResponse

    def over(limit, **tensors):
        return counted(InferenceResponse(body=b"", tensors=tensors), limit)

    assert over(1_000, a=np.zeros(250, np.float32)) == 0 and over(999, a=np.zeros(250, np.float32)) == 1_000
    assert over(999, t=torch.zeros(250)) == 1_000  # torch tensors by their bytes too
    # fixed-width strings: the padding and numpy's 4 bytes a character do not count, UTF-8 does
    texts = np.array(["a" * 2_000] + ["b"] * 999)
    assert texts.nbytes == 8_000_000 and over(3_000, s=texts) == 0 and over(2_998, s=texts) == 2_999
    assert over(5, b=np.array([b"abc", "\u00e9\u00e9"], dtype=object)) == 7  # BYTES elements: bytes, UTF-8 text
    assert over(3, m=memoryview(np.zeros(2, np.float32))) == 8
    # a streamed part as it is sent: by a raw stream (ModelStreamInfer) an OIP part's tensors by
    # their bytes, anything else as its text; by the others bytes, UTF-8 text, anything else as
    # the JSON it is sent as, encoded once
    assert raw_part_size({"tensors": {"OUT": np.zeros(10, np.float32)}}) == 40
    assert raw_part_size(b"abc") == 3 and raw_part_size(np.zeros(3)) == len(str(np.zeros(3)))

    class Sink(list):
        raw = False

        def __call__(self, data, headers=None):
            self.append(data)

    sink = Sink()
    bounded = BoundedStream(sink, 12)
    for part in (b"abc", "\u00e9", {"a": [1, 2]}, {"tensors": {"OUT": np.zeros(2, np.float32)}}, b"late"):
        bounded(part)
    assert sink == [b"abc", "\u00e9", b'{"a":[1,2]}'] and bounded.refused == len(b'{"tensors":{"OUT":[0.0,0.0]}}')
