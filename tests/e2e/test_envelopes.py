"""TorchServe's request envelopes (service_envelope) and chunked streaming over HTTP, against a
real ``osprey serve``, compared with what real TorchServe 0.12 answered.

tests/fixtures/torchserve_envelopes/recorded.json holds TorchServe's answers to the requests of
``CASES`` (tests/envelope_models.py) with each envelope, serving the same handlers; record.py
there made it. Bodies are compared as JSON where they are JSON (TorchServe indents its JSON,
Osprey does not). Where TorchServe fails a request it cannot read with 503 ("Prediction
failed": its handler got None), Osprey answers 400 naming what is missing: the tests check
both facts.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from tests.envelope_models import CASES, ECHO_HANDLER, JSON, STREAM_HANDLER, STREAM_HEADER_HANDLER
from tests.gates import Gate
from tests.models import handler_archive

RECORDED = json.loads((Path(__file__).resolve().parent.parent / "fixtures" / "torchserve_envelopes"
                       / "recorded.json").read_text())
BAD = {"kserve": {"no_instances": "KServe v1 request body has no 'instances' list",
                  "not_json": "KServe v1 request body is not valid JSON"},
       "kservev2": {"no_inputs": "KServe v2 request body has no 'inputs' list"},
       "json": {"no_instances": "JSON envelope request body has no 'instances' list"}}


@pytest.fixture(scope="module")
def servers(osprey_module, tmp_path_factory):
    """envelope -> a server with that service_envelope (started on first use, shared by the module).
    The body server also serves the streaming handler (the body envelope hands it each body,
    which it reads as well as a plain row) and, in process instances, both handlers."""
    started: dict = {}

    def get(envelope: str):
        if envelope not in started:
            store = tmp_path_factory.mktemp(f"store-{envelope}")
            handler_archive(store, "echo", ECHO_HANDLER)
            models = ["echo=echo.mar"]
            if envelope == "kserve":  # two requests wait for each other: one batch
                handler_archive(store, "echob", ECHO_HANDLER, config={"batchSize": 2, "maxBatchDelay": 10000})
                models.append("echob=echob.mar")
            if envelope == "body":
                handler_archive(store, "echop", ECHO_HANDLER, config={"isolation": "process"})
                handler_archive(store, "stream", STREAM_HANDLER)
                handler_archive(store, "streamp", STREAM_HANDLER, config={"isolation": "process"})
                models += ["echop=echop.mar", "stream=stream.mar", "streamp=streamp.mar"]
            started[envelope] = osprey_module(models=models, store=store, extra_args=["--no-grpc"],
                                              config={"service_envelope": envelope})
        return started[envelope]
    return get


def _send(srv, method: str, path: str, headers: dict, body: bytes) -> httpx.Response:
    return httpx.request(method, srv.inference + path, headers=headers, content=body, timeout=30)


def _json_or_text(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return text


def _cases(envelope: str):
    return [pytest.param(envelope, *case, id=f"{envelope}-{case[0]}") for case in CASES[envelope]
            if case[0] not in BAD.get(envelope, {})]


@pytest.mark.parametrize("envelope, case, method, path, headers, body",
                         _cases("kserve") + _cases("kservev2") + _cases("json") + _cases("body"))
def test_envelope_answers_as_torchserve(servers, envelope, case, method, path, headers, body):
    srv = servers(envelope)
    want = RECORDED[envelope][case]
    got = _send(srv, method, path, headers, body)
    assert got.status_code == want["status"] == 200, got.text
    expected, actual = _json_or_text(want["body"]), _json_or_text(got.text)
    if case == "v2_infer_no_id":  # the id is each server's own request id
        assert actual["id"] == got.headers["x-request-id"]
        expected["id"] = actual["id"]
    assert actual == expected


def test_kservev2_outputs_have_their_real_datatypes(servers):
    out = _send(servers("kservev2"), *CASES["kservev2"][0][1:]).json()
    assert [(o["name"], o["datatype"]) for o in out["outputs"]] == [
        ("ints", "INT64"), ("floats", "FP32"), ("flags_bool", "BOOL"), ("text", "BYTES")]


def test_the_envelope_wraps_process_instances_too(servers):
    srv = servers("body")
    got = httpx.post(f"{srv.inference}/predictions/echop", json={"a": 1}, timeout=30)
    assert got.status_code == 200 and got.json() == json.loads(RECORDED["body"]["json_body"]["body"])


@pytest.mark.parametrize("envelope, case", [(e, c) for e, cases in BAD.items() for c in cases])
def test_a_body_the_envelope_cannot_read_is_a_400_naming_what_is_missing(servers, envelope, case):
    srv = servers(envelope)
    (method, path, headers, body), = [c[1:] for c in CASES[envelope] if c[0] == case]
    got = _send(srv, method, path, headers, body)
    assert RECORDED[envelope][case]["status"] == 503  # TorchServe's handler got None and failed
    assert got.status_code == 400, got.text
    assert got.json()["code"] == 400 and BAD[envelope][case] in got.json()["message"]
    assert httpx.get(f"{srv.inference}/ping").json() == {"status": "Healthy"}
    again = next(c for c in CASES[envelope] if c[0] not in BAD[envelope])
    assert _send(srv, *again[1:]).status_code == 200  # the server and the model stay up


def test_kserve_batch_of_two_gets_two_answers(servers):
    """TorchServe's kserve envelope reads only the first request of a batch: both requests of a
    batch of two fail there (recorded); here each gets its own answer."""
    srv = servers("kserve")
    assert [a["status"] for a in RECORDED["kserve"]["batch_of_two"]] == [503, 503]
    with httpx.Client(timeout=30) as client:
        import concurrent.futures as cf

        with cf.ThreadPoolExecutor(2) as pool:
            answers = list(pool.map(lambda i: client.post(f"{srv.inference}/v1/models/echob:predict",
                                                         json={"instances": [i, i + 10]}), (1, 2)))
    assert [a.json() for a in answers] == [{"predictions": [{"echo": 1}, {"echo": 11}]},
                                           {"predictions": [{"echo": 2}, {"echo": 12}]}]


def test_kservev2_explain_route_and_oip_without_the_setting(servers):
    """explain exists under /v2 only with service_envelope=kservev2; without it /v2 infer is the
    Open Inference Protocol (tensors decoded by the server, OIP errors)."""
    plain = servers("body")
    got = httpx.post(f"{plain.inference}/v2/models/echo/explain", json={"inputs": []})
    assert got.status_code == 404
    got = httpx.post(f"{plain.inference}/v2/models/echo/infer", json={"instances": [1]})
    assert got.status_code == 400 and "inputs" in got.json()["error"]


# --- chunked streaming over HTTP ---------------------------------------------------------------
# (on the body envelope's server, compared with TorchServe streaming without an envelope: the
# body envelope changes what the handler reads, not what it answers)

def _chunks(srv, path: str, headers: dict, body: bytes) -> tuple[httpx.Response, list[bytes]]:
    with httpx.Client(timeout=30) as client, client.stream("POST", srv.inference + path, headers=headers,
                                                           content=body) as resp:
        return resp, list(resp.iter_raw())


@pytest.mark.parametrize("case", ["stream_text", "stream_json"])
def test_streamed_answer_is_chunked_as_torchserve(servers, case):
    (path, headers, body), = [c[2:] for c in CASES[""] if c[0] == case]
    want = RECORDED["none"][case]
    resp, chunks = _chunks(servers("body"), path, headers, body)
    assert resp.status_code == want["status"] == 200
    assert resp.headers["transfer-encoding"] == want["headers"]["transfer-encoding"] == "chunked"
    assert "content-length" not in resp.headers and resp.headers["x-request-id"]
    assert [_json_or_text(c.decode()) for c in chunks] == [_json_or_text(c) for c in want["chunks"]]


@pytest.mark.parametrize("model", ["stream", "streamp"])  # a thread instance, a process instance
def test_each_part_arrives_as_its_own_chunk_before_the_final_one(servers, tmp_path, model):
    srv = servers("body")
    gates = [Gate(tmp_path, f"g{i}") for i in range(2)]
    body = {"parts": ["p0 ", {"p": 1}], "gates": [g.value for g in gates], "final": "end"}
    with httpx.Client(timeout=30) as client, client.stream("POST", f"{srv.inference}/predictions/{model}",
                                                           json=body) as resp:
        assert resp.status_code == 200 and resp.headers["transfer-encoding"] == "chunked"
        chunks = resp.iter_raw()
        assert next(chunks) == b"p0 "  # the handler holds on gate 0: nothing else can have been sent
        gates[0].wait_entered()
        gates[0].path.touch()
        assert json.loads(next(chunks)) == {"p": 1}
        gates[1].wait_entered()
        gates[1].path.touch()
        assert list(chunks) == [b"end"]


def test_a_request_failing_after_its_parts_ends_the_connection_and_the_server_stays_up(servers):
    srv = servers("body")
    (path, headers, body), = [c[2:] for c in CASES[""] if c[0] == "stream_then_fail"]
    want = RECORDED["none"]["stream_then_fail"]
    assert want["connection_reset"] and want["chunks"] == ["a "]  # TorchServe: the part, then a reset
    got: list[bytes] = []
    with pytest.raises(httpx.RemoteProtocolError):  # the answer never ends: the client knows it failed
        with httpx.Client(timeout=30) as client, client.stream("POST", srv.inference + path, headers=headers,
                                                               content=body) as resp:
            assert resp.status_code == 200
            for chunk in resp.iter_raw():
                got.append(chunk)
    assert got == [b"a "]
    assert httpx.get(f"{srv.inference}/ping").json() == {"status": "Healthy"}
    resp, chunks = _chunks(srv, path, JSON, json.dumps({"parts": ["b "]}).encode())
    assert chunks == [b"b ", b"world "]


def test_an_answer_without_parts_is_not_chunked(servers):
    srv = servers("body")
    resp = httpx.post(f"{srv.inference}/predictions/stream", json={"parts": []}, timeout=30)
    assert resp.status_code == 200 and resp.text == "world "
    assert resp.headers["content-length"] == "6" and "transfer-encoding" not in resp.headers


def test_a_client_leaving_mid_stream_leaves_the_model_serving(servers, tmp_path):
    srv = servers("body")
    gate = Gate(tmp_path)
    with httpx.Client(timeout=30) as client, client.stream(
            "POST", f"{srv.inference}/predictions/stream", json={"parts": ["p0 ", "p1 "], "gates": [gate.value]}) as resp:
        assert next(resp.iter_raw()) == b"p0 "
    gate.wait_entered()
    gate.path.touch()  # the handler sends its next part and answers with nobody listening
    resp, chunks = _chunks(srv, "/predictions/stream", JSON, json.dumps({"parts": ["x "]}).encode())
    assert chunks == [b"x ", b"world "]  # the one instance is free again: the abandoned answer ended
    assert httpx.get(f"{srv.inference}/ping").json() == {"status": "Healthy"}


def test_a_streamed_answer_keeps_the_headers_the_handler_set_as_torchserve(osprey, tmp_path):
    want = json.loads((Path(__file__).resolve().parent.parent / "fixtures" / "torchserve_model_deps"
                       / "recorded.json").read_text())["on"]["stream answer"]
    store = tmp_path / "store"
    handler_archive(store, "streamh", STREAM_HEADER_HANDLER)
    handler_archive(store, "streamhp", STREAM_HEADER_HANDLER, config={"isolation": "process"})
    srv = osprey(models=["streamh=streamh.mar", "streamhp=streamhp.mar"], store=store, extra_args=["--no-grpc"])
    for model in ("streamh", "streamhp"):  # a thread instance, a process instance
        resp, chunks = _chunks(srv, f"/predictions/{model}", {}, b"x")
        assert resp.status_code == want["status"] == 200
        assert [c.decode() for c in chunks] == want["chunks"] == ["a ", "b ", "end"]
        for name in ("content-type", "transfer-encoding", "x-osprey-note"):
            assert resp.headers.get(name) == want["headers"][name], (model, name)
        assert "ts_stream_next" not in resp.headers and "content-length" not in resp.headers


def _oip_values(out) -> tuple:
    """(name, datatype, shape, values) of an OIP gRPC output, whether in contents (TorchServe)
    or in raw_output_contents (Osprey)."""
    name, dt, shape, values = out["name"], out["datatype"], [int(s) for s in out["shape"]], out.get("values")
    if values is None:
        contents = next(iter(out["contents"].values()))
        values = [float(v) if dt.startswith("FP") else int(v) for v in contents] if dt != "BYTES" else contents
    return name, dt, shape, values


def test_kservev2_oip_grpc_model_infer_to_a_torchserve_handler_answers_as_torchserve(osprey, tmp_path):
    """TorchServe's OIP gRPC service (ts_open_inference_protocol=true) hands a TorchServe-style
    handler the KServe v2 JSON body it makes of the request; Osprey's ModelInfer does the same
    under service_envelope=kservev2 (it answered 400 before: the handler got no body)."""
    import grpc

    from server.core.tensors import decode_raw
    from tests.oip_stubs import pb, pb_grpc  # one copy of grpc_service.proto per process (see there)

    want = json.loads((Path(__file__).resolve().parent.parent / "fixtures" / "torchserve_model_deps"
                       / "recorded.json").read_text())["kservev2"]
    store = tmp_path / "store"
    handler_archive(store, "echo", ECHO_HANDLER)
    srv = osprey(models=["echo=echo.mar"], store=store, config={"service_envelope": "kservev2"})
    tensor = pb.ModelInferRequest.InferInputTensor
    cases = {
        "int32": pb.ModelInferRequest(model_name="echo", id="r1", inputs=[tensor(
            name="x", datatype="INT32", shape=[3], contents=pb.InferTensorContents(int_contents=[1, 2, 3]))]),
        "fp32 2x2": pb.ModelInferRequest(model_name="echo", id="r2", inputs=[tensor(
            name="y", datatype="FP32", shape=[2, 2], contents=pb.InferTensorContents(fp32_contents=[1.0, 2.0, 3.0, 4.0]))]),
        "two inputs": pb.ModelInferRequest(model_name="echo", id="r3", inputs=[
            tensor(name="a", datatype="INT64", shape=[2], contents=pb.InferTensorContents(int64_contents=[5, 6])),
            tensor(name="b", datatype="BYTES", shape=[1], contents=pb.InferTensorContents(bytes_contents=[b"hi"]))]),
    }
    with grpc.insecure_channel(srv.grpc) as ch:
        stub = pb_grpc.GRPCInferenceServiceStub(ch)
        for label, req in cases.items():
            resp = stub.ModelInfer(req, timeout=30)
            assert (resp.model_name, resp.model_version, resp.id) == ("echo", "1.0", req.id), label
            ours = [_oip_values({"name": o.name, "datatype": o.datatype, "shape": list(o.shape),
                                 "values": decode_raw(o.name, o.datatype, list(o.shape), raw).ravel().tolist()})
                    for o, raw in zip(resp.outputs, resp.raw_output_contents)]
            theirs = [_oip_values(o) for o in want[label]["outputs"]]
            if label == "two inputs":
                # TorchServe hands the handler a BYTES input as the base64 of its bytes (its JSON of a
                # ByteString), so its echo answers base64 of base64; Osprey hands it the text, as REST does
                assert theirs[1] == ("b", "BYTES", [1], ["ImFHaz0i"]) and ours[1] == ("b", "BYTES", [1], [b"hi"])
                ours, theirs = ours[:1], theirs[:1]
            assert ours == theirs, label
        with pytest.raises(grpc.RpcError) as missing:
            stub.ModelInfer(pb.ModelInferRequest(model_name="zz", id="r4", inputs=cases["int32"].inputs), timeout=30)
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND and "zz" in missing.value.details()
    # the same request over REST /v2/models/echo/infer: the same values (TorchServe answered them too)
    rest = httpx.post(f"{srv.inference}/v2/models/echo/infer", json={"id": "r1", "inputs": [
        {"name": "x", "datatype": "INT32", "shape": [3], "data": [1, 2, 3]}]}, timeout=30).json()
    assert rest["outputs"] == json.loads(want["rest v2 int32"]["body"])["outputs"] == [
        {"name": "x", "datatype": "INT64", "data": [2, 4, 6], "shape": [3]}]
