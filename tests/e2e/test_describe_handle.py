"""TorchServe's ``customized=true`` describe against the real server: the handler's
``describe_handle()`` becomes ``customizedMetadata`` (REST and gRPC management), run by the
model's own instance (thread or child process) through its queue, in a batch of its own, and
never counted as a prediction. (Side by side with TorchServe 0.12: test_torchserve_compat.)"""

from __future__ import annotations

import json
import threading

import grpc
import httpx
import pytest

from server.protocols.grpc.generated import management_pb2 as mpb
from server.protocols.grpc.generated import management_pb2_grpc as mpb_grpc
from tests.gates import Gate, pending, wait_until
from tests.models import handler_archive
from tests.prometheus_helpers import samples


def _requests_counted(srv, model: str) -> float:
    """Every osprey_requests_total sample of ``model``, summed."""
    return sum(value for labels, value in samples(srv.metrics, "osprey_requests_total") if labels.get("model") == model)

HANDLER = '''
import json, os
from handlers.base import BaseHandler


class Described(BaseHandler):
    def initialize(self, context):
        self.context = context
        self.batches = []
        self.pid = os.getpid()

    def handle(self, data, context):
        self.batches.append(len(data))
        out = []
        for row in data:
            body = row.get("body")
            if isinstance(body, (bytes, bytearray)):
                body = json.loads(bytes(body))
            if body.get("gate"):
                from tests.gates import hold
                hold(body["gate"])
            out.append({"batch": len(data)})
        return out

    def describe_handle(self):
        if self.context.get_request_header(0, "x-fail"):
            raise RuntimeError("describe is broken")
        if self.context.get_request_header(0, "x-refuse"):
            self.context.set_response_status(403, "Forbidden")
            return {"why": "not for you"}
        return {"batches": list(self.batches), "pid": self.pid, "header": self.context.get_request_header(0, "x-probe")}
'''

NOT_A_DICT = '''
from handlers.base import BaseHandler


class Listed(BaseHandler):
    def initialize(self, context):
        self.context = context

    def handle(self, data, context):
        return [1 for _ in data]

    def describe_handle(self):
        return ["not", "an", "object"]
'''


@pytest.fixture(scope="module")
def srv(osprey_module, tmp_path_factory):
    store = tmp_path_factory.mktemp("store")
    handler_archive(store, "desc", HANDLER, config={"batchSize": 4, "maxBatchDelay": 2000, "minWorkers": 1,
                                                    "maxWorkers": 1, "monitoring": {"enabled": False}})
    handler_archive(store, "desc_proc", HANDLER, config={"isolation": "process", "minWorkers": 1, "maxWorkers": 1,
                                                         "monitoring": {"enabled": False}})
    handler_archive(store, "listed", NOT_A_DICT)
    server = osprey_module(["desc=desc.mar", "desc_proc=desc_proc.mar", "listed=listed.mar"], store)
    server.store = store
    return server


