"""TorchServe's gRPC APIs, called with stubs generated from TorchServe's OWN protos (taken
from the installed torchserve package), against the real server process; plus health
checking, reflection, token auth, and one batch shared by a REST and a gRPC request."""

from __future__ import annotations

import importlib
import json
import sys
import threading
import zipfile
from pathlib import Path

import grpc
import httpx
import pytest


from tests.gates import Gate, pending, wait_until
from tests.oip_archives import echo_archive, ids_archive, stream_archive

ts = pytest.importorskip("ts", reason="TorchServe's protos come from the torchserve package (test extra)")


@pytest.fixture(scope="module")
def ts_stubs(tmp_path_factory):
    """(inference_pb2, inference_pb2_grpc, management_pb2, management_pb2_grpc) from model-server.jar."""
    from grpc_tools import protoc

    jar = Path(ts.__file__).parent / "frontend" / "model-server.jar"
    if not jar.exists():
        pytest.skip("torchserve's model-server.jar is missing")
    root = tmp_path_factory.mktemp("ts-protos")
    src, out = root / "src", root / "out"
    out.mkdir()
    with zipfile.ZipFile(jar) as z:
        for name in z.namelist():
            if name.startswith(("proto/inference.proto", "proto/management.proto", "google/rpc/status.proto")):
                z.extract(name, src)
    include = Path(protoc.__file__).parent / "_proto"
    assert protoc.main(["protoc", f"-I{src / 'proto'}", f"-I{src}", f"-I{include}", f"--python_out={out}",
                        f"--grpc_python_out={out}", str(src / "proto" / "inference.proto"),
                        str(src / "proto" / "management.proto")]) == 0
    sys.path.insert(0, str(out))
    try:
        return tuple(importlib.import_module(m) for m in
                     ("inference_pb2", "inference_pb2_grpc", "management_pb2", "management_pb2_grpc"))
    finally:
        sys.path.remove(str(out))


@pytest.fixture(scope="module")
def server(osprey_module, tmp_path_factory):
    store = tmp_path_factory.mktemp("store")
    echo_archive(store)
    stream_archive(store)
    ids_archive(store, name="ids", config={"batchSize": 4, "maxBatchDelay": 50})
    echo_archive(store, name="echo2")
    return osprey_module(["echo=echo.mar", "streamer=streamer.mar", "ids=ids.mar"], store)


def _ids_ran(server) -> list[list]:
    return [json.loads(line) for p in server.workdir.glob("**/ids.log") for line in p.read_text().splitlines()]


def test_ping_predictions_and_errors(server, ts_stubs):
    inf_pb, inf_grpc, _, _ = ts_stubs
    from google.protobuf import empty_pb2

    with grpc.insecure_channel(server.grpc) as ch:
        stub = inf_grpc.InferenceAPIsServiceStub(ch)
        assert json.loads(stub.Ping(empty_pb2.Empty()).health) == {"status": "Healthy"}
        r = stub.Predictions(inf_pb.PredictionsRequest(model_name="echo", input={"body": b"hello"}))
        assert r.prediction == b"HELLO"
        r = stub.Predictions(inf_pb.PredictionsRequest(model_name="echo", model_version="1.0", input={"body": b"v"}))
        assert r.prediction == b"V"
        with pytest.raises(grpc.RpcError) as exc:  # the handler fails: TorchServe's 503 -> UNAVAILABLE
            stub.Predictions(inf_pb.PredictionsRequest(model_name="echo", input={"data": b"no body"}))
        assert exc.value.code() == grpc.StatusCode.UNAVAILABLE and exc.value.details() == "Prediction failed"
        with pytest.raises(grpc.RpcError) as exc:
            stub.Predictions(inf_pb.PredictionsRequest(model_name="nope", input={"body": b"x"}))
        assert exc.value.code() == grpc.StatusCode.NOT_FOUND and "nope" in exc.value.details()
        with pytest.raises(grpc.RpcError) as exc:
            stub.Predictions(inf_pb.PredictionsRequest(model_name="echo", model_version="9.9", input={"body": b"x"}))
        assert exc.value.code() == grpc.StatusCode.NOT_FOUND


