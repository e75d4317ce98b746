"""TorchServe's management edge cases, answered as TorchServe 0.12 answers them (status and
JSON checked against a live TorchServe 0.12.0 on this machine; where its answer is a quirk,
a 500 from an exception, the server's code says so), for REST and gRPC alike; archives in
the model store that are symbolic links; token expiry, rotation over GET /token, the 400
setting (the TS_ environment override of --disable-token-auth: tests/unit/test_settings.py);
the messages and codes of relative-path URLs, 404/405 bodies and gRPC re-registration (asked
of TorchServe by tests/fixtures/torchserve_messages/record.py; the model API off is in
tests/e2e/test_management.py).

Two servers: one configured as TorchServe's own test config is (default_workers_per_model
not set, so the register API starts no workers) and one with tokens.
"""

from __future__ import annotations

import time
import zipfile

import grpc
import httpx
import pytest

from server.protocols.grpc.generated import management_pb2 as mpb
from server.protocols.grpc.generated import management_pb2_grpc as mpb_grpc
from tests.models import handler_archive

NOOP = "def handle(data, context):\n    return None if data is None else [1 for _ in data]\n"
NAMES = ("inv", "rt", "dd", "junk", "neg", "asyn", "zero", "st0", "st0w", "page", "slash", "nan", "dup", "grpc1",
         "abs", "again")


@pytest.fixture(scope="module")
def ts(osprey_module, tmp_path_factory):
    """TorchServe's defaults: default_workers_per_model 0 (TorchServe's "not configured")."""
    root = tmp_path_factory.mktemp("edges")
    store = root / "store"
    store.mkdir()
    for name in NAMES:
        handler_archive(store, name, NOOP)
    outside = root / "elsewhere"
    outside.mkdir()
    handler_archive(outside, "linked", NOOP)
    (store / "linked.mar").symlink_to(outside / "linked.mar")
    with zipfile.ZipFile(outside / "evil.mar", "w") as zf:  # a linked archive is extracted as carefully
        zf.writestr("MAR-INF/MANIFEST.json", '{"model": {"modelName": "evil", "handler": "h.py"}}')
        zf.writestr("../../escape.py", "print('owned')")
    (store / "evil.mar").symlink_to(outside / "evil.mar")
    server = osprey_module([], store, config={"default_workers_per_model": 0})
    server.root = root
    return server


def post(srv, **params) -> httpx.Response:
    return httpx.post(f"{srv.management}/models", params=params, timeout=30)


def describe(srv, name: str) -> dict:
    r = httpx.get(f"{srv.management}/models/{name}")
    assert r.status_code == 200, r.text
    return r.json()[0]


def zero(name: str) -> dict:
    return {"status": f'Model "{name}" Version: 1.0 registered with 0 initial workers. '
                      "Use scale workers API to add workers for the model."}


def test_register_defaults_to_no_workers_and_says_so(ts):
    r = post(ts, url="zero.mar")
    assert (r.status_code, r.json()) == (200, zero("zero"))
    d = describe(ts, "zero")
    assert (d["minWorkers"], d["maxWorkers"], d["workers"]) == (0, 0, [])
    r = httpx.put(f"{ts.management}/models/zero", params={"min_worker": 1, "synchronous": "true"}, timeout=30)
    assert (r.status_code, r.json()) == (200, {"status": "Workers scaled to 1 for model: zero"})
    assert httpx.post(f"{ts.inference}/predictions/zero", json=[1]).status_code == 200


def test_register_synchronous_false_without_workers_is_200(ts):
    r = post(ts, url="asyn.mar", synchronous="false")
    assert (r.status_code, r.json()) == (200, zero("asyn"))
    r = post(ts, url="nan.mar", synchronous="-1", initial_workers=1)  # not "true": false, as in TorchServe
    assert (r.status_code, r.json()) == (202, {"status": "Processing worker updates..."})


def test_invalid_handler_registers_then_a_synchronous_scale_fails_500(ts):
    r = post(ts, url="inv.mar", handler="invalidHandler")
    assert (r.status_code, r.json()) == (200, zero("inv"))
    r = httpx.put(f"{ts.management}/models/inv", params={"min_worker": 1, "synchronous": "true"}, timeout=30)
    assert r.status_code == 500, r.text
    assert r.json()["message"].startswith("Failed to start workers for model inv version: null")
    assert describe(ts, "inv")["workers"] == []
    assert httpx.delete(f"{ts.management}/models/inv").status_code == 200


