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
TENSOR_CONFIG = {"inputs": [{"name": "N", "datatype": "INT64", "shape": [1]}],
                 "outputs": [{"name": "OUT", "datatype": "UINT8", "shape": [-1]}]}


@pytest.fixture(scope="module")
def srv(osprey_module, tmp_path_factory):
    store = tmp_path_factory.mktemp("store")
    handler_archive(store, "sized", BYTES_HANDLER)
    handler_archive(store, "tsized", TENSOR_HANDLER, config=TENSOR_CONFIG)
    return osprey_module(["sized=sized.mar", "tsized=tsized.mar"], store, config={"max_response_size": LIMIT})


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

    from server.core.dataplane import _over
    from server.core.types import InferenceResponse

    def over(limit, **tensors):
        return _over(InferenceResponse(body=b"", tensors=tensors), limit)

    assert over(1_000, a=np.zeros(250, np.float32)) == 0 and over(999, a=np.zeros(250, np.float32)) == 1_000
    assert over(999, t=torch.zeros(250)) == 1_000  # torch tensors by their bytes too
    # fixed-width strings: the padding and numpy's 4 bytes a character do not count, UTF-8 does
    texts = np.array(["a" * 2_000] + ["b"] * 999)
    assert texts.nbytes == 8_000_000 and over(3_000, s=texts) == 0 and over(2_998, s=texts) == 2_999
    assert over(5, b=np.array([b"abc", "\u00e9\u00e9"], dtype=object)) == 7  # BYTES elements: bytes, UTF-8 text
    assert over(3, m=memoryview(np.zeros(2, np.float32))) == 8
