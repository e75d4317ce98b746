"""Client mistakes on the Open Inference Protocol (REST and gRPC) against the real server:
each gets a 400 / INVALID_ARGUMENT naming what was wrong, never a 500 or UNKNOWN, never
takes down the good requests batched with it, never loses a response on a stream, and
leaves no traceback in the server log. A client that goes away while its request is queued
ends quietly. One check drives a model instance in-process: a request whose inputs cannot
be decoded fails alone, its batch-mates are answered."""

from __future__ import annotations

import asyncio
import dataclasses
import gzip
import json
import queue
import re
import socket
import struct
import threading
import zlib
from urllib.parse import urlsplit

import grpc
import httpx
import numpy as np
import pytest

from server.core.archive import open_archive
from server.protocols.rest.asgi import Router, oip_error
from server.core.errors import ErrorKind, OspreyError
from server.core.model_config import ModelConfig, parse_model_config
from server.instances.thread import ModelInstance
from server.core.types import InferenceRequest, InferenceResponse, Protocol, Ticket

from tests.gates import Gate, pending, wait_until
from tests.models import RECORDING_HANDLER, handler_archive
from tests.oip_archives import echo_archive, ops_archive, tensor_mlp_archive
from tests.oip_stubs import pb, pb_grpc

# A tensor handler that answers a string where its config declares an FP32 output: a
# handler's mistake (not the client's), which the front end must still answer.
WRONG_OUTPUT_HANDLER = '''
import numpy as np

class WrongOutput:
    accepts_tensors = True

    def handle(self, data, context):
        return [{"tensors": {"OUTPUT0": np.array(["not a number"])}} for _ in data]
'''
WRONG_OUTPUT_CONFIG = {"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [-1, 2]}],
                       "outputs": [{"name": "OUTPUT0", "datatype": "FP32", "shape": [-1, 2]}]}

