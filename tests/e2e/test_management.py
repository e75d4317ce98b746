"""The TorchServe management API and token auth, against the real server process."""

from __future__ import annotations

import json
import zipfile

import grpc
import httpx
import pytest

from server.protocols.grpc.generated import management_pb2 as mpb
from server.protocols.grpc.generated import management_pb2_grpc as mpb_grpc
from tests.models import handler_archive, mlp_archive

ROW = [float(i) for i in range(16)]


@pytest.fixture(scope="module")
def srv(osprey_module, tmp_path_factory):
    store = tmp_path_factory.mktemp("store")
    mlp_archive(store, "m1", config={"batchSize": 4, "maxBatchDelay": 5})
    for name in ("a", "b", "c", "d", "e"):
        mlp_archive(store, name)
    mlp_archive(store, "ver", version="1.0")
    (store / "ver.mar").rename(store / "ver1.mar")
    mlp_archive(store, "ver", version="2.0")
    (store / "ver.mar").rename(store / "ver2.mar")
    (store / "corrupt.mar").write_bytes(b"PK\x03\x04 definitely not a zip")
    with zipfile.ZipFile(store / "slip.mar", "w") as zf:
        zf.writestr("MAR-INF/MANIFEST.json", '{"model": {"modelName": "slip", "handler": "h.py"}}')
        zf.writestr("../../escape.py", "print('owned')")
    with zipfile.ZipFile(store / "nomanifest.mar", "w") as zf:
        zf.writestr("h.py", "")
    handler_archive(store, "initfails", "def handle(data, context):\n    raise RuntimeError('weights file is corrupt')\n")
    handler_archive(store, "slowload", "import time\ndef handle(data, context):\n    if data is None:\n"
                    "        time.sleep(4)\n        return None\n    return [1 for _ in data]\n",
                    config={"startupTimeout": 1})
    server = osprey_module(["m1=m1.mar"], store)
    server.store = store
    return server


def test_register_describe_predict_unregister(srv):
    m = srv.management
    r = httpx.post(f"{m}/models", params={"url": "a.mar", "batch_size": 8, "max_batch_delay": 10, "initial_workers": 2})
    assert r.status_code == 200
    assert r.json() == {"status": 'Model "a" Version: 1.0 registered with 2 initial workers'}
    d = httpx.get(f"{m}/models/a").json()
    assert isinstance(d, list) and len(d) == 1
    d = d[0]
    assert (d["modelName"], d["modelVersion"], d["modelUrl"], d["batchSize"], d["maxBatchDelay"]) == ("a", "1.0", "a.mar", 8, 10)
    assert d["minWorkers"] == 2 and len(d["workers"]) == 2 and all(w["status"] == "READY" for w in d["workers"])
    assert d["jobQueueStatus"] == {"remainingCapacity": 100, "pendingRequests": 0}
    assert httpx.post(f"{srv.inference}/predictions/a", json=ROW).status_code == 200
    r = httpx.post(f"{m}/models", params={"url": "a.mar"})
    assert r.status_code == 409 and r.json()["type"] == "ConflictStatusException"
    r = httpx.delete(f"{m}/models/a")
    assert r.status_code == 200 and r.json() == {"status": 'Model "a" unregistered'}
    assert httpx.post(f"{srv.inference}/predictions/a", json=ROW).status_code == 404


def test_register_with_json_body_and_async(srv):
    r = httpx.post(f"{srv.management}/models", json={"url": "b.mar", "model_name": "bee", "synchronous": False})
    assert r.status_code == 202 and r.json() == {"status": "Processing worker updates..."}
    for _ in range(100):
        if httpx.post(f"{srv.inference}/predictions/bee", json=ROW).status_code == 200:
            break
        import time; time.sleep(0.1)
    else:
        pytest.fail("asynchronously registered model never answered")


def test_handler_that_fails_to_initialize_is_refused_with_its_error(srv):
    r = httpx.post(f"{srv.management}/models", params={"url": "initfails.mar"})
    assert r.status_code == 400 and "weights file is corrupt" in r.json()["message"]
    assert httpx.get(f"{srv.management}/models/initfails").status_code == 404
    r = httpx.post(f"{srv.management}/models", params={"url": "initfails.mar", "synchronous": "false"})
    assert r.status_code == 202
    import time
    for _ in range(100):  # the background load fails and the model is taken out again
        if httpx.get(f"{srv.management}/models/initfails").status_code == 404:
            break
        time.sleep(0.1)
    else:
        pytest.fail("a model whose load failed stayed registered")


@pytest.mark.parametrize("url, status, words", [
    ("", 404, "empty url"),  # TorchServe's answer to url= given empty (no url at all: 400, below)
    ("missing.mar", 404, "Model not found at: missing.mar"),
    ("corrupt.mar", 400, "corrupt.mar"),
    ("slip.mar", 400, "escape"),
    ("nomanifest.mar", 400, "MANIFEST"),
    ("../../etc/passwd", 404, "Relative path is not allowed in url: ../../etc/passwd"),  # TorchServe's words
    ("/etc/passwd", 404, "Model not found at: /etc/passwd"),
    ("https://example.com/x.mar", 400, "not supported"),
])
def test_bad_registrations_are_refused_clearly_and_disturb_nothing(srv, url, status, words):
    r = httpx.post(f"{srv.management}/models", params={"url": url})
    assert r.status_code == status, r.text
    assert words in r.json()["message"]
    assert not (srv.store.parent / "escape.py").exists()
    assert httpx.post(f"{srv.inference}/predictions/m1", json=ROW).status_code == 200


