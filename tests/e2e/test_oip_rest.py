"""Open Inference Protocol over REST, checked with tritonclient.http (binary and JSON), the
KServe SDK and plain HTTP against the real server process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

tritonhttp = pytest.importorskip("tritonclient.http")
from tritonclient.utils import InferenceServerException  # noqa: E402

from tests.conftest import ROOT  # noqa: E402
from tests.gates import Gate  # noqa: E402
from tests.oip_archives import ECHO_HANDLER, echo_archive, ids_archive, ops_archive, tensor_mlp_archive  # noqa: E402


@pytest.fixture(scope="module")
def server(osprey_module, tmp_path_factory):
    """One server for the module (starting one per test would dominate the run time)."""
    store = tmp_path_factory.mktemp("store")
    tensor_mlp_archive(store)
    ops_archive(store)
    echo_archive(store)
    ids_archive(store, config={"batchSize": 1})
    return osprey_module(["tmlp=tmlp.mar", "ops=ops.mar", "echo=echo.mar", "ids=ids.mar"], store)


@pytest.fixture(scope="module")
def client(server):
    c = tritonhttp.InferenceServerClient(server.inference.removeprefix("http://"))
    yield c
    c.close()


def _direct_mlp(server_store: Path, x: np.ndarray) -> np.ndarray:
    model = torch.jit.load(str(server_store.parent / "build-tmlp" / "mlp.pt"))
    with torch.inference_mode():
        return model(torch.from_numpy(x)).numpy()


def test_health_and_server_metadata(client, server):
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("tmlp") and not client.is_model_ready("nope")
    meta = client.get_server_metadata()
    assert meta["name"] == "osprey" and "binary_tensor_data" in meta["extensions"]
    r = httpx.get(server.inference + "/v2/health/live")
    assert r.status_code == 200 and r.json() == {"live": True}
    assert httpx.get(server.inference + "/v2/health/ready").json() == {"ready": True}
    assert httpx.get(server.inference + "/v2/models/tmlp/versions/1.0/ready").json() == {"name": "tmlp", "ready": True}


def test_model_metadata_from_model_config_and_for_a_bytes_handler(client):
    meta = client.get_model_metadata("tmlp")
    assert meta["name"] == "tmlp" and meta["versions"] == ["1.0"]
    assert meta["inputs"] == [{"name": "INPUT0", "datatype": "FP32", "shape": [-1, 16]}]
    assert meta["outputs"] == [{"name": "OUTPUT0", "datatype": "FP32", "shape": [-1, 4]}]
    meta = client.get_model_metadata("echo")
    assert meta["inputs"][0]["datatype"] == "BYTES" and meta["outputs"][0]["datatype"] == "BYTES"


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_fp32_infer_equals_the_model_called_directly(client, server, binary):
    x = np.random.default_rng(0).standard_normal((3, 16)).astype(np.float32)
    inp = tritonhttp.InferInput("INPUT0", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=binary)
    out = tritonhttp.InferRequestedOutput("OUTPUT0", binary_data=binary)
    result = client.infer("tmlp", [inp], outputs=[out], request_id="r-1")
    got = result.as_numpy("OUTPUT0")
    assert got.dtype == np.float32 and got.shape == (3, 4)
    np.testing.assert_allclose(got, _direct_mlp(server.store, x), rtol=1e-5, atol=1e-6)
    assert result.get_response()["id"] == "r-1" and result.get_response()["model_version"] == "1.0"


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_int64_and_fp16_inputs_equal_the_model_called_directly(client, server, binary):
    rng = np.random.default_rng(1)
    a = rng.standard_normal((2, 3)).astype(np.float32)
    b = rng.integers(-1000, 1000, (2, 3)).astype(np.int64)
    c = rng.standard_normal((2, 3)).astype(np.float16)
    inputs = []
    for name, arr, dt in (("A", a, "FP32"), ("B", b, "INT64"), ("C", c, "FP16")):
        i = tritonhttp.InferInput(name, list(arr.shape), dt)
        i.set_data_from_numpy(arr, binary_data=binary or dt == "FP16")
        inputs.append(i)
    outputs = [tritonhttp.InferRequestedOutput(n, binary_data=binary or n == "C2") for n in ("A2", "B2", "C2")]
    result = client.infer("ops", inputs, outputs=outputs)
    model = torch.jit.load(str(server.store.parent / "build-ops" / "ops.pt"))
    want = [t.numpy() for t in model(torch.from_numpy(a), torch.from_numpy(b), torch.from_numpy(c))]
    for name, expected in zip(("A2", "B2", "C2"), want):
        got = result.as_numpy(name)
        assert got.dtype == expected.dtype, name
        np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_bytes_input_reaches_a_bytes_handler_as_its_body(client, binary):
    ns: dict = {}
    exec(ECHO_HANDLER, ns)  # the handler called directly
    text = np.array([b"hello osprey"], dtype=object)
    inp = tritonhttp.InferInput("text", [1], "BYTES")
    inp.set_data_from_numpy(text, binary_data=binary)
    result = client.infer("echo", [inp], outputs=[tritonhttp.InferRequestedOutput("output", binary_data=binary)])
    got = result.as_numpy("output")
    want = ns["handle"]([{"body": bytearray(b"hello osprey")}], None)
    assert [bytes(v) if not isinstance(v, str) else v.encode() for v in got.ravel()] == want


def test_unknown_model_and_bad_input_errors(client, server):
    inp = tritonhttp.InferInput("INPUT0", [1, 16], "FP32")
    inp.set_data_from_numpy(np.zeros((1, 16), np.float32))
    with pytest.raises(InferenceServerException, match="Model not found: nope"):
        client.infer("nope", [inp])
    with pytest.raises(InferenceServerException):
        client.get_model_metadata("nope")
    r = httpx.get(server.inference + "/v2/models/nope")
    assert r.status_code == 404 and r.json() == {"error": "Model not found: nope"}
    r = httpx.get(server.inference + "/v2/no/such/path")
    assert r.status_code == 404 and set(r.json()) == {"error"}
    r = httpx.delete(server.inference + "/v2/models/tmlp/infer")
    assert r.status_code == 405 and set(r.json()) == {"error"}
    bad = {"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [2, 16], "data": [0.0] * 16}]}
    r = httpx.post(server.inference + "/v2/models/tmlp/infer", json=bad)
    assert r.status_code == 400 and "INPUT0" in r.json()["error"]
    r = httpx.post(server.inference + "/v2/models/tmlp/infer", content=b"{nope")
    assert r.status_code == 400 and "JSON" in r.json()["error"]


def test_body_without_json_header_is_the_single_input(server):
    x = np.arange(32, dtype=np.float32).reshape(2, 16)
    r = httpx.post(server.inference + "/v2/models/tmlp/infer", content=x.tobytes(),
                   headers={"Inference-Header-Content-Length": "0"})
    assert r.status_code == 200, r.text
    out = r.json()["outputs"][0]
    assert out["name"] == "OUTPUT0" and out["shape"] == [2, 4]
    np.testing.assert_allclose(np.array(out["data"], np.float32).reshape(2, 4),
                               _direct_mlp(server.store, x), rtol=1e-5, atol=1e-6)


def test_timeout_parameter_expires_a_queued_request_which_never_runs(server, tmp_path):
    url = server.inference + "/v2/models/ids/infer"

    gate = Gate(tmp_path)

    def body(id_, gate=None, **params):
        text = json.dumps({"id": id_} | ({"gate": gate.value} if gate else {})).encode()
        return {"parameters": params, "inputs": [{"name": "body", "datatype": "BYTES", "shape": [1],
                                                  "data": [text.decode()]}]}

    blocker = threading.Thread(target=lambda: httpx.post(url, json=body("blocker", gate), timeout=30))
    blocker.start()
    gate.wait_entered()  # the blocker occupies the only instance until the gate opens
    r = httpx.post(url, json=body("late", timeout=100_000), timeout=30)  # 100 ms, in microseconds
    gate.open()
    blocker.join()
    assert r.status_code == 504 and "deadline" in r.json()["error"]
    assert httpx.post(url, json=body("after"), timeout=10).status_code == 200
    log = server.workdir.glob("**/ids.log")
    batches = [json.loads(line) for p in log for line in p.read_text().splitlines()]
    ran = [i for b in batches for i in b]
    assert "blocker" in ran and "after" in ran and "late" not in ran


def test_repository_index_load_and_unload(client, server):
    index = {m["name"]: m for m in client.get_model_repository_index()}
    assert index["tmlp"]["state"] == "READY"
    client.unload_model("echo")
    assert not client.is_model_ready("echo")
    assert {m["name"]: m["state"] for m in client.get_model_repository_index()}["echo"] == "UNAVAILABLE"
    client.load_model("echo")
    assert client.is_model_ready("echo")
    with pytest.raises(InferenceServerException, match="no archive"):
        client.load_model("missing")


def test_repository_index_lists_every_version_and_not_their_files_again(client, server, tmp_path):
    """Two versions of a model, the second from a file of another name: two entries for the
    model, one per version, and the file is not listed as a model of its own."""
    (tensor_mlp_archive(tmp_path, version="2.0")).rename(server.store / "tmlp_second.mar")
    r = httpx.post(f"{server.management}/models", params={"url": "tmlp_second.mar"}, timeout=120)
    assert r.status_code == 200, r.text
    try:
        index = client.get_model_repository_index()
        assert [(m["name"], m.get("version"), m["state"]) for m in index if m["name"].startswith("tmlp")] == [
            ("tmlp", "1.0", "READY"), ("tmlp", "2.0", "READY")], index
    finally:
        assert httpx.delete(f"{server.management}/models/tmlp/2.0", timeout=60).status_code == 200
        (server.store / "tmlp_second.mar").unlink()


KSERVE_SCRIPT = """
import asyncio, json, sys
import numpy as np
from kserve import InferenceRESTClient, InferInput, InferRequest, RESTConfig