GOOD_TMLP = {"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [1, 16], "data": [0.5] * 16}]}
HEADER = "Inference-Header-Content-Length"


@pytest.fixture(scope="module")
def srv(osprey_module, tmp_path_factory):
    store = tmp_path_factory.mktemp("store")
    tensor_mlp_archive(store)
    echo_archive(store)
    handler_archive(store, "rec", RECORDING_HANDLER, config={"batchSize": 4, "maxBatchDelay": 20})
    handler_archive(store, "wrongout", WRONG_OUTPUT_HANDLER, config=WRONG_OUTPUT_CONFIG)
    ops_archive(store)
    return osprey_module(["tmlp=tmlp.mar", "echo=echo.mar", "rec=rec.mar", "wrongout=wrongout.mar", "ops=ops.mar"],
                         store)


@pytest.fixture(scope="module")
def http(srv):
    with httpx.Client(base_url=srv.inference, timeout=30) as c:
        yield c


@pytest.fixture(scope="module")
def stub(srv):
    channel = grpc.insecure_channel(srv.grpc)
    yield pb_grpc.GRPCInferenceServiceStub(channel)
    channel.close()


@pytest.fixture
def clean_log(srv, http):
    """After the test: a good request still answers 200 and the log gained no traceback."""
    start = len(srv.log())
    yield
    r = http.post("/v2/models/tmlp/infer", json=GOOD_TMLP)
    assert r.status_code == 200, r.text
    assert len(r.json()["outputs"][0]["data"]) == 4
    added = srv.log()[start:]
    assert "Traceback" not in added and "Exception in ASGI application" not in added, added


def _bad(r: httpx.Response, *needles: str) -> str:
    assert r.status_code == 400, (r.status_code, r.text)
    message = r.json()["error"]
    for needle in needles:
        assert needle in message, (needle, message)
    return message


def _tmlp(**changes) -> dict:
    inp = dict(GOOD_TMLP["inputs"][0])
    inp.update(changes.pop("input", {}))
    return {"inputs": [inp], **changes}


# --- REST: JSON bodies ---------------------------------------------------------------------
@pytest.mark.parametrize("body, needles", [
    (_tmlp(input={"parameters": [1]}), ("input 'INPUT0'", "'parameters' must be a JSON object", "list")),
    (_tmlp(input={"parameters": "x"}), ("input 'INPUT0'", "'parameters' must be a JSON object")),
    (_tmlp(parameters="x"), ("the request", "'parameters' must be a JSON object", "str")),
    (_tmlp(parameters=[1]), ("the request", "'parameters' must be a JSON object", "list")),
    (_tmlp(outputs=[{"name": "OUTPUT0", "parameters": "x"}]),
     ("output 'OUTPUT0'", "'parameters' must be a JSON object")),
    (_tmlp(outputs="OUTPUT0"), ("'outputs' must be a list", "str")),
    (_tmlp(outputs={"name": "OUTPUT0"}), ("'outputs' must be a list", "dict")),
    (_tmlp(outputs=["OUTPUT0"]), ("outputs[0]", "'name'")),
    (_tmlp(outputs=[{"name": "OUTPUT0", "parameters": {"binary_data": "yes"}}]),
     ("output 'OUTPUT0'", "binary_data", "true or false")),
    (_tmlp(parameters={"binary_data_output": 1}), ("binary_data_output", "true or false")),
    (_tmlp(input={"parameters": {"content_type": 5}}), ("input 'INPUT0'", "content_type", "string")),
    (_tmlp(input={"datatype": "INT8", "data": [1000] * 16}), ("input 'INPUT0'", "out of range for INT8")),
    (_tmlp(input={"datatype": "UINT8", "data": [-1] * 16}), ("input 'INPUT0'", "out of range for UINT8")),
    (_tmlp(input={"datatype": "INT64", "data": [123456789012345678901234567890] + [1] * 15}),
     ("input 'INPUT0'", "out of range for INT64")),
    (_tmlp(input={"shape": [1] * 100, "data": [1.0]}), ("input 'INPUT0'", "100 dimensions", "at most")),
    ({"inputs": [GOOD_TMLP["inputs"][0], GOOD_TMLP["inputs"][0]]}, ("input 'INPUT0'", "more than once")),
    (_tmlp(input={"parameters": {"binary_data_size": 64}}), ("input 'INPUT0'", "no binary data")),
    (_tmlp(input={"datatype": "INT32", "data": [0.7] * 16}), ("input 'INPUT0'", "element 0 is 0.7", "whole numbers")),
    (_tmlp(input={"data": ["1.5"] * 16}), ("input 'INPUT0'", "element 0 is '1.5' (a string)", "FP32 takes numbers")),
    (_tmlp(input={"data": None}), ("input 'INPUT0'", "data must be a list of FP32 values, got null")),
    (_tmlp(id=5), ("'id' must be a string", "int")),
    (_tmlp(id={"a": 1}), ("'id' must be a string", "dict")),
], ids=["input-params-list", "input-params-str", "request-params-str", "request-params-list",
        "output-params-str", "outputs-str", "outputs-dict", "outputs-item-str", "binary_data-str",
        "binary_data_output-int", "content_type-int", "int8-overflow", "uint8-negative", "int64-overflow",
        "100-dims", "duplicate-input", "binary-size-without-binary", "int32-fraction", "fp32-strings",
        "data-null", "id-int", "id-object"])
def test_rest_json_client_mistakes_are_400_naming_the_problem(http, clean_log, body, needles):
    _bad(http.post("/v2/models/tmlp/infer", json=body), *needles)


# --- inputs of one request, one batch dimension ------------------------------------------------
def _ops_inputs(rows: dict[str, int]) -> list[dict]:
    """JSON inputs of the ``ops`` model (A FP32, B INT64, C FP16; 3 columns), ``rows[name]`` rows each."""
    kinds = {"A": "FP32", "B": "INT64", "C": "FP16"}
    return [{"name": n, "datatype": kinds[n], "shape": [k, 3], "data": [1] * (3 * k)} for n, k in rows.items()]


def test_inputs_of_one_request_must_hold_the_same_number_of_rows(http, stub, clean_log):
    """The tensor handler joins requests along the batch dimension and hands each its rows back:
    a request whose inputs disagree on it would take rows of its batch-mates. Refused, naming them."""
    _bad(http.post("/v2/models/ops/infer", json={"inputs": _ops_inputs({"A": 2, "B": 1, "C": 2})}),
         "inputs differ in their batch dimension", "'A' 2, 'B' 1, 'C' 2")
    req = pb.ModelInferRequest(model_name="ops")
    for n, dt, k, raw in (("A", "FP32", 1, np.ones((1, 3), np.float32)), ("B", "INT64", 2, np.ones((2, 3), np.int64)),
                          ("C", "FP16", 1, np.ones((1, 3), np.float16))):
        req.inputs.add(name=n, datatype=dt, shape=[k, 3])
        req.raw_input_contents.append(raw.tobytes())
    _invalid(stub, req, "inputs differ in their batch dimension", "'A' 1, 'B' 2, 'C' 1")
    ok = http.post("/v2/models/ops/infer", json={"inputs": _ops_inputs({"A": 2, "B": 2, "C": 2})})
    assert ok.status_code == 200 and [o["shape"] for o in ok.json()["outputs"]] == [[2, 3]] * 3, ok.text


def _run_in_instance(inst: ModelInstance, batch: list[Ticket]) -> list:
    """Start ``inst``, hand it ``batch`` as one handoff, stop it; the batch's outcomes."""
    async def run():
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        inst.submit([batch], loop, lambda _i, _b, outcomes: done.set_result(outcomes[0]))
        return await asyncio.wait_for(done, 30)

    inst.start()
    try:
        assert inst._loaded.wait(30) and inst.status == "READY", inst.error
        return asyncio.run(run())
    finally:
        inst.stop()


def test_a_request_of_mismatched_rows_fails_alone_and_its_batch_mates_get_their_own_rows(tmp_path):
    """In one batch with a good request (the order of the reviewer's repro: the bad one first),
    the bad one is refused and the good one gets exactly its own rows back."""
    store = tmp_path / "store"
    store.mkdir()
    archive = open_archive(ops_archive(store), tmp_path / "work")
    config = dataclasses.replace(parse_model_config(archive.config), batch_size=4, device_type="cpu")
    inst = ModelInstance("ops", "1.0", archive, config, 0, None)

    def req(rid: str, a: np.ndarray, b: np.ndarray) -> Ticket:
        return Ticket(InferenceRequest(model="ops", version="1.0", request_id=rid, protocol=Protocol.REST_V2,
                                       tensors={"A": a, "B": b, "C": np.ones((len(a), 3), np.float16)}))

    bad = req("bad", np.full((2, 3), 500, np.float32), np.full((1, 3), 1000, np.int64))
    good = req("good", np.full((1, 3), 7, np.float32), np.full((2, 3), 3000, np.int64)[:1])
    outcomes = _run_in_instance(inst, [bad, good])
    assert isinstance(outcomes[0], OspreyError) and outcomes[0].kind is ErrorKind.BAD_INPUT, outcomes[0]
    assert "'A' 2, 'B' 1" in outcomes[0].message
    answer = outcomes[1].tensors
    assert answer["A2"].tolist() == [[15.0, 15.0, 15.0]] and answer["B2"].tolist() == [[8999, 8999, 8999]]


@pytest.mark.parametrize("rid, needle", [
    ("\U0001f600", "cannot be sent back as a header"), ("a\r\nSet-Cookie: x=1", "cannot be sent back as a header"),
    (" padded", "starts or ends with a space"), ("x" * 2000, "2000 characters long"),
], ids=["emoji", "crlf", "space", "long"])
def test_a_request_id_that_cannot_be_a_header_is_refused_before_the_model_runs(http, stub, clean_log, rid, needle):
    """The OIP id is sent back as x-request-id (gRPC: trailing metadata) and feedback joins on
    it: one that cannot be a header is refused naming it, not a 500 or a dropped connection
    after the model ran."""
    _bad(http.post("/v2/models/tmlp/infer", json=_tmlp(id=rid)), "'id'", needle)
    _invalid(stub, _grpc_tmlp(rid=rid), "'id'", needle)
    ok = http.post("/v2/models/tmlp/infer", json=_tmlp(id="client id 42"))
    assert ok.status_code == 200 and ok.headers["x-request-id"] == ok.json()["id"] == "client id 42", ok.text


# --- shapes and compressed bodies ---------------------------------------------------------------
def test_an_empty_shape_with_a_huge_dimension_is_refused_not_an_internal_error(http, stub, clean_log):
    huge = [0, 9223372036854775807]
    _bad(http.post("/v2/models/tmlp/infer", json=_tmlp(input={"shape": huge, "data": []})),
         "input 'INPUT0'", "is too large")
    body, headers = _binary([{"name": "INPUT0", "datatype": "FP32", "shape": huge,
                              "parameters": {"binary_data_size": 0}}], b"")
    _bad(http.post("/v2/models/tmlp/infer", content=body, headers=headers), "input 'INPUT0'", "is too large")
    _invalid(stub, _grpc_tmlp(shape=huge, raw=b""), "input 'INPUT0'", "is too large")
    _invalid(stub, _grpc_tmlp(shape=huge, raw=None, contents=pb.InferTensorContents(fp32_contents=[])),
             "input 'INPUT0'", "is too large")


def test_compressed_bodies_are_read_as_tritonclient_sends_them(http, clean_log):
    """Content-Encoding gzip or deflate (tritonclient's request_compression_algorithm): the
    same answer as the plain body, Inference-Header-Content-Length counted uncompressed; an
    unknown coding 415, data that does not inflate 400, one that inflates past
    max_request_size 413, each naming it."""
    plain = http.post("/v2/models/tmlp/infer", json=GOOD_TMLP)
    assert plain.status_code == 200
    raw = json.dumps(GOOD_TMLP).encode()
    members = gzip.compress(raw[:10]) + gzip.compress(raw[10:])  # several gzip members, one after another
    for coding, packed in (("gzip", gzip.compress(raw)), ("deflate", zlib.compress(raw)),
                           ("deflate", zlib.compress(raw)[2:-4]), ("identity, gzip", gzip.compress(raw)),
                           ("gzip", members)):
        r = http.post("/v2/models/tmlp/infer", content=packed,
                      headers={"content-encoding": coding, "content-type": "application/json"})
        assert r.status_code == 200 and r.json()["outputs"] == plain.json()["outputs"], (coding, r.text)
    body, headers = _binary([{"name": "INPUT0", "datatype": "FP32", "shape": [1, 16],
                              "parameters": {"binary_data_size": 64}}], RAW)
    r = http.post("/v2/models/tmlp/infer", content=gzip.compress(body), headers={**headers, "content-encoding": "gzip"})
    assert r.status_code == 200 and r.json()["outputs"] == plain.json()["outputs"], r.text
    r = http.post("/v2/models/tmlp/infer", content=raw, headers={"content-encoding": "br"})
    assert r.status_code == 415 and "Content-Encoding 'br' is not supported" in r.json()["error"], r.text
    _bad(http.post("/v2/models/tmlp/infer", content=b"not gzip at all", headers={"content-encoding": "gzip"}),
         "not valid gzip data")
    _bad(http.post("/v2/models/tmlp/infer", content=gzip.compress(raw)[:-12], headers={"content-encoding": "gzip"}),
         "truncated gzip data")
    bomb = gzip.compress(b"0" * (7 << 20))  # 7 MiB of zeros in a few KiB: past max_request_size (6,553,500)
    r = http.post("/v2/models/tmlp/infer", content=bomb, headers={"content-encoding": "gzip"})
    assert r.status_code == 413 and "once decompressed" in r.json()["error"], r.text


# --- REST: binary tensor data extension ----------------------------------------------------
def _binary(inputs: list[dict], raw: bytes) -> tuple[bytes, dict]:
    header = json.dumps({"inputs": inputs}).encode()
    return header + raw, {HEADER: str(len(header)), "content-type": "application/octet-stream"}


RAW = np.full(16, 0.5, np.float32).tobytes()


@pytest.mark.parametrize("size", [-1, -64, True, "64", 64.0], ids=["minus-1", "minus-64", "true", "string", "float"])
def test_rest_binary_data_size_must_be_a_non_negative_integer(http, clean_log, size):
    body, headers = _binary([{"name": "INPUT0", "datatype": "FP32", "shape": [1, 16],
                              "parameters": {"binary_data_size": size}}], RAW)
    _bad(http.post("/v2/models/tmlp/infer", content=body, headers=headers),
         "input 'INPUT0'", "binary_data_size", "non-negative integer", repr(size))


def test_rest_binary_duplicate_input_and_100_dims(http, clean_log):
    spec = {"name": "INPUT0", "datatype": "FP32", "shape": [1, 16], "parameters": {"binary_data_size": 64}}
    body, headers = _binary([spec, spec], RAW + RAW)
    _bad(http.post("/v2/models/tmlp/infer", content=body, headers=headers), "input 'INPUT0'", "more than once")
    body, headers = _binary([dict(spec, shape=[1] * 100, parameters={"binary_data_size": 4})], RAW[:4])
    _bad(http.post("/v2/models/tmlp/infer", content=body, headers=headers), "input 'INPUT0'", "100 dimensions")
    body, headers = _binary([dict(spec, data=[0.5] * 16)], RAW)  # which one would the model get?
    _bad(http.post("/v2/models/tmlp/infer", content=body, headers=headers), "input 'INPUT0'", "data twice")
    good, headers = _binary([spec], RAW)
    r = http.post("/v2/models/tmlp/infer", content=good, headers=headers)
    assert r.status_code == 200 and len(r.json()["outputs"][0]["data"]) == 4


def test_rest_body_without_json_header_for_a_bytes_input(http, clean_log):
    """Inference-Header-Content-Length: 0 sends the whole body as the model's one input; a
    BYTES input of shape [-1] gets as many elements as the body frames (it was a 400)."""
    r = http.post("/v2/models/echo/infer", content=struct.pack("<I", 5) + b"hello",
                  headers={HEADER: "0", "content-type": "application/octet-stream"})
    assert r.status_code == 200, r.text
    assert r.json()["outputs"][0]["data"] == ["HELLO"]
    r = http.post("/v2/models/echo/infer", content=struct.pack("<I", 9) + b"hello",
                  headers={HEADER: "0", "content-type": "application/octet-stream"})
    _bad(r, "input 'body'", "runs past the end")
    # a raw body that is not whole rows of the one declared input says so (not "shape [0, 16] needs 0 bytes")
    r = http.post("/v2/models/tmlp/infer", content=RAW + b"\0" * 7,
                  headers={HEADER: "0", "content-type": "application/octet-stream"})
    _bad(r, "Inference-Header-Content-Length 0", "71 bytes", "input 'INPUT0'", "FP32 [-1, 16]",
         "not a whole number of 64-byte rows")
    r = http.post("/v2/models/tmlp/infer", content=RAW * 2, headers={HEADER: "0"})
    assert r.status_code == 200 and r.json()["outputs"][0]["shape"] == [2, 4], r.text


# --- a bad request queued with good ones ---------------------------------------------------
def _rec_body(payload: dict, **input_changes) -> dict:
    inp = {"name": "body", "datatype": "BYTES", "shape": [1], "data": [json.dumps(payload)],
           "parameters": {"content_type": "application/json"}}
    inp.update(input_changes)
    return {"inputs": [inp]}


def _rec_answer(r: httpx.Response) -> dict:
    assert r.status_code == 200, (r.status_code, r.text)
    return json.loads(r.json()["outputs"][0]["data"][0])


def test_bad_request_does_not_fail_the_good_requests_queued_with_it(srv, http, clean_log, tmp_path):
    gate = Gate(tmp_path)
    answers: dict[str, httpx.Response] = {}

    def send(key: str, body: dict) -> None:
        answers[key] = httpx.post(f"{srv.inference}/v2/models/rec/infer", json=body, timeout=60)

    held = threading.Thread(target=send, args=("held", _rec_body({"id": "held", "gate": gate.value})))
    held.start()
    gate.wait_entered()
    good = [threading.Thread(target=send, args=(f"g{i}", _rec_body({"id": f"g{i}"}))) for i in range(3)]
    for t in good:
        t.start()
    wait_until(lambda: pending(srv, "rec") == 3, what="three good requests queued behind the gate")
    # the exact request from the robustness probe: input parameters that are not an object
    bad = http.post("/v2/models/rec/infer", json={"inputs": [{"name": "body", "datatype": "FP32", "shape": [2],
                                                               "data": [1, 2], "parameters": [1]}]})
    _bad(bad, "input 'body'", "'parameters' must be a JSON object")
    gate.open()
    for t in [held, *good]:
        t.join(60)
    assert _rec_answer(answers["held"])["id"] == "held"
    mates = [_rec_answer(answers[f"g{i}"]) for i in range(3)]
    assert [m["id"] for m in mates] == ["g0", "g1", "g2"]
    assert all(m["batch"] == 3 for m in mates), mates  # they ran as one batch


def test_a_status_the_handler_sets_keeps_its_body_on_torchserves_apis(srv, http, stub):
    """context.set_response_status(422, ...) with a body: TorchServe's REST API answers that
    status with the handler's own body (its validation details), TorchServe's gRPC answers OK
    with it, as TorchServe does; the Open Inference Protocol answers its error shape."""
    from server.protocols.grpc.generated import inference_pb2, inference_pb2_grpc

    r = http.post("/predictions/rec", json={"id": "v1", "status": 422})
    assert r.status_code == 422 and r.json()["id"] == "v1" and r.json()["batch"] >= 1, r.text
    with grpc.insecure_channel(srv.grpc) as channel:
        ts = inference_pb2_grpc.InferenceAPIsServiceStub(channel)
        reply = ts.Predictions(inference_pb2.PredictionsRequest(
            model_name="rec", input={"body": json.dumps({"id": "v2", "status": 422}).encode()}), timeout=30)
    assert json.loads(reply.prediction)["id"] == "v2"
    r = http.post("/v2/models/rec/infer", json=_rec_body({"id": "v3", "status": 422}))
    assert r.status_code == 422 and r.json() == {"error": "chosen by the handler"}, r.text


# --- the runtime: a request whose inputs cannot be decoded fails alone ----------------------
def test_instance_fails_only_the_request_whose_inputs_cannot_be_decoded(tmp_path):
    """What the front ends now reject (input parameters that are not an object) failed its
    whole batch inside the instance; a per-request decoding failure stays with its request."""
    store = tmp_path / "store"
    store.mkdir()
    archive = open_archive(handler_archive(store, "rec", RECORDING_HANDLER), tmp_path / "work")
    inst = ModelInstance("rec", "1.0", archive, ModelConfig(batch_size=3, device_type="cpu"), 0, None)

    def req(i: int, meta) -> Ticket:
        body = np.empty(1, dtype=object)
        body[0] = json.dumps({"id": f"r{i}"}).encode()
        return Ticket(InferenceRequest(model="rec", version="1.0", request_id=f"r{i}", protocol=Protocol.REST_V2,
                                       tensors={"body": body}, tensor_meta=meta))

    good = {"body": {"content_type": "application/json"}}
    outcomes = _run_in_instance(inst, [req(0, good), req(1, {"body": [1]}), req(2, good)])  # parameters not an object
    assert isinstance(outcomes[0], InferenceResponse) and isinstance(outcomes[2], InferenceResponse)
    answers = [json.loads(outcomes[i].body) for i in (0, 2)]
    assert [a["id"] for a in answers] == ["r0", "r2"]
    assert [a["batch"] for a in answers] == [2, 2]  # the others ran as one batch, without it
    assert isinstance(outcomes[1], OspreyError) and outcomes[1].kind is ErrorKind.INTERNAL
    assert "could not decode the request's inputs" in outcomes[1].message


# --- gRPC ------------------------------------------------------------------------------------
def _grpc_tmlp(shape=(1, 16), raw: bytes | None = RAW, rid: str = "", **inp_kw) -> pb.ModelInferRequest:
    r = pb.ModelInferRequest(model_name="tmlp", id=rid)
    r.inputs.append(pb.ModelInferRequest.InferInputTensor(name="INPUT0", datatype=inp_kw.pop("datatype", "FP32"),
                                                          shape=list(shape), **inp_kw))
    if raw is not None:
        r.raw_input_contents.append(raw)
    return r


def _invalid(stub, request, *needles: str) -> None:
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(request, timeout=30)
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT, (info.value.code(), info.value.details())
    for needle in needles:
        assert needle in info.value.details(), (needle, info.value.details())


def test_grpc_client_mistakes_are_invalid_argument(stub, clean_log):
    _invalid(stub, _grpc_tmlp(shape=[1] * 100, raw=RAW[:4]), "input 'INPUT0'", "100 dimensions")
    _invalid(stub, _grpc_tmlp(datatype="INT8", raw=None, contents=pb.InferTensorContents(int_contents=[1000] * 16)),
             "input 'INPUT0'", "out of range for INT8")
    dup = _grpc_tmlp()
    dup.inputs.append(dup.inputs[0])
    dup.raw_input_contents.append(RAW)
    _invalid(stub, dup, "input 'INPUT0'", "more than once")
    _invalid(stub, _grpc_tmlp(parameters={"content_type": pb.InferParameter(int64_param=5)}),
             "input 'INPUT0'", "content_type")
    _invalid(stub, _grpc_tmlp(contents=pb.InferTensorContents(fp32_contents=[0.5] * 16)),
             "input 'INPUT0'", "data twice", "raw_input_contents")
    _invalid(stub, _grpc_tmlp(datatype="INT64", raw=None, contents=pb.InferTensorContents(fp32_contents=[0.5] * 16)),
             "input 'INPUT0'", "INT64 data is read from contents.int64_contents", "contents.fp32_contents")
    out = stub.ModelInfer(_grpc_tmlp(), timeout=30)
    assert np.frombuffer(out.raw_output_contents[0], np.float32).shape == (4,)


def _echo(rid: str, shape=(1,)) -> pb.ModelInferRequest:
    r = pb.ModelInferRequest(model_name="echo", id=rid)
    r.inputs.append(pb.ModelInferRequest.InferInputTensor(name="body", datatype="BYTES", shape=list(shape)))
    r.raw_input_contents.append(struct.pack("<I", 5) + f"hi {rid}.".encode()[:5])
    return r


def _lockstep_stream(stub, requests: list) -> list:
    """Send each request after the previous one's answer: one response each, in order."""
    answered: queue.Queue = queue.Queue()

    def gen():
        for r in requests:
            yield r
            answered.get(timeout=30)

    got = []
    for resp in stub.ModelStreamInfer(gen(), timeout=60):
        got.append(resp)
        answered.put(None)
        if len(got) == len(requests):
            break
    return got


def test_grpc_stream_answers_a_bad_request_in_band_and_goes_on(stub, clean_log):
    got = _lockstep_stream(stub, [_echo("0"), _echo("1", shape=[1] * 100), _echo("2")])
    assert len(got) == 3
    assert [g.infer_response.id for g in got] == ["0", "1", "2"]
    assert got[0].error_message == "" and got[0].infer_response.raw_output_contents[0][4:] == b"HI 0."
    assert "input 'body'" in got[1].error_message and "100 dimensions" in got[1].error_message
    assert got[2].error_message == "" and got[2].infer_response.raw_output_contents[0][4:] == b"HI 2."


def test_grpc_unexpected_failure_is_answered_not_unknown_and_not_lost(srv, stub):
    """A handler answering a string for an FP32 output is the handler's mistake: the call still
    gets an answer with a message (INTERNAL, or UNAVAILABLE where it counts as a failed
    prediction), never UNKNOWN, and a stream still answers every request."""
    bad = pb.ModelInferRequest(model_name="wrongout", id="w")
    bad.inputs.append(pb.ModelInferRequest.InferInputTensor(name="INPUT0", datatype="FP32", shape=[1, 2]))
    bad.raw_input_contents.append(np.zeros(2, np.float32).tobytes())
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(bad, timeout=30)
    assert info.value.code() in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNAVAILABLE), info.value.code()
    assert info.value.details()
    got = _lockstep_stream(stub, [_echo("0"), bad, _echo("2")])
    assert [g.infer_response.id for g in got] == ["0", "w", "2"]
    assert got[1].error_message and not got[0].error_message and not got[2].error_message
    assert "Task exception was never retrieved" not in srv.log()