def test_runtime_is_checked(ts):
    r = post(ts, url="rt.mar", runtime="python4")
    assert r.status_code == 400 and r.json() == {"code": 400, "type": "BadRequestException",
                                                  "message": "Invalid RuntimeType value: python4"}
    assert post(ts, url="rt.mar", runtime="python3").status_code == 200
    assert describe(ts, "rt")["runtime"] == "python3"


def test_numbers_that_are_not_numbers_are_ignored_and_negative_workers_are_none(ts):
    r = post(ts, url="dd.mar", batch_size="dd", initial_workers=1)
    assert r.status_code == 200 and describe(ts, "dd")["batchSize"] == 1
    r = post(ts, url="junk.mar", batch_size=2, initial_workers=1, max_batch_delay="junk")
    assert r.status_code == 200
    d = describe(ts, "junk")
    assert (d["batchSize"], d["maxBatchDelay"], len(d["workers"])) == (2, 100, 1)
    r = post(ts, url="neg.mar", initial_workers=-1)
    assert (r.status_code, r.json()) == (200, zero("neg"))


def test_startup_timeout_zero(ts):
    r = post(ts, url="st0.mar", startup_timeout=0)
    assert (r.status_code, r.json()) == (200, zero("st0"))
    assert describe(ts, "st0")["startupTimeout"] == 0
    r = post(ts, url="st0w.mar", batch_size=3, initial_workers=3, startup_timeout=0)
    assert r.status_code == 500 and r.json()["message"].startswith("Failed to start workers for model st0w")
    assert httpx.get(f"{ts.management}/models/st0w").status_code == 404


def test_list_limits_as_torchserve(ts):
    assert post(ts, url="page.mar").status_code == 200
    m = ts.management
    everything = httpx.get(f"{m}/models", params={"limit": -1}).json()
    assert "nextPageToken" not in everything and "page" in [x["modelName"] for x in everything["models"]]
    assert httpx.get(f"{m}/models", params={"limit": 1, "next_page_token": -1}).json()["nextPageToken"] == "1"
    assert httpx.get(f"{m}/models", params={"limit": "", "next_page_token": ""}).status_code == 200
    assert httpx.get(f"{m}/models", params={"limit": 0}).json()["models"] == []


def test_url_given_empty_is_404_and_missing_is_400(ts):
    r = post(ts, url="", model_name="x")
    assert (r.status_code, r.json()["type"], r.json()["message"]) == (404, "ModelNotFoundException", "empty url")
    assert post(ts, model_name="x").json()["message"] == "Parameter url is required."


def test_reregistering_by_url_of_an_archive_already_in_the_store_is_500(ts):
    assert post(ts, url="dup.mar").status_code == 200
    r = post(ts, url="https://torchserve.pytorch.org/mar_files/dup.mar", model_name="dup")
    assert (r.status_code, r.json()["message"]) == (500, "Model file already exists dup.mar")
    r = post(ts, url="https://torchserve.pytorch.org/mar_files/not-here.mar")
    assert r.status_code == 400 and "not supported" in r.json()["message"]
    assert post(ts, url="dup.mar").status_code == 409  # a local archive registered twice: 409, as in TorchServe


def test_scale_parameters_as_torchserve(ts):
    m = ts.management
    assert post(ts, url="slash.mar", initial_workers=1).status_code == 200
    r = httpx.put(f"{m}/models/slash", params={"min_worker": 1, "synchronous": "Nan"})
    assert (r.status_code, r.json()) == (202, {"status": "Processing worker updates..."})
    assert httpx.put(f"{m}/models/slash", params={"min_worker": "nan", "synchronous": "nan"}).status_code == 202
    r = httpx.put(f"{m}/models/slash", params={"min_worker": -1})
    assert r.status_code == 500 and r.json()["type"] == "InternalServerException"  # TorchServe's quirk
    assert httpx.put(f"{m}/models/slash", params={"max_worker": -1}).status_code == 400
    assert httpx.get(f"{m}/models/slash/").status_code == 200
    r = httpx.delete(f"{m}/models/slash/", params={"synchronous": "true"})
    assert (r.status_code, r.json()) == (200, {"status": 'Model "slash" unregistered'})
    assert httpx.delete(f"{m}/models/slash/").status_code == 404


