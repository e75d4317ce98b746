"""Issue 11 end to end: real ``osprey serve`` processes, a real Prometheus, a real redis-server.

Four servers start together for the module (``servers``): ``main`` serves small monitored
models (tests/monitoring_models.py: a TorchScript MLP over 3 classes, windows of 50, a
baseline of 100 requests, a training.json with held-out accuracy 0.95), ``off`` runs with the
server setting monitoring=false, ``a`` and ``b`` are replicas sharing one redis-server.

1. Each drift test sends 100 baseline requests, 120 in distribution (two windows: no
   episode), 150 moved by 2.5 sd (an episode opens) through one protocol: REST, gRPC OIP
   ModelInfer, TorchServe gRPC (a custom handler decoding the JSON bytes, as TorchServe
   handlers do); the JSON's shape; the drift families as Prometheus scrapes them.
2. Feedback by the id each protocol shows; live accuracy, then degraded; unmatched and
   invalid labels, the invalid ones named.
3. Replicas: one drift status and episode, labels joined across replicas, Redis down (200s,
   degraded, 503 for labels) and back (buffered rows and predictions caught up).
4. A hook that raises; 5. process instances; 6. monitoring off per model and per server;
7. ``osprey monitor report``.
Every wait is on state (GET /monitoring, /metrics, Prometheus, Redis), never a sleep.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import httpx
import numpy as np
import pytest
from google.protobuf import struct_pb2

from server.protocols.grpc.generated import inference_pb2, inference_pb2_grpc
from server.protocols.grpc.generated import osprey_monitoring_pb2 as mpb
from server.protocols.grpc.generated import osprey_monitoring_pb2_grpc as mpb_grpc

from tests.conftest import ROOT, OspreyProcess
from tests.gates import wait_until
from tests.models import handler_archive
from tests.monitoring_models import (CLASSES, classifier_archive, metric_lines, regressor_archive, rows,
                                     wait_monitoring)
from tests.oip_stubs import pb, pb_grpc
from tests.prometheus_helpers import PrometheusProcess
from tests.redis_server import RedisProcess

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


# The replicas' baseline is 60 rows of one replica (whichever gets there first) and their windows
# 50 rows interleaved from both, so which rows meet differs from run to run. On windows that
# small the chi-square test decides, at a false-alarm rate a window (small_window_alpha: 0.05
# then), and CI once saw both clean windows "drift". An episode here needs 3 drifted windows of 3: the
# two clean windows the test looks at cannot open one, whatever the test says of them, and the
# shifted rows close at least three drifted windows.
REPLICA_MONITORING = {"window": 50, "baseline_requests": 60, "components": 2, "min_labels": 40, "quality_window": 40,
                      "episode_windows": 3, "episode_drifted": 3}


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """Every server of the module, started at once (their start-ups overlap): ``main`` serves
    the monitored models; ``off`` runs with the server setting monitoring=false; ``a`` and ``b``
    are replicas of model ``clf`` on one redis-server, A told ``redis_url`` in its
    config.properties, B through OSPREY_REDIS_URL. Every server monitors in its own monitor
    process (the default, ``monitor_isolation=process``) but B, whose monitor is a thread of the
    server (OSPREY_MONITOR_ISOLATION=thread): the replicas' tests hold for both ways, and for
    two replicas that monitor differently sharing one state."""
    root = tmp_path_factory.mktemp("monitoring")
    store = root / "store"
    store.mkdir()
    for name in ("clf_rest", "clf_oip"):
        classifier_archive(store, name)
    classifier_archive(store, "clf_ts", json_handler=True)
    classifier_archive(store, "clf_proc", isolation="process")
    classifier_archive(store, "clf_off", monitoring={"enabled": False})
    classifier_archive(store, "clf", monitoring=REPLICA_MONITORING)
    classifier_archive(store, "clf_canary", version="2.0")  # registered beside 1.0 by the canary test
    (store / "clf_canary.mar").rename(store / "clf_canary2.mar")
    classifier_archive(store, "clf_canary")
    regressor_archive(store, "reg")
    handler_archive(store, "hookfail", HOOK_FAILS, config={"batchSize": 4, "maxBatchDelay": 5, "deviceType": "cpu",
                                                           "monitoring": {"window": 50, "baseline_requests": 100}})
    models = [f"{n}={n}.mar" for n in ("clf_rest", "clf_oip", "clf_ts", "clf_proc", "clf_off", "reg", "hookfail",
                                       "clf_canary")]
    redis = RedisProcess(root / "redis").start()
    plan = {"main": (models, {}),
            "off": (["clf=clf.mar"], {"config": {"monitoring": "false"}, "extra_args": ["--no-grpc"]}),
            "a": (["clf=clf.mar"], {"config": {"redis_url": redis.url}, "extra_args": ["--no-grpc"]}),
            "b": (["clf=clf.mar"], {"env": {"OSPREY_REDIS_URL": redis.url, "OSPREY_MONITOR_ISOLATION": "thread"},
                                    "extra_args": ["--no-grpc"]})}
    started = {}
    try:
        for name, (names, kwargs) in plan.items():
            (root / name).mkdir()
            started[name] = OspreyProcess(root / name, store, names, **kwargs)
        for proc in started.values():
            proc.wait_ready(120)
        yield started, redis
    finally:
        for proc in started.values():  # SIGTERM to all first: their drains overlap
            if proc.proc.poll() is None:
                proc.proc.send_signal(signal.SIGTERM)
        for proc in started.values():
            try:
                proc.proc.wait(10)
            except subprocess.TimeoutExpired:
                pass
            proc.stop()
        redis.stop()


@pytest.fixture(scope="module")
def srv(servers):
    return servers[0]["main"]


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
            tensor = {"name": "INPUT0", "datatype": "FP32", "shape": [1, 16], "data": row.tolist()}
            r = c.post(f"/v2/models/{model}/infer", json={"inputs": [tensor]})
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


# --- 2. feedback joined by the id the client saw -------------------------------------------------------
def _post_feedback(srv, model: str, items) -> httpx.Response:
    return httpx.post(f"{srv.inference}/feedback/{model}", json=items, timeout=30)


def test_rest_feedback_gives_live_accuracy_and_corrupted_labels_degrade_it(srv, prom):
    sent = SENT["clf_rest"]  # in-distribution answers: (x-request-id, predicted class)
    right = [{"request_id": rid, "label": cls} for rid, cls in sent[:40]]
    r = _post_feedback(srv, "clf_rest", right)
    assert r.status_code == 200 and r.json() == {"accepted": 40, "unmatched": 0, "invalid": 0}, r.text
    q = httpx.get(f"{srv.inference}/monitoring/clf_rest").json()["quality"]
    assert q["labels"] == 40 and q["metrics"]["accuracy"] == 1.0 and q["degraded"] is False
    assert {"f1", "precision", "recall", "log_loss"} <= set(q["metrics"])
    # 30% of the next window's labels corrupted (another class): accuracy 0.7 < 0.95 - 0.05
    corrupted = [{"request_id": rid, "label": (cls + 1) % CLASSES if i % 10 < 3 else cls}
                 for i, (rid, cls) in enumerate(sent[40:80])]
    r = _post_feedback(srv, "clf_rest", {"feedback": corrupted})
    assert r.status_code == 200 and r.json()["accepted"] == 40
    q = httpx.get(f"{srv.inference}/monitoring/clf_rest").json()["quality"]
    assert q["labels"] == 80 and q["metrics"]["accuracy"] == pytest.approx(0.7)
    assert q["degraded"] is True
    assert {"metric": "accuracy", "value": pytest.approx(0.7), "baseline": 0.95, "limit": 0.9} in q["degraded_metrics"]
    assert prom.wait_for('osprey_quality_degraded{model="clf_rest"}', lambda v: v == 1) == 1
    assert prom.wait_for('osprey_quality{model="clf_rest", metric="accuracy"}', lambda v: v < 0.8) == pytest.approx(0.7)
    assert prom.wait_for('osprey_feedback_total{model="clf_rest", result="matched"}', lambda v: v == 80) == 80


def test_duplicates_and_unknown_ids_are_unmatched_wrong_labels_invalid_and_named(srv):
    sent = SENT["clf_rest"]
    (dup, dup_cls), (a, _), (b, _), (c, c_cls), (d, d_cls) = sent[0], sent[90], sent[91], sent[92], sent[93]
    r = _post_feedback(srv, "clf_rest", [
        {"request_id": dup, "label": dup_cls},  # labelled in the test above: unmatched
        {"request_id": "no-such-request", "label": 1},  # unknown: unmatched
        {"request_id": a, "label": "cat"},  # not a class: invalid
        {"request_id": b, "label": 7},  # 3 classes: invalid
        {"request_id": c, "label": c_cls},  # accepted ...
        {"request_id": c, "label": c_cls},  # ... once: the second is unmatched
    ])
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["accepted"], body["unmatched"], body["invalid"]) == (1, 3, 2)
    assert body["unmatched_ids"] == [dup, "no-such-request", c], body  # which labels to look into
    assert any(e.startswith(f"feedback[2] (request_id '{a}')") and "'cat'" in e for e in body["errors"]), body
    assert any(e.startswith(f"feedback[3] (request_id '{b}')") and "7" in e for e in body["errors"]), body
    # every item invalid: 400 naming it, the counts in the body; the prediction is not used up
    r = _post_feedback(srv, "clf_rest", [{"request_id": d, "label": "dog"}])
    assert r.status_code == 400 and f"feedback[0] (request_id '{d}')" in r.json()["message"], r.text
    assert _post_feedback(srv, "clf_rest", {"request_id": d, "label": d_cls}).json()["accepted"] == 1
    q = httpx.get(f"{srv.inference}/monitoring/clf_rest").json()["quality"]
    assert (q["labels"], q["unmatched"], q["invalid"]) == (82, 3, 3)
    assert metric_lines(srv.metrics, "osprey_feedback_total", "clf_rest") == {
        f'{{model="clf_rest",version="1.0",result="{result}"}}': n
        for result, n in (("matched", 82.0), ("unmatched", 3.0), ("invalid", 3.0))}

    # a regression: a string, or a list for its one value, is the wrong type
    ids = [rid for rid, _ in send_rest(srv.inference, "reg", rows(5, seed=9))]
    wait_monitoring(srv.inference, "reg", _requests(5))
    r = _post_feedback(srv, "reg", [{"request_id": ids[0], "label": "tall"}, {"request_id": ids[1], "label": [1, 2]},
                                     {"request_id": ids[2], "label": 0.25}])
    assert r.status_code == 200 and (r.json()["accepted"], r.json()["invalid"]) == (1, 2), r.text
    assert "feedback[0]" in r.json()["errors"][0] and "regression" in r.json()["errors"][0]
    assert "feedback[1]" in r.json()["errors"][1] and "one value" in r.json()["errors"][1]


def test_feedback_by_oip_ids_rest_v2_and_grpc_metadata(srv, channel):
    before = httpx.get(f"{srv.inference}/monitoring/clf_oip").json()["requests"]
    v2 = send_rest_v2(srv.inference, "clf_oip", rows(10, seed=4))  # the OIP response id (= x-request-id)
    wait_monitoring(srv.inference, "clf_oip", _requests(before + 10))
    r = _post_feedback(srv, "clf_oip", [{"request_id": rid, "label": cls} for rid, cls in v2])
    assert r.json() == {"accepted": 10, "unmatched": 0, "invalid": 0}, r.text

    stub = mpb_grpc.MonitoringStub(channel)

    def items(pairs):
        return [mpb.FeedbackItem(request_id=rid, label=struct_pb2.Value(number_value=cls)) for rid, cls in pairs]

    # gRPC OIP answers: the response id (equal to the trailing x-request-id, checked when sent)
    resp = stub.Feedback(mpb.FeedbackRequest(model_name="clf_oip", items=items(SENT["clf_oip"][:5]) + [
        mpb.FeedbackItem(request_id=SENT["clf_oip"][5][0], label=struct_pb2.Value(string_value="cat"))]), timeout=10)
    assert (resp.accepted, resp.unmatched, resp.invalid) == (5, 0, 1)
    assert resp.errors[0].startswith(f"feedback[5] (request_id '{SENT['clf_oip'][5][0]}')")
    # TorchServe gRPC answers: x-request-id in trailing metadata
    resp = stub.Feedback(mpb.FeedbackRequest(model_name="clf_ts", model_version="1.0",
                                             items=items(SENT["clf_ts"][:7])), timeout=10)
    assert (resp.accepted, resp.unmatched, resp.invalid) == (7, 0, 0)
    resp = stub.Feedback(mpb.FeedbackRequest(model_name="clf_ts", model_version="1.0",
                                             items=items(SENT["clf_ts"][:1] + [("no-such-request", 1)])), timeout=10)
    assert (resp.accepted, resp.unmatched, list(resp.unmatched_ids)) == (0, 2, [SENT["clf_ts"][0][0], "no-such-request"])
    assert httpx.get(f"{srv.inference}/monitoring/clf_oip").json()["quality"]["labels"] == 15
    assert httpx.get(f"{srv.inference}/monitoring/clf_ts").json()["quality"]["labels"] == 7


def test_stream_predictions2_answers_have_ids_from_the_initial_metadata(srv, channel):
    """TorchServe's PredictionResponse has no id field: the call's initial metadata holds
    x-request-id-base, answer k is request BASE-k, and feedback joins on those ids."""
    before = httpx.get(f"{srv.inference}/monitoring/clf_ts").json()
    data = rows(4, seed=31)
    requests = [inference_pb2.PredictionsRequest(model_name="clf_ts", input={"body": json.dumps(r.tolist()).encode()})
                for r in data]
    requests.insert(2, inference_pb2.PredictionsRequest(model_name="nope", input={"body": b"[]"}))
    call = inference_pb2_grpc.InferenceAPIsServiceStub(channel).StreamPredictions2(iter(requests), timeout=30)
    base = dict(call.initial_metadata())["x-request-id-base"]
    replies = list(call)
    ids = [f"{base}-{k}" for k in range(len(replies))]
    assert len(replies) == 5 and base, replies
    # a second stream has another base
    again = inference_pb2_grpc.InferenceAPIsServiceStub(channel).StreamPredictions2(iter(requests[:1]), timeout=30)
    assert dict(again.initial_metadata())["x-request-id-base"] != base and len(list(again)) == 1
    assert replies[2].status.code == grpc.StatusCode.NOT_FOUND.value[0] and "nope" in replies[2].status.message
    answered = [(rid, int(np.argmax(json.loads(r.prediction)))) for rid, r in zip(ids, replies) if rid != ids[2]]
    wait_monitoring(srv.inference, "clf_ts", _requests(before["requests"] + 4))
    r = _post_feedback(srv, "clf_ts", [{"request_id": rid, "label": cls} for rid, cls in answered])
    assert r.json() == {"accepted": 4, "unmatched": 0, "invalid": 0}, r.text
    r = _post_feedback(srv, "clf_ts", {"request_id": ids[2], "label": 1})  # refused: nothing to join
    assert r.json()["unmatched"] == 1, r.text


def test_a_request_of_several_rows_takes_one_label_per_row(srv):
    """One OIP request holding 3 rows: its id joins a list of 3 labels, each to its own row's
    prediction (live quality counts rows); one label alone is invalid, naming what it held."""
    data = rows(3, seed=21)
    tensor = {"name": "INPUT0", "datatype": "FP32", "shape": [3, 16], "data": data.ravel().tolist()}
    before = httpx.get(f"{srv.inference}/monitoring/clf_oip").json()
    r = httpx.post(f"{srv.inference}/v2/models/clf_oip/infer", json={"inputs": [tensor]}, timeout=30)
    assert r.status_code == 200, r.text
    rid, out = r.json()["id"], r.json()["outputs"][0]
    assert out["shape"] == [3, CLASSES]
    predicted = np.argmax(np.asarray(out["data"]).reshape(3, CLASSES), axis=1).tolist()
    wait_monitoring(srv.inference, "clf_oip", _requests(before["requests"] + 3))
    r = _post_feedback(srv, "clf_oip", [{"request_id": rid, "label": predicted[0]}])
    assert r.status_code == 400 and "its request held 3 examples; send a list of 3 labels" in r.json()["message"], r.text
    wrong = (predicted[2] + 1) % CLASSES
    r = _post_feedback(srv, "clf_oip", [{"request_id": rid, "label": predicted[:2] + [wrong]}])
    assert r.json() == {"accepted": 1, "unmatched": 0, "invalid": 0}, r.text
    q = httpx.get(f"{srv.inference}/monitoring/clf_oip").json()["quality"]
    assert q["labels"] == before["quality"]["labels"] + 1  # requests labelled
    assert q["window"]["labels"] == before["quality"]["window"]["labels"] + 3  # rows judged


def test_a_label_sent_without_a_version_joins_the_version_that_answered(srv):
    """A canary split: the client cannot tell which version answered, so a label without a
    version joins the version whose prediction it is, and each version's live quality counts
    its own; a label for an id no version answered stays unmatched."""
    r = httpx.post(f"{srv.management}/models", params={"url": "clf_canary2.mar"}, timeout=120)
    assert r.status_code == 200, r.text
    r = httpx.put(f"{srv.management}/models/clf_canary/traffic", json={"weights": {"1.0": 50, "2.0": 50}}, timeout=30)
    assert r.status_code == 200, r.text
    sent = send_rest(srv.inference, "clf_canary", rows(40, seed=31))
    wait_monitoring(srv.inference, "clf_canary", lambda s: True)
    counted = lambda: sum(httpx.get(f"{srv.inference}/monitoring/clf_canary/{v}").json()["requests"]  # noqa: E731
                          for v in ("1.0", "2.0"))
    wait_until(lambda: counted() >= 40, what="both versions' monitors saw the 40 answers")
    items = [{"request_id": rid, "label": cls} for rid, cls in sent] + [{"request_id": "nobody", "label": 0}]
    r = _post_feedback(srv, "clf_canary", items)
    assert r.status_code == 200 and r.json() == {"accepted": 40, "unmatched": 1, "invalid": 0,
                                                 "unmatched_ids": ["nobody"]}, r.text
    labels = {v: httpx.get(f"{srv.inference}/monitoring/clf_canary/{v}").json()["quality"]["labels"]
              for v in ("1.0", "2.0")}
    assert labels["1.0"] + labels["2.0"] == 40 and min(labels.values()) > 0, labels  # binomial(40, 1/2)
    assert httpx.get(f"{srv.inference}/monitoring/clf_canary/2.0").json()["quality"]["metrics"]["accuracy"] == 1.0


# --- 4. a broken monitoring hook ---------------------------------------------------------------------
def test_a_failing_monitoring_hook_leaves_predictions_alone(srv):
    data = np.random.default_rng(5).normal(size=(30, 3)).tolist()
    with httpx.Client(base_url=srv.inference, timeout=30) as c:
        answers = _pool(lambda row: c.post("/predictions/hookfail", json=row), data)
    assert [a.status_code for a in answers] == [200] * 30
    for row, a in zip(data, answers):
        e = np.exp(row)
        assert a.json() == pytest.approx((e / e.sum()).tolist(), rel=1e-5)
    s = wait_monitoring(srv.inference, "hookfail", lambda s: s["degraded"] is not None)
    assert "monitoring hook failed: RuntimeError: the hook is broken" in s["degraded"]
    assert metric_lines(srv.metrics, "osprey_monitoring_degraded", "hookfail") == {
        '{model="hookfail",version="1.0"}': 1.0}
    assert srv.log().count("the hook is broken (logged once") == 1, srv.log()[-3000:]


# --- 5. process-isolated instances feed the monitor ------------------------------------------------
def test_process_isolated_instances_feed_the_monitor(srv):
    sent = send_rest(srv.inference, "clf_proc", rows(60, seed=6))
    s = wait_monitoring(srv.inference, "clf_proc", _requests(60))
    assert s["requests"] == 60 and s["baseline_progress"] == {"rows": 60, "needed": BASELINE}
    assert s["degraded"] is None
    r = _post_feedback(srv, "clf_proc", [{"request_id": rid, "label": cls} for rid, cls in sent[:3]])
    assert r.json() == {"accepted": 3, "unmatched": 0, "invalid": 0}
    assert metric_lines(srv.metrics, "osprey_monitored_requests_total", "clf_proc") == {
        '{model="clf_proc",version="1.0"}': 60.0}


# --- 6. monitoring off -------------------------------------------------------------------------------
def test_monitoring_off_in_model_config(srv):
    send_rest(srv.inference, "clf_off", rows(20, seed=7))
    for r in (httpx.get(f"{srv.inference}/monitoring/clf_off"),
              _post_feedback(srv, "clf_off", {"request_id": "x", "label": 1})):
        assert r.status_code == 404 and "monitoring is off for model clf_off" in r.json()["message"], r.text
    assert metric_lines(srv.metrics, "osprey_monitored_requests_total", "clf_off") == {}
    assert metric_lines(srv.metrics, "osprey_drift_detected", "clf_off") == {}


def test_monitoring_off_on_the_server(servers):
    server = servers[0]["off"]
    send_rest(server.inference, "clf", rows(20, seed=8))
    for r in (httpx.get(f"{server.inference}/monitoring/clf"),
              _post_feedback(server, "clf", {"request_id": "x", "label": 1})):
        assert r.status_code == 503 and "monitoring is off on this server" in r.json()["message"], r.text
    assert httpx.get(f"{server.inference}/monitoring/nope").status_code == 404
    text = httpx.get(f"{server.metrics}/metrics").text
    assert "osprey_requests_total" in text and "osprey_monitored_requests_total" not in text
    assert "osprey_drift" not in text and "osprey_feedback_total" not in text


# --- 7. the report --------------------------------------------------------------------------------
def test_monitor_report_writes_the_page_and_plots(srv, prom, tmp_path):
    out = tmp_path / "report"
    done = subprocess.run([sys.executable, "-m", "server.cli", "monitor", "report", "clf_rest", "--url", srv.inference,
                           "--out", str(out), "--prometheus", prom.url, "--since", "10m"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "MPLBACKEND": "Agg"})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("index.html") and (out / "index.html").is_file()
    page = (out / "index.html").read_text()
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert {"drift-windows.png", "quality-windows.png", "drift-prometheus.png", "quality-prometheus.png"} <= set(pngs)
    features = [p for p in pngs if p.startswith("feature-")]
    assert features and all(p in page for p in pngs)
    for p in pngs:
        assert (out / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "clf_rest" in page and "embedding[" in page


# --- 3. two replicas sharing one real redis-server ---------------------------------------------------
@pytest.fixture(scope="module")
def replicas(servers):
    started, redis = servers
    return redis, started["a"], started["b"]


def _local_rows(server) -> float:
    return metric_lines(server.metrics, "osprey_monitored_requests_total", "clf").get(
        '{model="clf",version="1.0"}', 0.0)


def _split(a, b, data: np.ndarray) -> tuple[list, list]:
    """Half the rows to each replica at the same time; waits until each replica monitored its
    rows (its own osprey_monitored_requests_total), which also puts its predictions in Redis."""
    before = _local_rows(a), _local_rows(b)
    with ThreadPoolExecutor(2) as pool:
        fa = pool.submit(send_rest, a.inference, "clf", data[0::2])
        fb = pool.submit(send_rest, b.inference, "clf", data[1::2])
        sent_a, sent_b = fa.result(), fb.result()
    for server, start, n in ((a, before[0], len(sent_a)), (b, before[1], len(sent_b))):
        deadline = time.monotonic() + 30
        while _local_rows(server) < start + n:
            assert time.monotonic() < deadline, f"{server.inference} monitored {_local_rows(server)} of {start + n}"
            time.sleep(0.05)
    return sent_a, sent_b


def _both(a, b, predicate, what: str) -> tuple[dict, dict]:
    return (wait_monitoring(a.inference, "clf", predicate, what=f"{what} (replica A)"),
            wait_monitoring(b.inference, "clf", predicate, what=f"{what} (replica B)"))


def test_a_replica_monitors_in_a_process_of_its_own_by_default_and_b_in_a_thread(replicas):
    """The default (A) starts the monitor process, osprey-monitord; B's setting keeps its
    monitor a thread of the server."""
    import psutil

    def monitor_children(server) -> list[str]:
        return [c.name() for c in psutil.Process(server.proc.pid).children() if c.name() == "osprey-monitord"]

    _, a, b = replicas
    deadline = time.monotonic() + 30
    while not monitor_children(a):  # (started beside the server's start-up)
        assert time.monotonic() < deadline, "A started no monitor process"
        time.sleep(0.05)
    assert monitor_children(a) == ["osprey-monitord"] and monitor_children(b) == []


def test_replicas_show_one_drift_status_and_one_episode(replicas):
    redis, a, b = replicas
    _split(a, b, rows(130, seed=11))  # both replicas past the baseline of 60: one shared profile
    _split(a, b, rows(120, seed=12))
    sa, sb = _both(a, b, lambda s: s["windows"] >= 2, "two windows")
    for s in (sa, sb):
        assert s["reference"] == "baseline" and s["degraded"] is None
        assert s["drift"]["episode"] is None and s["drift"]["episodes"] == 0, s["history"]
    closed = sa["windows"]
    _split(a, b, rows(200, seed=13, shift=SHIFT))  # clean rows left in the open window + 3 shifted windows
    # one drift status: both replicas read the same windows, history and episode from Redis
    deadline = time.monotonic() + 30
    while True:
        sa, sb = (httpx.get(f"{s.inference}/monitoring/clf").json() for s in (a, b))
        if (sa["drift"]["detected"] and sa["windows"] >= closed + 2 and sa["windows"] == sb["windows"]
                and sa["history"] == sb["history"] and sa["drift"] == sb["drift"]):
            break
        assert time.monotonic() < deadline, (closed, sa["windows"], sb["windows"], sa["drift"]["episode"],
                                             sb["drift"]["episode"])
        time.sleep(0.05)
    assert sa["drift"]["episode"]["open"] and sa["drift"]["episodes"] == 1
    # windows are closed once, by whichever replica's rows filled them
    assert [h["window"] for h in sa["history"]] == list(range(1, sa["windows"] + 1))
    for server in (a, b):
        assert metric_lines(server.metrics, "osprey_drift_detected", "clf") == {'{model="clf",version="1.0"}': 1.0}
        assert metric_lines(server.metrics, "osprey_drift_episodes_total", "clf") == {
            '{model="clf",version="1.0"}': 1.0}


def test_a_label_sent_to_one_replica_joins_a_prediction_made_on_the_other(replicas):
    redis, a, b = replicas
    sent_a, sent_b = _split(a, b, rows(20, seed=14))
    r = _post_feedback(b, "clf", [{"request_id": rid, "label": cls} for rid, cls in sent_a])  # A's, to B
    assert r.json() == {"accepted": 10, "unmatched": 0, "invalid": 0}, r.text
    r = _post_feedback(a, "clf", [{"request_id": rid, "label": cls} for rid, cls in sent_b + sent_a[:2]])
    assert r.json() == {"accepted": 10, "unmatched": 2, "invalid": 0,  # A's own: joined on B already
                        "unmatched_ids": [rid for rid, _ in sent_a[:2]]}, r.text
    qa, qb = (httpx.get(f"{s.inference}/monitoring/clf").json()["quality"] for s in (a, b))
    assert qa["labels"] == qb["labels"] == 20 and qa["unmatched"] == qb["unmatched"] == 2
    assert qa["store"] == "redis"


def test_redis_down_serving_goes_on_monitoring_degraded_then_catches_up(replicas):
    import redis as redis_py

    redis, a, b = replicas
    redis.stop()
    outage_a, outage_b = _split(a, b, rows(40, seed=15))  # every answer a 200 (send_rest checks)
    for s in _both(a, b, lambda s: s["degraded"] is not None, "degraded"):
        assert "Redis" in s["degraded"], s["degraded"]
    r = _post_feedback(b, "clf", {"request_id": outage_a[0][0], "label": outage_a[0][1]})
    assert r.status_code == 503 and "unavailable" in r.json()["message"], r.text
    assert metric_lines(a.metrics, "osprey_monitoring_degraded", "clf") == {'{model="clf",version="1.0"}': 1.0}

    redis.start()  # the same port, empty (no persistence): the replicas send what they kept
    client = redis_py.Redis.from_url(redis.url)
    deadline = time.monotonic() + 30
    while int(client.get("osprey:mon:clf:1.0:requests") or 0) < 40:  # the 40 rows served while it was down
        assert time.monotonic() < deadline, client.get("osprey:mon:clf:1.0:requests")
        time.sleep(0.05)
    # B's status sees the shared prediction log: A's 20 predictions arrive there without any
    # request or status call on A (its monitor's background thread flushes them)
    wait_monitoring(b.inference, "clf", lambda s: s["degraded"] is None and s["quality"]["predictions_kept"] == 40,
                    what="B not degraded, 40 predictions kept in Redis")
    # the predictions made while Redis was down are joined, whichever replica gets the label
    r = _post_feedback(b, "clf", [{"request_id": rid, "label": cls} for rid, cls in outage_a + outage_b])
    assert r.json() == {"accepted": 40, "unmatched": 0, "invalid": 0}, r.text
    wait_monitoring(a.inference, "clf", lambda s: s["degraded"] is None, what="A not degraded")
    # and the buffered rows count in the next window: 40 + 20 new rows close one
    _split(a, b, rows(20, seed=16))
    sa, sb = _both(a, b, lambda s: s["windows"] >= 1, "a window")
    assert sa["windows"] == sb["windows"] == 1 and sa["history"][0]["features"]
    client.close()
