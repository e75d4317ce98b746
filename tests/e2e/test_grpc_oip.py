"""The Open Inference Protocol over gRPC, checked with tritonclient.grpc (as a user would use
it) against the real server process: health, metadata, infer, streaming, errors, deadlines
and cancellation."""

from __future__ import annotations

import json
import queue
import threading

import grpc
import numpy as np
import pytest
import torch

tritongrpc = pytest.importorskip("tritonclient.grpc")
from tritonclient.grpc import service_pb2, service_pb2_grpc  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402


from tests.gates import Gate, pending, wait_until  # noqa: E402
from tests.oip_archives import ECHO_HANDLER, echo_archive, ids_archive, ops_archive, stream_archive, tensor_mlp_archive  # noqa: E402


@pytest.fixture(scope="module")
def server(osprey_module, tmp_path_factory):
    store = tmp_path_factory.mktemp("store")
    tensor_mlp_archive(store)
    ops_archive(store)
    echo_archive(store)
    ids_archive(store, config={"batchSize": 1})
    stream_archive(store)
    return osprey_module(["tmlp=tmlp.mar", "ops=ops.mar", "echo=echo.mar", "ids=ids.mar",
                          "streamer=streamer.mar"], store)


@pytest.fixture(scope="module")
def client(server):
    c = tritongrpc.InferenceServerClient(server.grpc)
    yield c
    c.close()


def _store(server):
    return server.store


def _ran(server) -> list:
    return [i for p in server.workdir.glob("**/ids.log") for line in p.read_text().splitlines() for i in json.loads(line)]


def _ids_input(id_: str, sleep: float = 0.0, gate: Gate | None = None):
    body = {"id": id_, "sleep": sleep} | ({"gate": gate.value} if gate else {})
    inp = tritongrpc.InferInput("body", [1], "BYTES")
    inp.set_data_from_numpy(np.array([json.dumps(body).encode()], dtype=object))
    return inp


def test_health_and_metadata(client):
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("tmlp")
    meta = client.get_server_metadata(as_json=True)
    assert meta["name"] == "osprey" and "binary_tensor_data" in meta["extensions"]
    meta = client.get_model_metadata("ops", as_json=True)
    assert [i["name"] for i in meta["inputs"]] == ["A", "B", "C"]
    assert [(o["datatype"], o["shape"]) for o in meta["outputs"]] == [("FP32", ["-1", "3"]), ("INT64", ["-1", "3"]),
                                                                      ("FP16", ["-1", "3"])]


def test_fp32_infer_equals_the_model_called_directly(client, server):
    x = np.random.default_rng(2).standard_normal((5, 16)).astype(np.float32)
    inp = tritongrpc.InferInput("INPUT0", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    result = client.infer("tmlp", [inp], request_id="g-1")
    model = torch.jit.load(str(_store(server).parent / "build-tmlp" / "mlp.pt"))
    with torch.inference_mode():
        want = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(result.as_numpy("OUTPUT0"), want, rtol=1e-5, atol=1e-6)
    assert result.get_response().id == "g-1"


def test_int64_fp16_infer_equals_the_model_called_directly(client, server):
    rng = np.random.default_rng(3)
    a = rng.standard_normal((4, 3)).astype(np.float32)
    b = rng.integers(-(2**40), 2**40, (4, 3)).astype(np.int64)
    c = rng.standard_normal((4, 3)).astype(np.float16)
    inputs = []
    for name, arr, dt in (("A", a, "FP32"), ("B", b, "INT64"), ("C", c, "FP16")):
        i = tritongrpc.InferInput(name, list(arr.shape), dt)
        i.set_data_from_numpy(arr)
        inputs.append(i)
    result = client.infer("ops", inputs, outputs=[tritongrpc.InferRequestedOutput("C2"),
                                                  tritongrpc.InferRequestedOutput("B2")])
    model = torch.jit.load(str(_store(server).parent / "build-ops" / "ops.pt"))
    _, b2, c2 = model(torch.from_numpy(a), torch.from_numpy(b), torch.from_numpy(c))
    assert [o.name for o in result.get_response().outputs] == ["C2", "B2"]  # as requested
    np.testing.assert_array_equal(result.as_numpy("B2"), b2.numpy())
    got = result.as_numpy("C2")
    assert got.dtype == np.float16
    np.testing.assert_array_equal(got, c2.numpy())


def test_bytes_input_to_a_bytes_handler(client):
    ns: dict = {}
    exec(ECHO_HANDLER, ns)
    inp = tritongrpc.InferInput("text", [1], "BYTES")
    inp.set_data_from_numpy(np.array([b"grpc bytes"], dtype=object))
    got = client.infer("echo", [inp]).as_numpy("output")
    assert list(got.ravel()) == ns["handle"]([{"body": bytearray(b"grpc bytes")}], None)


def test_typed_contents_instead_of_raw(server):
    """KServe-style clients may send InferTensorContents rather than raw bytes."""
    with grpc.insecure_channel(server.grpc) as ch:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(ch)
        req = service_pb2.ModelInferRequest(model_name="tmlp", id="typed")
        req.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 16]).contents.fp32_contents.extend(range(16))
        resp = stub.ModelInfer(req)
        out = np.frombuffer(resp.raw_output_contents[0], "<f4").reshape(list(resp.outputs[0].shape))
        model = torch.jit.load(str(_store(server).parent / "build-tmlp" / "mlp.pt"))
        with torch.inference_mode():
            want = model(torch.arange(16, dtype=torch.float32)[None]).numpy()
        np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6)
        assert resp.id == "typed" and resp.model_name == "tmlp"

        req = service_pb2.ModelInferRequest(model_name="ops")
        req.inputs.add(name="A", datatype="FP32", shape=[1, 3]).contents.fp32_contents.extend([1, 2, 3])
        req.inputs.add(name="B", datatype="INT64", shape=[1, 3]).contents.int64_contents.extend([1, 2, 3])
        req.inputs.add(name="C", datatype="FP16", shape=[1, 3])
        with pytest.raises(grpc.RpcError) as exc:  # FP16 has no typed contents field
            stub.ModelInfer(req)
        assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "'C'" in exc.value.details()
        del req.inputs[2]
        req.inputs.add(name="C", datatype="FP32", shape=[1, 3]).contents.fp32_contents.extend([0, 0, 0])
        with pytest.raises(grpc.RpcError) as exc:  # not the declared datatype: a 400 naming the input
            stub.ModelInfer(req)
        assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "'C'" in exc.value.details()
        assert "FP16" in exc.value.details()