def test_grpc_gives_the_same_answers(ts):
    with grpc.insecure_channel(ts.grpc_management) as channel:
        stub = mpb_grpc.ManagementAPIsServiceStub(channel)
        reply = stub.RegisterModel(mpb.RegisterModelRequest(url="grpc1.mar", handler="invalidHandler",
                                                            synchronous=True), timeout=30)
        assert "registered with 0 initial workers" in reply.msg
        for request, code in [(mpb.RegisterModelRequest(url="grpc1.mar", runtime="python4"),
                               grpc.StatusCode.INVALID_ARGUMENT),
                              (mpb.RegisterModelRequest(model_name="x"), grpc.StatusCode.INVALID_ARGUMENT)]:
            with pytest.raises(grpc.RpcError) as info:
                stub.RegisterModel(request, timeout=10)
            assert info.value.code() == code
        with pytest.raises(grpc.RpcError) as info:
            stub.ScaleWorker(mpb.ScaleWorkerRequest(model_name="grpc1", min_worker=1, synchronous=True), timeout=30)
        assert info.value.code() == grpc.StatusCode.INTERNAL and "Failed to start workers" in info.value.details()


def test_archives_that_are_symbolic_links_are_followed_and_extracted_safely(ts):
    r = post(ts, url="linked.mar", initial_workers=1)
    assert r.status_code == 200, r.text
    assert httpx.post(f"{ts.inference}/predictions/linked", json=[1]).status_code == 200
    r = post(ts, url="evil.mar")
    assert r.status_code == 400 and "escape" in r.json()["message"]
    assert not (ts.root / "escape.py").exists() and not (ts.root.parent / "escape.py").exists()
    r = post(ts, url="../elsewhere/linked.mar", model_name="out")
    assert (r.status_code, r.json()["message"]) == (404, "Relative path is not allowed in url: ../elsewhere/linked.mar")


# --- messages and codes: TorchServe 0.12's answers, recorded on this machine ---------------
TS_405 = {"code": 405, "type": "MethodNotAllowedException",
          "message": "Requested method is not allowed, please refer to API document."}
TS_404 = {"code": 404, "type": "ResourceNotFoundException",
          "message": "Requested resource is not found, please refer to API document."}


def relative(url: str) -> dict:
    return {"code": 404, "type": "ModelNotFoundException", "message": f"Relative path is not allowed in url: {url}"}


def test_urls_that_climb_out_are_404_relative_path_as_torchserve(ts):
    # TorchServe 0.12: any ".." in the url, a path or an http(s)/file URL, is refused first
    for url in ("../sub/up.mar", "../store/abs.mar", "..", "..\\sub\\up.mar",
                "https://torchserve.s3.amazonaws.com/mar_files/../mar_files/densenet161.mar",
                f"file://{ts.root}/store/../elsewhere/linked.mar"):
        r = post(ts, url=url)
        assert (r.status_code, r.json()) == (404, relative(url)), url
    r = post(ts, url=str(ts.root / "elsewhere" / "linked.mar"))  # absolute, outside the store
    assert r.status_code == 404 and r.json()["message"].startswith(f"Model not found at: {ts.root}/elsewhere/linked.mar")
    r = post(ts, url=str(ts.root / "store" / "abs.mar"))  # absolute, in the store: TorchServe registers it
    assert (r.status_code, r.json()) == (200, zero("abs"))


def test_405_and_404_bodies_are_torchserve_texts(ts):
    m = ts.management
    for method, url in [("DELETE", f"{m}/models"), ("PUT", f"{m}/models"), ("PATCH", f"{m}/models/zero"),
                        ("POST", f"{m}/models/zero"), ("POST", f"{m}/models/zero/1.0")]:
        r = httpx.request(method, url)
        assert (r.status_code, r.json()) == (405, TS_405), (method, url)
    for url in (f"{m}/nope", f"{ts.inference}/nope"):
        r = httpx.get(url)
        assert (r.status_code, r.json()) == (404, TS_404), url


