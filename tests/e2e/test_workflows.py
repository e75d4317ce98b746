"""TorchServe workflows (.war) against the real server process: register, list, describe,
predict through a sequential and a fan-in DAG, unregister, bad archives. The answers checked
are real TorchServe 0.12's where it has one (tests/fixtures/torchserve_workflows/answers.json,
recorded by record.py next to it)."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.workflow_archives import FAN_IN, SEQUENTIAL, node_models, war_archive

ANSWERS = json.loads((Path(__file__).resolve().parents[1] / "fixtures" / "torchserve_workflows" / "answers.json")
                     .read_text())


def torchserve(call: str, api: bool = True) -> dict:
    """TorchServe 0.12's recorded answer to ``call`` (e.g. "GET /workflows/seq")."""
    return next(c for c in ANSWERS[f"enable_model_api={api}"] if c["call"] == call)


def _archives(store: Path) -> None:
    node_models(store)
    war_archive(store, "seq", SEQUENTIAL)
    war_archive(store, "fan", FAN_IN)
    war_archive(store, "failing", {"models": {"fails": {"url": "fails.mar"}}, "dag": {"pre": ["fails"]}})
    war_archive(store, "nospec", None)
    war_archive(store, "nomanifest", SEQUENTIAL, manifest={})
    war_archive(store, "cycle", {"models": {"double": {"url": "double.mar"}, "add_one": {"url": "add_one.mar"}},
                                 "dag": {"pre": ["double"], "double": ["add_one"], "add_one": ["double"]}})
    war_archive(store, "selfloop", {"models": {"double": {"url": "double.mar"}},
                                    "dag": {"pre": ["double"], "double": ["double"]}})
    war_archive(store, "twostarts", {"models": {"double": {"url": "double.mar"}, "add_one": {"url": "add_one.mar"}},
                                     "dag": {"double": ["post"], "add_one": ["post"]}})
    war_archive(store, "unknownfn", {"models": {"double": {"url": "double.mar"}},
                                     "dag": {"pre": ["double"], "double": ["nosuch"]}})
    war_archive(store, "missingmar", {"models": {"ghost": {"url": "ghost.mar"}}, "dag": {"pre": ["ghost"]}})
    war_archive(store, "badyaml", "models: [unclosed\n")
    war_archive(store, "nodag", {"models": {"double": {"url": "double.mar"}}})
    war_archive(store, "badnumber", {"models": {"batch-size": "four", "double": {"url": "double.mar"}},
                                     "dag": {"pre": ["double"]}})
    (store / "notazip.war").write_bytes(b"not a zip at all")


class Server:
    """The server's two ports as clients holding their keys: ``srv.m`` management, ``srv.i`` inference."""

    def __init__(self, proc):
        self.proc = proc
        keys = proc.keys()
        self.m = httpx.Client(base_url=proc.management, timeout=60,
                              headers={"authorization": f"Bearer {keys['management']['key']}"})
        self.i = httpx.Client(base_url=proc.inference, timeout=60,
                              headers={"authorization": f"Bearer {keys['inference']['key']}"})


@pytest.fixture(scope="module")
def srv(osprey_module, tmp_path_factory):
    """One server for the module, with the model API off (as TorchServe, workflows do not need
    it) and token auth on (the management key for /workflows, the inference key for /wfpredict)."""
    store = tmp_path_factory.mktemp("store")
    _archives(store)
    server = Server(osprey_module([], store, model_api=False, token_auth=True))
    yield server
    server.m.close()
    server.i.close()


def _models(srv) -> list[str]:
    return [m["modelName"] for m in srv.m.get("/models").json()["models"]]


def test_sequential_workflow_registers_its_nodes_as_models_predicts_and_unregisters(srv):
    r = srv.m.post("/workflows", params={"url": "seq.war"})
    assert (r.status_code, r.json()) == (200, torchserve("POST /workflows {'url': 'seq.war'}")["body"])
    r = srv.m.post("/workflows", params={"url": "seq.war"})
    expected = torchserve("POST /workflows {'url': 'seq.war'}")
    duplicate = ANSWERS["enable_model_api=True"][1]
    assert (r.status_code, r.json()) == (duplicate["status"], duplicate["body"])  # 409, TorchServe's words
    assert expected["status"] == 200

    described = srv.m.get("/workflows/seq").json()
    ts = torchserve("GET /workflows/seq")["body"]
    assert [{k: d[k] for k in ts[0]} for d in described] == ts  # TorchServe's fields and values
    assert described[0]["models"] == ["seq__pre", "seq__double", "seq__add_one", "seq__post"]
    # the nodes are ordinary models: per-model settings from the spec, the global ones otherwise
    node = srv.m.get(f"/models/seq__add_one").json()[0]
    assert (node["batchSize"], node["maxBatchDelay"], node["minWorkers"], node["modelUrl"]) == (2, 5, 1, "add_one.mar")
    assert srv.m.get(f"/models/seq__double").json()[0]["batchSize"] == 4
    fn = srv.m.get(f"/models/seq__pre").json()[0]  # a function node: batches of one, as in TorchServe
    assert (fn["batchSize"], fn["maxBatchDelay"], fn["workers"][0]["status"]) == (1, 0, "READY")

    for headers in ({}, {"content-type": "application/json"}):
        r = srv.i.post(f"/wfpredict/seq", content=b"3", headers=headers)
        assert r.status_code == 200 and r.json() == {"result": 7} == torchserve("POST /wfpredict/seq")["body"]
        assert r.headers["content-type"] == "application/json"
    # a node's model answers on its own too
    assert srv.i.post(f"/predictions/seq__double", content=b"5").json() == 10

    r = srv.m.delete(f"/workflows/seq")
    assert (r.status_code, r.json()) == (200, torchserve("DELETE /workflows/seq")["body"])
    assert not [name for name in _models(srv) if name.startswith("seq__")]
    for r in (srv.i.post(f"/wfpredict/seq", content=b"3"), srv.m.delete(f"/workflows/seq"),
              srv.m.get("/workflows/seq")):
        assert r.status_code == 404
        assert r.json() == {"code": 404, "type": "WorkflowNotFoundException", "message": "Workflow not found: seq"}