def test_register_without_url_is_400(srv):
    r = httpx.post(f"{srv.management}/models", params={"model_name": "x"})
    assert r.status_code == 400 and r.json()["message"] == "Parameter url is required."


def test_list_is_paginated(srv):
    for name in ("c", "d", "e"):
        assert httpx.post(f"{srv.management}/models", params={"url": f"{name}.mar"}).status_code == 200
    names = []
    token = 0
    while True:
        page = httpx.get(f"{srv.management}/models", params={"limit": 2, "next_page_token": token}).json()
        names += [m["modelName"] for m in page["models"]]
        assert all(set(m) == {"modelName", "modelUrl"} for m in page["models"])
        if "nextPageToken" not in page:
            break
        token = int(page["nextPageToken"])
    assert names == sorted(names) and {"c", "d", "e", "m1"} <= set(names)


def test_scale_workers(srv):
    m = srv.management
    r = httpx.put(f"{m}/models/m1", params={"min_worker": 3, "synchronous": "true"})
    assert r.status_code == 200 and r.json() == {"status": "Workers scaled to 3 for model: m1"}
    assert len(httpx.get(f"{m}/models/m1").json()[0]["workers"]) == 3
    r = httpx.put(f"{m}/models/m1", params={"min_worker": 1})
    assert r.status_code == 202
    r = httpx.put(f"{m}/models/m1", params={"min_worker": 3, "max_worker": 2})
    assert r.status_code == 400 and "max_worker" in r.json()["message"]
    assert httpx.put(f"{m}/models/nope", params={"min_worker": 1}).status_code == 404
    assert httpx.post(f"{srv.inference}/predictions/m1", json=ROW).status_code == 200


def test_versions_default_and_set_default(srv):
    m = srv.management
    assert httpx.post(f"{m}/models", params={"url": "ver1.mar"}).status_code == 200
    assert httpx.post(f"{m}/models", params={"url": "ver2.mar"}).status_code == 200
    allv = httpx.get(f"{m}/models/ver/all").json()
    assert [d["modelVersion"] for d in allv] == ["1.0", "2.0"]
    assert httpx.post(f"{srv.inference}/predictions/ver/2.0", json=ROW).status_code == 200
    r = httpx.delete(f"{m}/models/ver/1.0")
    assert r.status_code == 403 and r.json()["message"] == "Cannot remove default version for model ver"
    r = httpx.put(f"{m}/models/ver/2.0/set-default")
    assert r.status_code == 200
    assert r.json() == {"status": 'Default version successfully updated for model "ver" to "2.0"'}
    r = httpx.put(f"{m}/models/ver/7.0/set-default")
    assert r.status_code == 404 and r.json()["type"] == "ModelVersionNotFoundException"
    assert httpx.delete(f"{m}/models/ver/1.0").status_code == 200
    assert httpx.get(f"{m}/models/ver").json()[0]["modelVersion"] == "2.0"


def test_model_api_is_off_by_default(osprey, store):
    """Off, register and unregister answer as TorchServe 0.12 answers (recorded): REST 405 with
    its fixed body, gRPC PERMISSION_DENIED "Model API disabled" (before the model is looked up);
    describing, scaling and the default version stay on."""
    noop = "def handle(data, context):\n    return None if data is None else [1 for _ in data]\n"
    handler_archive(store, "mlp", noop)  # no torch in the worker: a cheap start
    handler_archive(store, "other", noop)
    srv = osprey(["mlp=mlp.mar"], store, model_api=False)
    ts_405 = {"code": 405, "type": "MethodNotAllowedException",
              "message": "Requested method is not allowed, please refer to API document."}
    r = httpx.post(f"{srv.management}/models", params={"url": "other.mar"})
    assert (r.status_code, r.json()) == (405, ts_405)
    r = httpx.delete(f"{srv.management}/models/mlp")
    assert (r.status_code, r.json()) == (405, ts_405)
    # TorchServe's body cannot say how to turn it on: the log does, once
    assert srv.log().count("model was refused: Model API disabled: start the server with "
                           "--enable-model-api") == 1, srv.log()[-2000:]
    assert httpx.get(f"{srv.management}/models").status_code == 200
    assert httpx.put(f"{srv.management}/models/mlp", params={"min_worker": 1}).status_code == 202
    with grpc.insecure_channel(srv.grpc_management) as channel:
        stub = mpb_grpc.ManagementAPIsServiceStub(channel)
        for call, request in [(stub.RegisterModel, mpb.RegisterModelRequest(url="other.mar")),
                              (stub.UnregisterModel, mpb.UnregisterModelRequest(model_name="mlp")),
                              (stub.UnregisterModel, mpb.UnregisterModelRequest(model_name="zz"))]:
            with pytest.raises(grpc.RpcError) as info:
                call(request, timeout=30)
            assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert info.value.details().startswith("Model API disabled")
        described = json.loads(stub.DescribeModel(mpb.DescribeModelRequest(model_name="mlp"), timeout=30).msg)
        assert described[0]["modelName"] == "mlp"
        assert stub.ScaleWorker(mpb.ScaleWorkerRequest(model_name="mlp", min_worker=1), timeout=30).msg
        assert "Default version successfully updated" in stub.SetDefault(
            mpb.SetDefaultRequest(model_name="mlp", model_version="1.0"), timeout=30).msg