async def main(url):
    client = InferenceRESTClient(RESTConfig(protocol="v2"))
    x = np.arange(16, dtype=np.float32).reshape(1, 16)
    inp = InferInput(name="INPUT0", shape=[1, 16], datatype="FP32")
    inp.set_data_from_numpy(x, binary_data=False)
    res = await client.infer(url, InferRequest(model_name="tmlp", infer_inputs=[inp]), model_name="tmlp")
    live = await client.is_server_live(url)
    ready = await client.is_model_ready(url, "tmlp")
    out = res.outputs[0]
    print(json.dumps({"live": live, "ready": ready, "name": out.name, "data": out.as_numpy().tolist()}))
    await client.close()

asyncio.run(main(sys.argv[1]))
"""


def _kserve_python() -> str | None:
    for candidate in (os.environ.get("OSPREY_KSERVE_PYTHON"), str(ROOT / ".venv-kserve" / "bin" / "python")):
        if candidate and Path(candidate).exists():
            return candidate
    try:
        import kserve  # noqa: F401
        return sys.executable
    except ImportError:
        return None


def test_kserve_sdk_rest_client_infers(server):
    python = _kserve_python()
    if python is None:
        pytest.skip("the KServe SDK is not installed (pip install kserve, or set OSPREY_KSERVE_PYTHON)")
    run = subprocess.run([python, "-c", KSERVE_SCRIPT, server.inference], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    assert got["live"] and got["ready"] and got["name"] == "OUTPUT0"
    x = np.arange(16, dtype=np.float32).reshape(1, 16)
    np.testing.assert_allclose(got["data"], _direct_mlp(server.store, x), rtol=1e-5, atol=1e-6)


def test_tensor_handler_also_answers_torchserve_rest(server):
    """The built-in ``tensor`` handler takes a plain JSON body too (one example -> its row)."""
    x = np.linspace(-1, 1, 16, dtype=np.float32)
    r = httpx.post(server.inference + "/predictions/tmlp", json=x.tolist())
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(r.json(), _direct_mlp(server.store, x[None])[0], rtol=1e-5, atol=1e-6)
    r = httpx.post(server.inference + "/predictions/tmlp", json=[1.0, 2.0])
    assert r.status_code == 400 and "INPUT0" in r.json()["message"]