# --- a client that goes away while queued ---------------------------------------------------
def _cancelled(srv, model: str) -> float:
    text = httpx.get(f"{srv.metrics}/metrics", timeout=30).text
    return sum(float(m.group(1)) for m in re.finditer(
        r'^osprey_requests_total\{[^}]*model="%s"[^}]*code="499"[^}]*\} (\S+)$' % model, text, re.M))


def test_client_disconnecting_while_queued_ends_quietly(srv, http, clean_log, tmp_path):
    gate = Gate(tmp_path)
    before = _cancelled(srv, "rec")
    answers: dict[str, httpx.Response] = {}

    def send(key: str, payload: dict) -> None:
        answers[key] = httpx.post(f"{srv.inference}/v2/models/rec/infer", json=_rec_body(payload), timeout=60)

    held = threading.Thread(target=send, args=("held", {"id": "held", "gate": gate.value}))
    held.start()
    gate.wait_entered()
    url = urlsplit(srv.inference)
    body = json.dumps(_rec_body({"id": "gone"})).encode()
    sock = socket.create_connection((url.hostname, url.port))
    sock.sendall(b"POST /v2/models/rec/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    wait_until(lambda: pending(srv, "rec") == 1, what="the request of the client that leaves to be queued")
    sock.close()
    # a follow-up queued on another connection: the server read the first one's close before it
    after = threading.Thread(target=send, args=("after", {"id": "after"}))
    after.start()
    wait_until(lambda: pending(srv, "rec") == 2, what="the follow-up request to be queued")
    gate.open()
    held.join(60)
    after.join(60)
    assert _rec_answer(answers["held"])["id"] == "held"
    assert _rec_answer(answers["after"])["id"] == "after"
    # counted in the same loop step that ends its ASGI task, so the log below is complete
    wait_until(lambda: _cancelled(srv, "rec") == before + 1, what="the left request to count as cancelled (499)")


class _Cycle:
    """What uvicorn's request cycle offers the router: ``receive`` and ``disconnected``."""

    def __init__(self):
        self.disconnected = False

    async def receive(self):
        return {"type": "http.request", "body": b"{}", "more_body": False}


def _router_call(cancel: str):
    """Run one request through a real Router whose handler awaits a future; cancel the future
    (as the batcher does) or the task (as shutdown does). Returns (outcome, sent messages)."""
    async def main():
        router = Router(max_body=1 << 20)
        fut = asyncio.get_running_loop().create_future()

        async def handler(req):
            await fut
            return oip_error(OspreyError(ErrorKind.INTERNAL, "unreachable"))

        router.add("POST", "/v2/models/{model}/infer", handler, errors=oip_error)
        cycle, sent = _Cycle(), []

        async def send(msg):
            sent.append(msg)

        scope = {"type": "http", "method": "POST", "path": "/v2/models/m/infer", "headers": [], "query_string": b""}
        task = asyncio.ensure_future(router(scope, cycle.receive, send))
        await asyncio.sleep(0)
        if cancel == "task":
            task.cancel()
        else:
            cycle.disconnected = cancel == "future-client-gone"
            fut.cancel()
        try:
            await task
            return "returned", sent
        except asyncio.CancelledError:
            return "cancelled", sent

    return asyncio.run(main())


def test_router_ends_quietly_for_a_request_dropped_because_its_client_left():
    assert _router_call("future-client-gone") == ("returned", [])


def test_router_answers_a_cancelled_request_whose_client_is_still_there():
    outcome, sent = _router_call("future-client-here")
    assert outcome == "returned" and sent[0]["status"] == 499
    assert "cancelled" in json.loads(sent[1]["body"])["error"]


def test_router_lets_task_cancellation_through():
    assert _router_call("task") == ("cancelled", [])


def test_rest_handler_answer_of_the_wrong_type_names_the_output(http, clean_log):
    """A handler's mistake: 503 naming the declared output, not a 500 with a traceback."""
    r = http.post("/v2/models/wrongout/infer",
                  json={"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [1, 2], "data": [0, 0]}]})
    assert r.status_code == 503, r.text
    assert "output 'OUTPUT0'" in r.json()["error"] and "FP32" in r.json()["error"]


@pytest.mark.parametrize("name", ["x" * 5000, "a%00b", "a%5Cb"])
def test_repository_load_of_a_name_that_is_no_file_name_is_refused(http, clean_log, name):
    _bad(http.post(f"/v2/repository/models/{name}/load"), "model name")


@pytest.mark.parametrize("path", ["/v2/repository/index", "/v2/repository/models/tmlp/load",
                                  "/v2/repository/models/tmlp/unload"])
def test_repository_requests_with_a_body_that_is_not_a_json_object_are_refused(http, clean_log, path):
    """Before anything is loaded or unloaded: a body is either a JSON object or nothing."""
    _bad(http.post(path, content=b"{bad", headers={"content-type": "application/json"}), "not valid JSON")
    _bad(http.post(path, json=[1]), "must be a JSON object")


@pytest.mark.parametrize("body, needle", [(b"[[1, 2,", "unexpected end of data"), (b"", "the body is empty"),
                                          (b"{x", "expected a string key"), (b'["\\ud800"]', "no low surrogate")])
def test_a_json_body_that_does_not_parse_is_400_for_the_tensor_handler(http, clean_log, body, needle):
    """Sent as application/json, such a body was read as bytes: a 1xN tensor of its characters
    (a 503 from the model) or an empty one. TorchServe's handlers still get it as bytes."""
    r = http.post("/predictions/tmlp", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    assert "sent as application/json but is not valid JSON" in r.json()["message"] and needle in r.json()["message"]