def test_grpc_reregistration_and_relative_paths(ts):
    with grpc.insecure_channel(ts.grpc_management) as channel:
        stub = mpb_grpc.ManagementAPIsServiceStub(channel)
        assert "registered with 0 initial workers" in stub.RegisterModel(
            mpb.RegisterModelRequest(url="again.mar", synchronous=True), timeout=30).msg
        with pytest.raises(grpc.RpcError) as info:  # TorchServe 0.12: UNKNOWN, no details (its quirk)
            stub.RegisterModel(mpb.RegisterModelRequest(url="again.mar", synchronous=True), timeout=30)
        assert info.value.code() == grpc.StatusCode.UNKNOWN
        assert info.value.details() == "Model version 1.0 is already registered for model again"
        url = "https://torchserve.s3.amazonaws.com/mar_files/../mar_files/densenet161.mar"
        with pytest.raises(grpc.RpcError) as info:  # TorchServe's test_gRPC_allowed_urls_relative_path
            stub.RegisterModel(mpb.RegisterModelRequest(url=url, model_name="densenet161-relative-path"), timeout=30)
        assert (info.value.code(), info.value.details()) == (grpc.StatusCode.NOT_FOUND, relative(url)["message"])
    assert post(ts, url="again.mar").status_code == 409  # REST: 409, as in TorchServe


# --- tokens ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tok(osprey_module, tmp_path_factory):
    return osprey_module([], tmp_path_factory.mktemp("tok-store"), token_auth=True,
                         config={"token_auth_status": 400, "token_expiration_min": 0.03})  # 1.8 s


def bearer(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def test_tokens_rotate_over_get_and_expire(tok):
    m, api = tok.management, tok.keys()["API"]["key"]
    r = httpx.get(f"{m}/models", headers=bearer("abcd1234"))
    assert r.status_code == 400 and r.json()["type"] == "InvalidKeyException"
    for kind in ("management", "inference"):
        old = tok.keys()[kind]["key"]
        r = httpx.get(f"{m}/token", params={"type": kind}, headers=bearer(api))
        assert r.status_code == 200, r.text
        assert tok.keys()[kind]["key"] != old
    keys = tok.keys()
    assert httpx.get(f"{m}/models", headers=bearer(keys["management"]["key"])).status_code == 200
    assert httpx.get(f"{tok.inference}/ping", headers=bearer(keys["inference"]["key"])).status_code == 200
    for params, key in [({"type": "bogus"}, api), ({}, api), ({"type": "inference"}, keys["management"]["key"])]:
        r = httpx.get(f"{m}/token", params=params, headers=bearer(key))
        assert r.status_code == 400 and r.json()["type"] == "InvalidKeyException"
    time.sleep(2.0)  # token_expiration_min 0.03
    assert httpx.get(f"{m}/models", headers=bearer(keys["management"]["key"])).status_code == 400
    assert httpx.get(f"{tok.inference}/ping", headers=bearer(keys["inference"]["key"])).status_code == 400
    assert httpx.post(f"{m}/token", params={"type": "management"}, headers=bearer(api)).status_code == 200
    assert httpx.get(f"{m}/models", headers=bearer(tok.keys()["management"]["key"])).status_code == 200


@pytest.mark.parametrize("version", ["../../../tmp/escaped", "1.0/x", ".hidden", "v1 beta", ""])
def test_an_archive_whose_version_is_no_plain_name_is_refused_naming_it(ts, version):
    """The manifest's modelVersion names folders (per-model packages) and URL path parts: one
    with a slash, a leading dot or a space is refused, never registered (``../..`` put the
    per-model packages outside the state folder)."""
    with zipfile.ZipFile(ts.store / "oddversion.mar", "w") as zf:
        manifest = {"model": {"modelName": "oddversion", "modelVersion": version, "handler": "h.py"}}
        zf.writestr("MAR-INF/MANIFEST.json", __import__("json").dumps(manifest))
        zf.writestr("h.py", NOOP)
    try:
        r = post(ts, url="oddversion.mar")
        if version == "":  # no version: TorchServe's 1.0
            assert r.status_code == 200, r.text
            assert httpx.delete(f"{ts.management}/models/oddversion/1.0", timeout=30).status_code == 200
            return
        assert r.status_code == 400 and "Model version" in r.json()["message"], r.text
        assert "in the archive's manifest must be" in r.json()["message"]
        assert httpx.get(f"{ts.management}/models/oddversion", timeout=30).status_code == 404
    finally:
        (ts.store / "oddversion.mar").unlink()