def _custom(srv, path: str, **headers):
    r = httpx.get(f"{srv.management}/models/{path}", params={"customized": "true"}, headers=headers, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def test_describe_handle_is_customized_metadata_on_rest_and_grpc(srv):
    httpx.post(f"{srv.inference}/predictions/desc", json={}, timeout=30).raise_for_status()
    (entry,) = _custom(srv, "desc", **{"x-probe": "seen"})
    meta = entry["customizedMetadata"]
    assert meta["batches"][-1] == 1 and meta["header"] == "seen", meta  # the describe call's headers reach it
    assert entry["modelName"] == "desc" and entry["workers"][0]["status"] == "READY"
    assert list(entry)[-2:] == ["customizedMetadata", "routing"]
    assert _custom(srv, "desc/1.0")[0]["customizedMetadata"]["batches"] == meta["batches"]
    # /all is described without it, as TorchServe 0.12 does
    assert ["customizedMetadata" in e for e in _custom(srv, "desc/all")] == [False]
    plain = httpx.get(f"{srv.management}/models/desc", params={"customized": "false"}).json()
    assert "customizedMetadata" not in plain[0]
    # a handler's answer that is not a JSON object shows as {}, as in TorchServe
    assert _custom(srv, "listed")[0]["customizedMetadata"] == {}
    with grpc.insecure_channel(srv.grpc_management) as ch:
        stub = mpb_grpc.ManagementAPIsServiceStub(ch)
        msg = stub.DescribeModel(mpb.DescribeModelRequest(model_name="desc", customized=True), timeout=30).msg
        assert json.loads(msg)[0]["customizedMetadata"]["batches"] == meta["batches"]
        msg = stub.DescribeModel(mpb.DescribeModelRequest(model_name="desc"), timeout=30).msg
        assert "customizedMetadata" not in json.loads(msg)[0]


def test_a_describe_runs_in_a_batch_of_its_own_and_is_no_prediction(srv, tmp_path):
    url = f"{srv.inference}/predictions/desc"
    before = httpx.get(f"{srv.management}/models/desc", params={"customized": "true"}).json()[0]
    seen = len(before["customizedMetadata"]["batches"])
    counted = _requests_counted(srv, "desc")
    gate = Gate(tmp_path)
    answers: dict[str, object] = {}
    threads = [threading.Thread(target=lambda: answers.__setitem__(
        "gated", httpx.post(url, json={"gate": gate.value}, timeout=60).json()))]
    threads[0].start()
    gate.wait_entered()  # the one instance is busy: what follows queues up, in this order
    threads.append(threading.Thread(target=lambda: answers.__setitem__(
        "first", httpx.post(url, json={}, timeout=60).json())))
    threads[-1].start()
    wait_until(lambda: pending(srv, "desc") == 1, what="the first prediction queued")
    threads.append(threading.Thread(target=lambda: answers.__setitem__("describe", _custom(srv, "desc"))))
    threads[-1].start()
    wait_until(lambda: pending(srv, "desc") == 2, what="the describe queued behind it")
    threads.append(threading.Thread(target=lambda: answers.__setitem__(
        "second", httpx.post(url, json={}, timeout=60).json())))
    threads[-1].start()
    wait_until(lambda: pending(srv, "desc") == 3, what="the second prediction queued")
    gate.open()
    for t in threads:
        t.join(60)
    # batchSize 4, yet the predictions on either side of the describe were not batched with it
    assert answers["first"] == {"batch": 1} and answers["second"] == {"batch": 1}, answers
    batches = answers["describe"][0]["customizedMetadata"]["batches"]
    assert batches[seen:] == [1, 1], batches  # the gated one and the first; the describe itself not a batch
    # and no prediction in the request metrics: the three predictions only
    wait_until(lambda: _requests_counted(srv, "desc") == counted + 3, what="the three predictions counted")
    assert _requests_counted(srv, "desc") == counted + 3


def test_describe_in_a_child_process_and_a_failing_describe_handle(srv):
    (entry,) = _custom(srv, "desc_proc")
    assert entry["customizedMetadata"]["pid"] == entry["workers"][0]["pid"]  # the instance's own process
    assert httpx.post(f"{srv.inference}/predictions/desc_proc", json={}, timeout=30).json() == {"batch": 1}
    for model in ("desc", "desc_proc"):
        r = httpx.get(f"{srv.management}/models/{model}", params={"customized": "true"}, headers={"x-fail": "1"},
                      timeout=30)
        assert r.status_code == 503 and r.json()["message"] == "Prediction failed", r.text  # TorchServe's answer
        # the model still serves, and describes
        assert httpx.post(f"{srv.inference}/predictions/{model}", json={}, timeout=30).status_code == 200
        assert _custom(srv, model)[0]["customizedMetadata"]["batches"]
        # a status the handler sets is the answer's, not metadata
        r = httpx.get(f"{srv.management}/models/{model}", params={"customized": "true"}, headers={"x-refuse": "1"},
                      timeout=30)
        assert r.status_code == 403 and "not for you" in r.json()["message"], r.text