def test_stream_predictions_with_torchserve_intermediate_responses(server, ts_stubs):
    inf_pb, inf_grpc, _, _ = ts_stubs
    with grpc.insecure_channel(server.grpc) as ch:
        stub = inf_grpc.InferenceAPIsServiceStub(ch)
        parts = [r.prediction for r in stub.StreamPredictions(
            inf_pb.PredictionsRequest(model_name="streamer", input={"body": b"abc"}))]
        assert parts == [b"part0:abc", b"part1:abc", b"part2:abc", b"done:abc"]
        # Over REST the same parts are the chunks of a chunked answer, then the final one (TorchServe 0.12)
        rest = httpx.post(server.inference + "/predictions/streamer", content=b"abc")
        assert rest.headers["transfer-encoding"] == "chunked" and rest.text == "part0:abcpart1:abcpart2:abcdone:abc"
        replies = list(stub.StreamPredictions2(iter([
            inf_pb.PredictionsRequest(model_name="echo", input={"body": b"one"}, sequence_id="s1"),
            inf_pb.PredictionsRequest(model_name="nope", input={"body": b"two"}, sequence_id="s1"),
            inf_pb.PredictionsRequest(model_name="echo", input={"body": b"three"}, sequence_id="s1"),
        ])))
        assert [r.prediction for r in replies] == [b"ONE", b"", b"THREE"]
        assert [r.sequence_id for r in replies] == ["s1"] * 3
        assert replies[1].status.code == grpc.StatusCode.NOT_FOUND.value[0] and "nope" in replies[1].status.message
        # a long stream: every request answered, in order, and the call ends OK (its request ids
        # are BASE-k from the initial metadata: nothing grows with the stream)
        call = stub.StreamPredictions2(
            inf_pb.PredictionsRequest(model_name="echo", input={"body": b"r%d" % i}) for i in range(600))
        assert [r.prediction for r in call] == [b"R%d" % i for i in range(600)]
        assert call.code() == grpc.StatusCode.OK and dict(call.initial_metadata())["x-request-id-base"]


def test_every_management_rpc(server, ts_stubs):
    _, _, m_pb, m_grpc = ts_stubs
    with grpc.insecure_channel(server.grpc_management) as ch:
        stub = m_grpc.ManagementAPIsServiceStub(ch)
        listed = json.loads(stub.ListModels(m_pb.ListModelsRequest(limit=2)).msg)
        assert listed == httpx.get(server.management + "/models?limit=2").json()
        assert listed["nextPageToken"] == "2"
        described = json.loads(stub.DescribeModel(m_pb.DescribeModelRequest(model_name="echo")).msg)
        assert described[0]["modelName"] == "echo" and described[0]["workers"][0]["status"] == "READY"
        # the status text itself, as TorchServe's ManagementImpl answers (describe and list: JSON)
        msg = stub.RegisterModel(m_pb.RegisterModelRequest(
            url="echo2.mar", model_name="echo2", initial_workers=1, batch_size=2, synchronous=True)).msg
        assert msg == 'Model "echo2" Version: 1.0 registered with 1 initial workers'
        with pytest.raises(grpc.RpcError) as exc:  # already registered: UNKNOWN, TorchServe 0.12's quirk (REST: 409)
            stub.RegisterModel(m_pb.RegisterModelRequest(url="echo2.mar", model_name="echo2", synchronous=True))
        assert exc.value.code() == grpc.StatusCode.UNKNOWN
        assert exc.value.details() == "Model version 1.0 is already registered for model echo2"
        msg = stub.ScaleWorker(m_pb.ScaleWorkerRequest(
            model_name="echo2", min_worker=2, max_worker=2, synchronous=True)).msg
        assert msg == "Workers scaled to 2 for model: echo2"
        msg = stub.ScaleWorker(m_pb.ScaleWorkerRequest(
            model_name="echo2", model_version="1.0", min_worker=2, max_worker=2, synchronous=True)).msg
        assert msg == "Workers scaled to 2 for model: echo2, version: 1.0"
        described = json.loads(stub.DescribeModel(m_pb.DescribeModelRequest(model_name="echo2")).msg)[0]
        assert described["batchSize"] == 2 and len(described["workers"]) == 2
        with pytest.raises(grpc.RpcError) as exc:
            stub.ScaleWorker(m_pb.ScaleWorkerRequest(model_name="echo2", min_worker=3, max_worker=1))
        assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        msg = stub.SetDefault(m_pb.SetDefaultRequest(model_name="echo2", model_version="1.0")).msg
        assert msg.startswith("Default version successfully updated")
        with pytest.raises(grpc.RpcError) as exc:
            stub.SetDefault(m_pb.SetDefaultRequest(model_name="echo2", model_version="7.0"))
        assert exc.value.code() == grpc.StatusCode.NOT_FOUND
        msg = stub.UnregisterModel(m_pb.UnregisterModelRequest(model_name="echo2")).msg
        assert msg == 'Model "echo2" unregistered'
        with pytest.raises(grpc.RpcError) as exc:
            stub.DescribeModel(m_pb.DescribeModelRequest(model_name="echo2"))
        assert exc.value.code() == grpc.StatusCode.NOT_FOUND


