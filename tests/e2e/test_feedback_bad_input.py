"""Feedback and monitoring routes against a real ``osprey serve`` process: bad input gets a
clear answer (404 unknown model, 400 naming what is malformed, 413 over max_request_size,
401 without the inference token; the same on gRPC as statuses), ``osprey.Monitoring`` is
listed by reflection, and every answer carries the request id feedback joins on
(x-request-id on REST and REST v2 equal to the OIP id, gRPC trailing metadata, the OIP
gRPC response id)."""

from __future__ import annotations

import grpc
import httpx
import numpy as np
import pytest
from google.protobuf import struct_pb2

from server.protocols.grpc.generated import osprey_monitoring_pb2 as mpb
from server.protocols.grpc.generated import osprey_monitoring_pb2_grpc as mpb_grpc

from tests.oip_archives import echo_archive, tensor_mlp_archive
from tests.oip_stubs import pb, pb_grpc

ROW = [0.5] * 16
INFER = {"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [1, 16], "data": ROW}]}


@pytest.fixture(scope="module")
def srv(osprey_module, tmp_path_factory):
    store = tmp_path_factory.mktemp("store")
    tensor_mlp_archive(store)
    echo_archive(store)
    return osprey_module(["tmlp=tmlp.mar", "echo=echo.mar"], store, token_auth=True, config={"max_request_size": 2000})


@pytest.fixture(scope="module")
def http(srv):
    key = srv.keys()["inference"]["key"]
    with httpx.Client(base_url=srv.inference, timeout=30, headers={"authorization": f"Bearer {key}"}) as c:
        yield c


@pytest.fixture(scope="module")
def channel(srv):
    ch = grpc.insecure_channel(srv.grpc)
    yield ch
    ch.close()


@pytest.fixture(scope="module")
def md(srv):
    return (("authorization", f"Bearer {srv.keys()['inference']['key']}"),)


def test_unknown_model_is_404(http):
    for r in (http.post("/feedback/nope", json={"request_id": "a", "label": 1}),
              http.post("/feedback/tmlp/9.9", json={"request_id": "a", "label": 1}),
              http.get("/monitoring/nope"), http.get("/monitoring/tmlp/9.9")):
        assert r.status_code == 404, r.text
        assert r.json()["code"] == 404 and ("nope" in r.json()["message"] or "9.9" in r.json()["message"])


@pytest.mark.parametrize("body,says", [
    (b"{not json", "not valid JSON"),
    (b"[]", "no feedback items"),
    (b'"label"', "the body must be"),
    (b'{"feedback": [{"request_id": "a", "label": 1}, {"label": 2}]}', "feedback[1] has no 'request_id'"),
    (b'{"request_id": "a", "label": {"class": 3}}', "feedback[0] (request_id 'a'): 'label' must be"),
])
def test_malformed_feedback_is_400_naming_what_is_wrong(http, body, says):
    r = http.post("/feedback/tmlp", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["type"] == "BadRequestException"
    assert says in r.json()["message"]


def test_feedback_over_max_request_size_is_413(http):
    body = [{"request_id": f"id-{i:04d}", "label": i % 10} for i in range(200)]
    r = http.post("/feedback/tmlp", json=body)
    assert r.status_code == 413 and "2000" in r.json()["message"]


def test_feedback_and_monitoring_need_the_inference_token(srv):
    assert httpx.post(f"{srv.inference}/feedback/tmlp", json={"request_id": "a", "label": 1}).status_code == 401
    assert httpx.get(f"{srv.inference}/monitoring/tmlp").status_code == 401


def test_a_known_model_reaches_the_monitor(http):
    # until the monitor is wired in this build, 503 "monitoring is off"; once it is, 200 with counts
    r = http.post("/feedback/tmlp", json={"request_id": "never-seen", "label": 1})
    assert r.status_code in (200, 503), r.text
    if r.status_code == 200:
        assert r.json() == {"accepted": 0, "unmatched": 1, "invalid": 0, "unmatched_ids": ["never-seen"]}
    else:
        assert "monitoring" in r.json()["message"]


def test_grpc_monitoring_errors_and_reflection(channel, md):
    stub = mpb_grpc.MonitoringStub(channel)
    item = mpb.FeedbackItem(request_id="a", label=struct_pb2.Value(number_value=1))
    for request, code, says in [
        (mpb.FeedbackRequest(model_name="nope", items=[item]), grpc.StatusCode.NOT_FOUND, "nope"),
        (mpb.FeedbackRequest(model_name="tmlp"), grpc.StatusCode.INVALID_ARGUMENT, "'items' is empty"),
        (mpb.FeedbackRequest(model_name="tmlp", items=[mpb.FeedbackItem(request_id="a")]),
         grpc.StatusCode.INVALID_ARGUMENT, "has no 'label'"),
    ]:
        with pytest.raises(grpc.RpcError) as exc:
            stub.Feedback(request, metadata=md, timeout=10)
        assert exc.value.code() == code and says in exc.value.details()
    with pytest.raises(grpc.RpcError) as exc:
        stub.ModelMonitoring(mpb.ModelMonitoringRequest(model_name="nope"), metadata=md, timeout=10)
    assert exc.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as exc:
        stub.Feedback(mpb.FeedbackRequest(model_name="tmlp", items=[item]), timeout=10)  # no token
    assert exc.value.code() == grpc.StatusCode.UNAUTHENTICATED

    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    refl = reflection_pb2_grpc.ServerReflectionStub(channel)
    answers = refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10)
    names = {s.name for a in answers for s in a.list_services_response.service}
    assert "osprey.Monitoring" in names


def test_every_answer_carries_the_id_feedback_joins_on(http, channel, md):
    # REST v2 with the client's id: x-request-id is that id
    r = http.post("/v2/models/tmlp/infer", json={**INFER, "id": "client-7"})
    assert r.status_code == 200 and r.json()["id"] == "client-7" and r.headers["x-request-id"] == "client-7"
    # without one: a fresh id in x-request-id, different per request
    a, b = http.post("/v2/models/tmlp/infer", json=INFER), http.post("/v2/models/tmlp/infer", json=INFER)
    assert a.headers["x-request-id"] and a.headers["x-request-id"] != b.headers["x-request-id"]
    # ... and the OIP response id is that id, as over gRPC (the id feedback joins on)
    assert a.json()["id"] == a.headers["x-request-id"] and b.json()["id"] == b.headers["x-request-id"]
    # OIP over gRPC: the response id, and x-request-id in trailing metadata
    stub = pb_grpc.GRPCInferenceServiceStub(channel)
    req = pb.ModelInferRequest(model_name="tmlp")
    inp = req.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 16])
    inp.contents.fp32_contents.extend(ROW)
    resp, call = stub.ModelInfer.with_call(req, metadata=md, timeout=30)
    trailing = dict(call.trailing_metadata())
    assert resp.id and trailing["x-request-id"] == resp.id
    req.id = "g-client"
    resp, call = stub.ModelInfer.with_call(req, metadata=md, timeout=30)
    assert resp.id == "g-client" == dict(call.trailing_metadata())["x-request-id"]
    assert np.frombuffer(resp.raw_output_contents[0], dtype=np.float32).size


def test_torchserve_grpc_answers_carry_their_id_in_trailing_metadata(channel, md):
    from server.protocols.grpc.generated import inference_pb2, inference_pb2_grpc

    stub = inference_pb2_grpc.InferenceAPIsServiceStub(channel)
    req = inference_pb2.PredictionsRequest(model_name="echo", input={"body": b"hi"})
    resp, call = stub.Predictions.with_call(req, metadata=md, timeout=30)
    first = dict(call.trailing_metadata())["x-request-id"]
    _, call = stub.Predictions.with_call(req, metadata=md, timeout=30)
    assert resp.prediction == b"HI" and first and dict(call.trailing_metadata())["x-request-id"] != first
    stream = stub.StreamPredictions(req, metadata=md, timeout=30)
    assert list(stream)[-1].prediction == b"HI"
    assert dict(stream.trailing_metadata())["x-request-id"] not in ("", first)