def test_unknown_model_is_not_found(client, server):
    inp = tritongrpc.InferInput("INPUT0", [1, 16], "FP32")
    inp.set_data_from_numpy(np.zeros((1, 16), np.float32))
    with pytest.raises(InferenceServerException) as exc:
        client.infer("nope", [inp])
    assert exc.value.status() == "StatusCode.NOT_FOUND"
    with pytest.raises(InferenceServerException) as exc:
        client.get_model_metadata("nope")
    assert exc.value.status() == "StatusCode.NOT_FOUND"
    bad = tritongrpc.InferInput("INPUT0", [2, 16], "FP32")
    bad._raw_content = np.zeros(16, np.float32).tobytes()  # shape says 32 values, data holds 16
    bad._input.ClearField("contents")
    with pytest.raises(InferenceServerException) as exc:
        client.infer("tmlp", [bad])
    assert exc.value.status() == "StatusCode.INVALID_ARGUMENT" and "INPUT0" in exc.value.message()


def test_streaming_infer(client, server):
    results: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    try:
        xs = [np.full((1, 16), i, np.float32) for i in range(4)]
        for i, x in enumerate(xs):
            inp = tritongrpc.InferInput("INPUT0", [1, 16], "FP32")
            inp.set_data_from_numpy(x)
            client.async_stream_infer("tmlp", [inp], request_id=f"s-{i}")
        bad = tritongrpc.InferInput("INPUT0", [1, 16], "FP32")
        bad.set_data_from_numpy(xs[0])
        client.async_stream_infer("nope", [bad], request_id="s-bad")
        got, errors = {}, []
        for _ in range(5):
            result, error = results.get(timeout=10)
            if error is not None:
                errors.append(error)
            else:
                got[result.get_response().id] = result.as_numpy("OUTPUT0")
    finally:
        client.stop_stream()
    model = torch.jit.load(str(_store(server).parent / "build-tmlp" / "mlp.pt"))
    with torch.inference_mode():
        for i, x in enumerate(xs):
            np.testing.assert_allclose(got[f"s-{i}"], model(torch.from_numpy(x)).numpy(), rtol=1e-5, atol=1e-6)
    assert len(errors) == 1 and "nope" in str(errors[0])


def test_stream_carries_intermediate_responses_of_a_decoupled_handler(client):
    results: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    try:
        inp = tritongrpc.InferInput("text", [1], "BYTES")
        inp.set_data_from_numpy(np.array([b"xyz"], dtype=object))
        client.async_stream_infer("streamer", [inp], request_id="d-1")
        got = []
        for _ in range(4):
            result, error = results.get(timeout=10)
            assert error is None, error
            got.append(result.as_numpy("output").ravel()[0])
    finally:
        client.stop_stream()
    assert got == [b"part0:xyz", b"part1:xyz", b"part2:xyz", b"done:xyz"]


def test_deadline_and_queue_timeout(client, server, tmp_path):
    gate = Gate(tmp_path)
    blocker = threading.Thread(target=lambda: client.infer("ids", [_ids_input("g-blocker", gate=gate)]))
    blocker.start()
    gate.wait_entered()  # the only instance is busy until the gate opens
    with pytest.raises(InferenceServerException) as exc:  # server-side queue timeout (microseconds)
        client.infer("ids", [_ids_input("g-timeout")], timeout=100_000)
    assert exc.value.status() == "StatusCode.DEADLINE_EXCEEDED"
    with pytest.raises(InferenceServerException) as exc:  # the gRPC deadline
        client.infer("ids", [_ids_input("g-deadline")], client_timeout=0.2)
    assert "DEADLINE" in str(exc.value.status())
    wait_until(lambda: pending(server, "ids") == 0, what="the expired calls to leave the queue")
    gate.open()
    blocker.join()
    client.infer("ids", [_ids_input("g-after")])
    ran = _ran(server)
    assert "g-blocker" in ran and "g-after" in ran
    assert "g-timeout" not in ran and "g-deadline" not in ran


def test_cancelled_call_is_taken_out_of_the_queue(client, server, tmp_path):
    gate = Gate(tmp_path)
    blocker = threading.Thread(target=lambda: client.infer("ids", [_ids_input("c-blocker", gate=gate)]))
    blocker.start()
    gate.wait_entered()
    future = client.async_infer("ids", [_ids_input("c-cancelled")], callback=lambda r, e: None)
    wait_until(lambda: pending(server, "ids") == 1, what="the call to be queued")
    future.cancel()
    wait_until(lambda: pending(server, "ids") == 0, what="the cancelled call to leave the queue")
    gate.open()
    blocker.join()
    client.infer("ids", [_ids_input("c-after")])
    ran = _ran(server)
    assert "c-blocker" in ran and "c-after" in ran and "c-cancelled" not in ran