def test_fan_in_merges_both_parents_by_name_under_concurrent_requests(srv):
    assert srv.m.post("/workflows", params={"url": "fan.war", "workflow_name": "fan2"}).json() == {
        "status": "Workflow fan2 has been registered and scaled successfully."}
    try:
        assert srv.i.post(f"/wfpredict/fan2", content=b"3").json() == torchserve("POST /wfpredict/fan")["body"]
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda n: srv.i.post(f"/wfpredict/fan2", content=str(n).encode()).json(),
                                    range(16)))
        assert answers == [{"add_one": n + 1, "double": 2 * n} for n in range(16)]
        listing = srv.m.get(f"/workflows").json()
        assert {"workflowName": "fan2", "workflowUrl": "fan.war"} in listing["workflows"]
        page = srv.m.get(f"/workflows", params={"limit": 0}).json()
        assert page == {"nextPageToken": "0", "workflows": []}  # TorchServe's paging: a token at the page's end
    finally:
        assert srv.m.delete(f"/workflows/fan2").status_code == 200
    assert not [name for name in _models(srv) if name.startswith("fan2__")]


def test_a_failing_node_fails_the_request_500_with_torchservess_words(srv):
    assert srv.m.post("/workflows", params={"url": "failing.war"}).status_code == 200
    try:
        r = srv.i.post(f"/wfpredict/failing", content=b"3")
        ts = torchserve("POST /wfpredict/failing")
        assert r.status_code == ts["status"] == 500
        assert r.json()["type"] == ts["body"]["type"]
        assert r.json()["message"].startswith(ts["body"]["message"]), r.json()  # "Error executing fails"
        assert "tried 2 times" in r.json()["message"]  # retry-attempts 1 (TorchServe's default): one more try
    finally:
        srv.m.delete(f"/workflows/failing")


@pytest.mark.parametrize("url, status, words", [
    ("nospec.war", 400, "names the spec file 'spec.yaml', which is not a file in the archive"),
    ("nomanifest.war", 400, "Workflow name is not defined."),
    ("cycle.war", 400, torchserve("POST /workflows {'url': 'cycle.war'}")["body"]["message"]),
    ("selfloop.war", 400, torchserve("POST /workflows {'url': 'selfloop.war'}")["body"]["message"]),
    ("twostarts.war", 400, torchserve("POST /workflows {'url': 'twostarts.war'}")["body"]["message"]),
    ("unknownfn.war", 400, "dag node(s) nosuch are neither models of the 'models' section (double) nor functions of "
                           "the handler wf_handler.py"),
    ("missingmar.war", 500, torchserve("POST /workflows {'url': 'missingmar.war'}")["body"]["message"]),
    ("badyaml.war", 400, "Failed to parse yaml."),
    ("nodag.war", 400, "has no 'dag' section"),
    ("badnumber.war", 400, "models.batch-size must be a whole number, got 'four'"),
    ("notazip.war", 400, "not a zip file"),
    ("absent.war", 404, torchserve("POST /workflows {'url': 'absent.war'}")["body"]["message"]),
    ("", 404, torchserve("POST /workflows {'url': ''}")["body"]["message"]),
    ("../x.war", 404, torchserve("POST /workflows {'url': '../x.war'}")["body"]["message"]),
    (None, 400, torchserve("POST /workflows")["body"]["message"]),
    # no downloads; a URL whose file is in the store gets TorchServe's 500 (its re-register test)
    ("http://127.0.0.1:9/absent.war", 400, "downloading archives is not supported"),
    ("https://example.invalid/war_files/seq.war", 500, "Workflow file already exists seq.war"),
])
def test_bad_workflow_archives_are_refused_clearly_and_leave_nothing_behind(srv, url, status, words):
    before = _models(srv)
    r = srv.m.post("/workflows", params=None if url is None else {"url": url})
    assert r.status_code == status, r.text
    assert words in r.json()["message"], r.json()
    assert _models(srv) == before  # a node registered before another failed is taken out again
    assert srv.m.get("/workflows").json()["workflows"] == []


def test_workflows_take_each_ports_token_with_the_model_api_off(srv):
    """As TorchServe: /workflows is not behind enable_model_api (this server has it off; the
    registrations above worked); the management key opens it, the inference key /wfpredict."""
    assert srv.m.post("/models", params={"url": "double.mar"}).status_code == 405  # the model API is off
    assert httpx.post(f"{srv.proc.management}/workflows", params={"url": "seq.war"}).status_code == 401
    assert httpx.get(f"{srv.proc.management}/workflows", headers=srv.i.headers).status_code == 401
    r = srv.m.post("/workflows", params={"url": "seq.war"})
    assert (r.status_code, r.json()) == (200, torchserve("POST /workflows {'url': 'seq.war'}", api=False)["body"])
    try:
        assert httpx.post(f"{srv.proc.inference}/wfpredict/seq", content=b"3", headers=srv.m.headers).status_code == 401
        r = srv.i.post("/wfpredict/seq", content=b"3")
        assert (r.status_code, r.json()) == (200, torchserve("POST /wfpredict/seq", api=False)["body"])
    finally:
        r = srv.m.delete("/workflows/seq")
    assert (r.status_code, r.json()) == (200, torchserve("DELETE /workflows/seq", api=False)["body"])
    assert srv.m.get("/models").json()["models"] == []