def test_token_auth(osprey, store):
    mlp_archive(store)
    srv = osprey(["mlp=mlp.mar"], store, token_auth=True)
    keys = srv.keys()
    assert set(keys) == {"management", "inference", "API"}
    inf = {"Authorization": f"Bearer {keys['inference']['key']}"}
    mgmt = {"Authorization": f"Bearer {keys['management']['key']}"}
    r = httpx.post(f"{srv.inference}/predictions/mlp", json=ROW)
    assert r.status_code == 401 and r.json()["type"] == "InvalidKeyException"
    assert httpx.post(f"{srv.inference}/predictions/mlp", json=ROW, headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert httpx.post(f"{srv.inference}/predictions/mlp", json=ROW, headers=mgmt).status_code == 401
    assert httpx.post(f"{srv.inference}/predictions/mlp", json=ROW, headers=inf).status_code == 200
    assert httpx.get(f"{srv.management}/models").status_code == 401
    assert httpx.get(f"{srv.management}/models", headers=mgmt).status_code == 200
    assert httpx.get(f"{srv.metrics}/metrics").status_code == 200  # metrics need no key
    assert httpx.get(f"{srv.inference}/v2/health/ready").json() == {"ready": True}  # nor probes
    assert httpx.get(f"{srv.inference}/ping").status_code == 401  # TorchServe's ping does
    # the token before the route, as TorchServe: unknown paths and methods are a token failure too
    assert httpx.post(f"{srv.management}/workflows", params={"url": "x.war"}).status_code == 401
    assert httpx.post(f"{srv.inference}/wfpredict/x").status_code == 401
    assert httpx.delete(f"{srv.management}/models").status_code == 401
    r = httpx.post(f"{srv.management}/workflows", headers=mgmt)  # past the token: the route's own answer
    assert (r.status_code, r.json()["message"]) == (400, "Parameter url is required.")
    assert httpx.delete(f"{srv.management}/models", headers=mgmt).status_code == 405
    assert httpx.get(f"{srv.inference}/v2/models/mlp").status_code == 401
    # the API key rotates the inference key
    r = httpx.post(f"{srv.management}/token", params={"type": "inference"},
                   headers={"Authorization": f"Bearer {keys['API']['key']}"})
    assert r.status_code == 200
    new = srv.keys()["inference"]["key"]
    assert new != keys["inference"]["key"]
    assert httpx.post(f"{srv.inference}/predictions/mlp", json=ROW, headers=inf).status_code == 401
    assert httpx.post(f"{srv.inference}/predictions/mlp", json=ROW,
                      headers={"Authorization": f"Bearer {new}"}).status_code == 200


def test_token_failure_status_can_match_torchserve(osprey, store):
    srv = osprey([], store, token_auth=True, env={"OSPREY_TOKEN_AUTH_STATUS": "400"})
    assert httpx.get(f"{srv.inference}/ping").status_code == 400


def test_a_model_slower_to_load_than_its_startup_timeout_is_refused_and_others_still_serve(srv):
    r = httpx.post(f"{srv.management}/models", params={"url": "slowload.mar"}, timeout=30)
    assert r.status_code == 503, r.text
    assert "did not load within 1 s (startupTimeout)" in r.json()["message"]
    assert httpx.post(f"{srv.inference}/predictions/m1", json=[1.0] * 16, timeout=30).status_code == 200


def test_a_background_load_past_its_startup_timeout_is_logged_in_torchserves_words_too(srv):
    """synchronous=false: nobody waits for the answer, so the log says it, with the two lines
    TorchServe logs ("Backend worker error", then its exception's line), which scripts and
    TorchServe's test_startup_timeout wait for; the version is unregistered."""
    from tests.gates import wait_until

    r = httpx.post(f"{srv.management}/models", params={"url": "slowload.mar", "model_name": "slowbg",
                                                        "synchronous": "false"}, timeout=30)
    assert r.status_code == 202, r.text
    wait_until(lambda: "Backend worker error" in srv.log(), timeout=30)
    lines = srv.log().splitlines()
    at = next(i for i, line in enumerate(lines) if "Backend worker error" in line)
    assert "model slowbg version 1.0 failed to load" in lines[at] and "within 1 s (startupTimeout)" in lines[at]
    assert lines[at + 1] == ("org.pytorch.serve.wlm.WorkerInitializationException: "
                             "Backend worker did not respond in given time; unregistering it")
    wait_until(lambda: httpx.get(f"{srv.management}/models/slowbg").status_code == 404, timeout=30)