def test_reflection_lists_services_and_health_is_serving(server):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    with grpc.insecure_channel(server.grpc) as ch:
        services = set(ProtoReflectionDescriptorDatabase(ch).get_services())
        assert {"org.pytorch.serve.grpc.inference.InferenceAPIsService", "inference.GRPCInferenceService",
                "grpc.health.v1.Health"} <= services
        health = health_pb2_grpc.HealthStub(ch)
        for name in ("", "inference.GRPCInferenceService"):
            assert health.Check(health_pb2.HealthCheckRequest(service=name)).status == health_pb2.HealthCheckResponse.SERVING
    with grpc.insecure_channel(server.grpc_management) as ch:
        assert "org.pytorch.serve.grpc.management.ManagementAPIsService" in ProtoReflectionDescriptorDatabase(ch).get_services()


def test_rest_and_grpc_requests_share_one_forward_pass(server, ts_stubs, tmp_path):
    inf_pb, inf_grpc, _, _ = ts_stubs
    url = server.inference + "/predictions/ids"
    results = {}
    gate = Gate(tmp_path)
    blocker = threading.Thread(target=lambda: httpx.post(url, json={"id": "blocker", "gate": gate.value}, timeout=30))
    blocker.start()
    gate.wait_entered()  # the only instance is busy: what comes now queues up

    def rest():
        results["rest"] = httpx.post(url, json={"id": "rest"}, timeout=30).json()

    def grpc_call():
        with grpc.insecure_channel(server.grpc) as ch:
            r = inf_grpc.InferenceAPIsServiceStub(ch).Predictions(
                inf_pb.PredictionsRequest(model_name="ids", input={"body": json.dumps({"id": "grpc"}).encode()}))
            results["grpc"] = json.loads(r.prediction)

    threads = [threading.Thread(target=rest), threading.Thread(target=grpc_call)]
    for t in threads:
        t.start()
    wait_until(lambda: pending(server, "ids") == 2, what="the REST and the gRPC request queued")
    gate.open()
    for t in (blocker, *threads):
        t.join()
    assert results["rest"] == {"id": "rest", "batch": 2} and results["grpc"] == {"id": "grpc", "batch": 2}
    assert [sorted(b) for b in _ids_ran(server) if "rest" in b] == [["grpc", "rest"]]  # one forward pass


def test_token_auth_uses_the_inference_and_management_keys(osprey, store, ts_stubs):
    inf_pb, inf_grpc, m_pb, m_grpc = ts_stubs
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    echo_archive(store)
    server = osprey(["echo=echo.mar"], store=store, token_auth=True)
    keys = server.keys()

    def bearer(kind):
        return [("authorization", f"Bearer {keys[kind]['key']}")]

    with grpc.insecure_channel(server.grpc) as ch:
        stub = inf_grpc.InferenceAPIsServiceStub(ch)
        req = inf_pb.PredictionsRequest(model_name="echo", input={"body": b"k"})
        for metadata in (None, bearer("management"), [("authorization", "Bearer wrong")]):
            with pytest.raises(grpc.RpcError) as exc:
                stub.Predictions(req, metadata=metadata)
            assert exc.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as exc:  # streaming calls are checked too
            list(stub.StreamPredictions(req))
        assert exc.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert stub.Predictions(req, metadata=bearer("inference")).prediction == b"K"
        health = health_pb2_grpc.HealthStub(ch)  # probes need no token
        assert health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING
    with grpc.insecure_channel(server.grpc_management) as ch:
        stub = m_grpc.ManagementAPIsServiceStub(ch)
        with pytest.raises(grpc.RpcError) as exc:
            stub.ListModels(m_pb.ListModelsRequest(), metadata=bearer("inference"))
        assert exc.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert json.loads(stub.ListModels(m_pb.ListModelsRequest(), metadata=bearer("management")).msg)["models"]
