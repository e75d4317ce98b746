"""Issue 11 end to end: real ``osprey serve`` processes, a real Prometheus, a real redis-server.

One server for the module serves small monitored models (tests/monitoring_models.py: a
TorchScript MLP over 3 classes behind the ``tensor`` handler, windows of 50, a baseline of
100 requests). Each drift test sends 100 baseline requests, then 120 in distribution (two
windows: no episode), then 150 moved by 2.5 sd (an episode opens), through one protocol:
REST, gRPC OIP ModelInfer and TorchServe gRPC (there a custom handler decoding the JSON bytes,
as TorchServe handlers do). Every wait is on state (GET /monitoring's
``requests``, Prometheus' value), never a sleep.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
from google.protobuf import struct_pb2

from server.protocols.grpc.generated import inference_pb2, inference_pb2_grpc
from server.protocols.grpc.generated import osprey_monitoring_pb2 as mpb
from server.protocols.grpc.generated import osprey_monitoring_pb2_grpc as mpb_grpc

from tests.conftest import ROOT
from tests.models import handler_archive
from tests.monitoring_models import (CLASSES, classifier_archive, metric_lines, regressor_archive, rows,
                                     wait_monitoring)
from tests.oip_stubs import pb, pb_grpc
from tests.prometheus_helpers import PrometheusProcess

SHIFT = 2.5
BASELINE, IN_DIST, SHIFTED = 100, 120, 150

# A custom handler whose monitoring hook raises: predictions must not notice.
HOOK_FAILS = '''
import torch
from handlers.base import BaseHandler

class HookFails(BaseHandler):
    def initialize(self, context):
        self.initialized = True

    def preprocess(self, data):
        return torch.tensor([row["body"] for row in data], dtype=torch.float32)

    def inference(self, x):
        return torch.softmax(x, dim=1)

    def postprocess(self, y):
        return y.tolist()

    def monitor_features(self, inputs, outputs):
        raise RuntimeError("the hook is broken")
'''


@pytest.fixture(scope="module")
def srv(osprey_module, tmp_path_factory):
    store = tmp_path_factory.mktemp("monitoring-store")
    for name in ("clf_rest", "clf_oip"):
        classifier_archive(store, name)
    classifier_archive(store, "clf_ts", json_handler=True)
    classifier_archive(store, "clf_proc", isolation="process")
    classifier_archive(store, "clf_off", monitoring={"enabled": False})
    regressor_archive(store, "reg")
    handler_archive(store, "hookfail", HOOK_FAILS, config={"batchSize": 4, "maxBatchDelay": 5, "deviceType": "cpu",
                                                           "monitoring": {"window": 50, "baseline_requests": 100}})
    models = [f"{n}={n}.mar" for n in ("clf_rest", "clf_oip", "clf_ts", "clf_proc", "clf_off", "reg", "hookfail")]
    return osprey_module(models, store)


@pytest.fixture(scope="module")
def prom(srv, tmp_path_factory):
    p = PrometheusProcess(tmp_path_factory.mktemp("prom"), [srv.metrics.split("//", 1)[1]])
    yield p
    p.stop()


@pytest.fixture(scope="module")
def channel(srv):
    ch = grpc.insecure_channel(srv.grpc)
    yield ch
    ch.close()


def _pool(fn, items, workers: int = 8) -> list:
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(fn, items))


# --- one client per protocol: each answers [(request id the client saw, predicted class)] -----------
def send_rest(base: str, model: str, data: np.ndarray) -> list[tuple[str, int]]:
    with httpx.Client(base_url=base, timeout=30) as c:
        def one(row):
            r = c.post(f"/predictions/{model}", json=row.tolist())
            assert r.status_code == 200, r.text
            return r.headers["x-request-id"], int(np.argmax(r.json()))
        return _pool(one, list(data))


def send_rest_v2(base: str, model: str, data: np.ndarray) -> list[tuple[str, int]]:
    with httpx.Client(base_url=base, timeout=30) as c:
        def one(row):
            r = c.post(f"/v2/models/{model}/infer",
                       json={"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [1, 16], "data": row.tolist()}]})
            assert r.status_code == 200, r.text
            assert r.headers["x-request-id"] == r.json()["id"]
            return r.json()["id"], int(np.argmax(r.json()["outputs"][0]["data"]))
        return _pool(one, list(data))


def send_oip_grpc(channel, model: str, data: np.ndarray) -> list[tuple[str, int]]:
    stub = pb_grpc.GRPCInferenceServiceStub(channel)

    def one(row):
        req = pb.ModelInferRequest(model_name=model)
        req.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 16]).contents.fp32_contents.extend(row.tolist())
        resp, call = stub.ModelInfer.with_call(req, timeout=30)
        assert resp.id and dict(call.trailing_metadata())["x-request-id"] == resp.id
        return resp.id, int(np.argmax(np.frombuffer(resp.raw_output_contents[0], dtype=np.float32)))
    return _pool(one, list(data))


def send_torchserve_grpc(channel, model: str, data: np.ndarray) -> list[tuple[str, int]]:
    stub = inference_pb2_grpc.InferenceAPIsServiceStub(channel)

    def one(row):
        req = inference_pb2.PredictionsRequest(model_name=model, input={"body": json.dumps(row.tolist()).encode()})
        resp, call = stub.Predictions.with_call(req, timeout=30)
        return dict(call.trailing_metadata())["x-request-id"], int(np.argmax(json.loads(resp.prediction)))
    return _pool(one, list(data))


SENT: dict[str, list[tuple[str, int]]] = {}  # model -> in-distribution (request id, predicted class)


def _requests(n: int):
    return lambda s: s["requests"] >= n


def _drift_through(srv, model: str, send) -> None:
    sent = send(rows(BASELINE, seed=1))
    s = wait_monitoring(srv.inference, model, _requests(BASELINE))
    assert s["reference"] == "baseline" and s["baseline_progress"] == {"rows": BASELINE, "needed": BASELINE}
    assert s["requests"] == BASELINE and s["windows"] == 0

    sent += send(rows(IN_DIST, seed=2))
    s = wait_monitoring(srv.inference, model, lambda s: s["requests"] >= BASELINE + IN_DIST and s["windows"] >= 2)
    assert s["requests"] == BASELINE + IN_DIST  # every request captured (sample_rate 1.0), none twice
    assert s["drift"]["episode"] is None and s["drift"]["episodes"] == 0 and not s["drift"]["detected"], s["history"]
    assert sum(h["drifted"] for h in s["history"]) <= 1, s["history"]
    SENT[model] = sent

    send(rows(SHIFTED, seed=3, shift=SHIFT))
    s = wait_monitoring(srv.inference, model, lambda s: s["requests"] >= BASELINE + IN_DIST + SHIFTED)
    assert s["requests"] == BASELINE + IN_DIST + SHIFTED
    assert s["windows"] >= 4
    drift = s["drift"]
    assert drift["detected"] is True and drift["episodes"] == 1, s["history"]
    assert drift["episode"]["open"] is True and drift["episode"]["id"] and drift["episode"]["started"]
    assert s["history"][-1]["drifted"] and s["history"][-2]["drifted"]
    drifted = [f for f in drift["features"] if f["drifted"]]
    assert drifted and drift["features"][0]["drifted"]  # ranked: the most drifted first
    names = {f["name"] for f in drifted}
    assert any(n.startswith("embedding[") for n in names) and names & {"predicted_class", "confidence", "entropy"}


def test_drift_through_rest(srv):
    _drift_through(srv, "clf_rest", lambda data: send_rest(srv.inference, "clf_rest", data))


def test_drift_through_grpc_oip(srv, channel):
    _drift_through(srv, "clf_oip", lambda data: send_oip_grpc(channel, "clf_oip", data))


def test_drift_through_torchserve_grpc(srv, channel):
    _drift_through(srv, "clf_ts", lambda data: send_torchserve_grpc(channel, "clf_ts", data))


def test_monitoring_json_has_the_plans_shape(srv, channel):
    s = httpx.get(f"{srv.inference}/monitoring/clf_rest").json()
    assert s == httpx.get(f"{srv.inference}/monitoring/clf_rest/1.0").json() | {"quality": s["quality"]}
    assert {"model", "version", "reference", "baseline_progress", "degraded", "requests", "windows", "drift",
            "quality", "history"} <= set(s)
    assert (s["model"], s["version"], s["reference"], s["degraded"]) == ("clf_rest", "1.0", "baseline", None)
    drift = s["drift"]
    assert {"detected", "score", "method", "episode", "episodes", "features"} <= set(drift)
    assert drift["method"] == "psi" and drift["score"] > 0
    assert set(drift["episode"]) >= {"id", "started", "open"}
    for f in drift["features"]:
        assert {"name", "kind", "method", "score", "threshold", "drifted", "reference", "current"} <= set(f)
        assert f["kind"] in ("input", "prediction")
        ref = f["reference"]
        if "edges" in ref:  # open ends are null (JSON has no infinity)
            assert ref["edges"][0] is None and ref["edges"][-1] is None
            assert len(ref["proportions"]) == len(ref["edges"]) - 1 == len(f["current"]["proportions"])
        else:
            assert len(ref["categories"]) == len(ref["proportions"])
    assert {f["kind"] for f in drift["features"]} == {"input", "prediction"}
    q = s["quality"]
    assert {"labels", "unmatched", "invalid", "metrics", "baseline", "degraded", "estimated"} <= set(q)
    assert q["baseline"] == {"accuracy": 0.95} and q["estimated"] is not None
    h = s["history"][-1]
    assert {"window", "ended", "score", "drifted", "features", "quality"} <= set(h)
    assert set(h["features"]) == {f["name"] for f in drift["features"]}
    # the same status over gRPC
    stub = mpb_grpc.MonitoringStub(channel)
    resp = stub.ModelMonitoring(mpb.ModelMonitoringRequest(model_name="clf_oip"), timeout=10)
    g = json.loads(resp.json)
    assert g["model"] == "clf_oip" and g["drift"]["detected"] is True and resp.status["model"] == "clf_oip"


def test_prometheus_scrapes_the_drift(srv, prom):
    for model in ("clf_rest", "clf_oip", "clf_ts"):
        assert prom.wait_for(f'osprey_drift_detected{{model="{model}", version="1.0"}}', lambda v: v == 1) == 1
        assert prom.wait_for(f'osprey_drift_episodes_total{{model="{model}"}}', lambda v: v == 1) == 1
        total = BASELINE + IN_DIST + SHIFTED
        assert prom.wait_for(f'osprey_monitored_requests_total{{model="{model}"}}', lambda v: v == total) == total
        s = httpx.get(f"{srv.inference}/monitoring/{model}").json()
        scores = {r["metric"]["feature"]: float(r["value"][1])
                  for r in prom.query(f'osprey_drift_score{{model="{model}", version="1.0"}}')}
        assert scores == pytest.approx({f["name"]: f["score"] for f in s["drift"]["features"]})
        assert max(scores.values()) > 0.1
    assert prom.scalar('osprey_monitoring_degraded{model="clf_rest"}') == 0
