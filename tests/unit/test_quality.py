"""Live quality (monitoring/quality): the label join by request id (late, twice, unknown,
wrong type), the metrics against scikit-learn, the degraded judgement, the baseline, the
confidence estimate, the Prometheus lines, and the Redis store against a real redis-server
(two replicas sharing one Redis; Redis down and back)."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import subprocess
import sys

from scipy.stats import rankdata
from sklearn.metrics import (accuracy_score, f1_score, log_loss, mean_absolute_error, mean_squared_error,
                             precision_recall_fscore_support, r2_score, roc_auc_score)

from monitoring.quality import QualityMonitor, RedisStore, load_baseline, quality_factory, render_many
from monitoring.quality.metrics import binary_auc, classification_metrics, judge, macro_prf, ranks, regression_metrics
from server.core.capture import FeedbackItem, Observation
from server.core.errors import ErrorKind, OspreyError
from server.core.model_config import MonitoringConfig

from tests.redis_server import redis_server  # noqa: F401  (fixture)

CLASSES = ("cat", "dog", "bird")


class Clock:
    def __init__(self, t: float = 1_000_000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def obs(ids, outputs, task="classification", classes=CLASSES, t=None, requests=None):
    return Observation("m", "1", list(ids), t if t is not None else time.time(), task=task,
                       outputs=np.asarray(outputs, dtype=np.float32), classes=classes,
                       request_rows=None if requests is None else np.asarray(requests))


def items(pairs, start=0):
    return [FeedbackItem(rid, label, start + i) for i, (rid, label) in enumerate(pairs)]


def probs(n, classes=3, seed=0, sharp=1.0):
    rng = np.random.default_rng(seed)
    return rng.dirichlet([sharp] * classes, size=n).astype(np.float32)


def monitor(**kw) -> QualityMonitor:
    config = MonitoringConfig(**{k: kw.pop(k) for k in list(kw) if hasattr(MonitoringConfig, k)})
    return QualityMonitor("m", "1", config, **kw)


# --- the join --------------------------------------------------------------------------
def test_labels_join_by_request_id_by_class_name_or_index():
    q = monitor()
    q.record(obs(["a", "b", "c"], probs(3)))
    r = q.feedback(items([("a", "dog"), ("b", 2), ("c", 0.0)]))
    assert (r.accepted, r.unmatched, r.invalid, r.errors) == (3, 0, 0, [])
    assert r.as_dict() == {"accepted": 3, "unmatched": 0, "invalid": 0}


def test_unknown_twice_and_late_labels_are_unmatched_never_fatal():
    clock = Clock()
    q = monitor(feedback_ttl=60.0, clock=clock)
    q.record(obs(["a", "b", "c"], probs(3), t=clock.t))
    r = q.feedback(items([("a", "cat"), ("a", "cat"), ("nope", "cat")]))
    assert (r.accepted, r.unmatched, r.invalid) == (1, 2, 0)  # twice in one request, unknown id
    assert q.feedback(items([("a", "dog")])).unmatched == 1  # already labelled
    clock.t += 61  # past feedback_ttl
    r = q.feedback(items([("b", "cat"), ("c", "cat")]))
    assert (r.accepted, r.unmatched) == (0, 2)
    st = q.status()
    assert (st["labels"], st["unmatched"], st["invalid"]) == (1, 5, 0)


def test_wrong_type_labels_are_invalid_naming_the_item_and_keep_the_prediction():
    q = monitor()
    q.record(obs(["a", "b", "c", "d"], probs(4)))
    r = q.feedback(items([("a", "zebra"), ("b", 7), ("c", 1.5), ("d", [1, 2])], start=10))
    assert (r.accepted, r.unmatched, r.invalid) == (0, 0, 4)
    assert r.errors[0].startswith("feedback[10] (request_id 'a'): label 'zebra' is not a class") and "'bird'" in r.errors[0]
    assert "feedback[11]" in r.errors[1] and "3 classes" in r.errors[1]
    assert "feedback[12]" in r.errors[2] and "whole number" in r.errors[2]
    assert "feedback[13]" in r.errors[3] and "list" in r.errors[3]
    assert q.feedback(items([("a", "cat")])).accepted == 1  # an invalid label does not use the prediction up

    reg = monitor()
    reg.record(obs(["x", "y", "z"], [1.0, 2.0, 3.0], task="regression", classes=None))
    r = reg.feedback(items([("x", "high"), ("y", True), ("z", 2.5)]))
    assert (r.accepted, r.invalid) == (1, 2)
    assert "is a string; this model is a regression" in r.errors[0]
    assert "feedback[1] (request_id 'y')" in r.errors[1]

    # a huge but finite label would overflow the window's squared errors (mse and r2 lost for
    # every label in it): refused by name, and the window's metrics stay numbers
    big = monitor()
    big.record(obs(["p", "q", "r", "s"], [1.0, 2.0, 3.0, 4.0], task="regression", classes=None))
    r = big.feedback(items([("p", 1e200), ("q", -3.5e38), ("r", 3.0e38), ("s", 2.0)]))
    assert (r.accepted, r.invalid) == (2, 2)
    assert "feedback[0] (request_id 'p'): label 1e+200 is out of range" in r.errors[0] and "float32" in r.errors[0]
    assert "feedback[1] (request_id 'q')" in r.errors[1]
    assert all(isinstance(v, float) for v in big.status()["metrics"].values())


def test_a_request_of_several_examples_is_labelled_with_one_label_per_example():
    """A request holding several records (texts, images) gives the capture several rows with
    its one id: the log keeps them all under that id, and a list of as many labels joins each
    example to its own prediction (live quality counts examples); any other label is invalid,
    naming the request and what it held."""
    q = monitor(min_labels=1, quality_window=10)
    out = np.array([[0.8, 0.1, 0.1], [0.1, 0.8, 0.1], [0.1, 0.1, 0.8],  # request "multi": 3 examples
                    [0.7, 0.2, 0.1],                                   # request "one"
                    [0.2, 0.7, 0.1], [0.2, 0.1, 0.7]], dtype=np.float32)  # request "pair": 2 examples
    q.record(obs(["multi", "multi", "multi", "one", "pair", "pair"], out, requests=[0, 0, 0, 1, 2, 2]))
    assert q.status()["predictions_kept"] == 3
    r = q.feedback(items([("multi", ["cat", "dog", "cat"]), ("one", ["cat"]), ("pair", "dog")], start=5))
    assert (r.accepted, r.unmatched, r.invalid) == (2, 0, 1)
    assert r.errors == ["feedback[7] (request_id 'pair'): its request held 2 examples; send a list of 2 labels, "
                        "one per example"]
    st = q.status()
    assert st["labels"] == 2 and st["window"]["labels"] == 4  # two requests, four examples judged
    assert st["metrics"]["accuracy"] == pytest.approx(3 / 4)  # the third example of "multi" was a dog
    r = q.feedback(items([("pair", ["dog"]), ("pair", ["dog", "lion"])]))
    assert (r.accepted, r.invalid) == (0, 2)
    assert "its request held 2 examples; the label is a list of 1" in r.errors[0]
    assert "example 1: label 'lion' is not a class" in r.errors[1]
    assert q.feedback(items([("pair", ["dog", "bird"])])).accepted == 1  # the invalid ones did not use it up
    assert q.status()["window"]["labels"] == 6

    reg = monitor(min_labels=1)
    reg.record(obs(["a", "a", "b"], [1.0, 2.0, 3.0], task="regression", classes=None, requests=[0, 0, 1]))
    r = reg.feedback(items([("a", [1.5, 2.0]), ("b", 3.0)]))
    assert (r.accepted, r.invalid) == (2, 0)
    assert reg.status()["metrics"]["mae"] == pytest.approx(0.5 / 3, abs=1e-6)

    # a regression with two outputs: a request of two examples takes a list of two lists
    two = monitor(min_labels=1)
    two.record(obs(["p", "p"], [[1.0, 2.0], [3.0, 4.0]], task="regression", classes=None, requests=[0, 0]))
    assert two.feedback(items([("p", [[1.0, 2.0], [3.0, 5.0]])])).accepted == 1
    from server.protocols.rest.monitoring import parse_feedback
    assert parse_feedback(b'[{"request_id": "p", "label": [[1, 2], [3, 4]]}]')[0].label == [[1, 2], [3, 4]]

    # two requests that carried one id (a client's own OIP id): the newer one's prediction is kept
    dup = monitor(min_labels=1)
    dup.record(obs(["same", "same"], [[0.9, 0.05, 0.05], [0.05, 0.9, 0.05]], requests=[0, 1]))
    assert dup.feedback(items([("same", "dog")])).accepted == 1
    assert dup.status()["metrics"]["accuracy"] == 1.0


def test_several_examples_join_through_redis_on_another_replica(redis_server):  # noqa: F811
    a, b = _replica(redis_server.url, min_labels=1), _replica(redis_server.url, min_labels=1)
    a.record(obs(["m", "m", "s"], probs(3), requests=[0, 0, 1]))
    r = b.feedback(items([("m", ["cat", "bird"]), ("s", "dog")]))
    assert (r.accepted, r.invalid) == (2, 0)
    assert b.status()["window"]["labels"] == 3


def test_classes_unknown_labels_by_index_and_binary_booleans():
    q = monitor()
    q.record(obs(["a", "b", "c"], probs(3, classes=2), classes=None))
    r = q.feedback(items([("a", 1), ("b", "0"), ("c", True)]))
    assert r.accepted == 3
    q.record(obs(["d"], probs(1, classes=2), classes=None))
    assert q.feedback(items([("d", 2)])).invalid == 1


def test_the_prediction_log_is_bounded_oldest_first():
    q = monitor(max_predictions=100)
    for k in range(5):
        q.record(obs([f"r{k}-{i}" for i in range(50)], probs(50, seed=k)))
    assert q.status()["predictions_kept"] == 100
    r = q.feedback(items([("r0-0", "cat"), ("r4-49", "cat"), ("r3-0", "cat")]))
    assert (r.accepted, r.unmatched) == (2, 1)


def test_outputs_without_a_task_to_judge_are_not_kept():
    q = monitor()
    q.record(Observation("m", "1", ["a"], time.time(), task="autoencoder", outputs=np.array([0.1])))
    q.record(Observation("m", "1", ["b"], time.time(), task="classification", outputs=None))
    q.record(Observation("m", "1", ["c"], time.time(), error="hook failed"))
    r = q.feedback(items([("a", 1), ("b", 1), ("c", 1)]))
    assert r.unmatched == 3
    # said why, not only "unmatched" as for an unknown id
    assert r.errors == ["model m version 1 keeps no predictions for labels: its outputs (autoencoder) are not "
                        "classes or values a label can be compared with, so live quality is not measured "
                        "(labels still become training rows where retraining is on)"]


def test_labels_for_unsampled_predictions_say_the_sample_rate():
    q = monitor(sample_rate=0.2)
    q.record(obs(["kept"], probs(1)))
    r = q.feedback(items([("kept", "cat"), ("not-sampled", "dog")]))
    assert (r.accepted, r.unmatched) == (1, 1)
    assert r.errors == ["monitoring.sample_rate is 0.2 for model m version 1: only the sampled share of predictions "
                        "is kept for labels, the others' labels count as unmatched"]
    assert monitor().feedback(items([("nope", "cat")])).errors == []  # at 1.0: an unknown id is just unmatched


def test_a_generator_is_judged_on_the_class_viewers_recognise_in_its_samples(tmp_path):
    """Task generator: the kept prediction is the asked class (one-hot); a label is the class a
    viewer recognised; quality is accuracy / precision / recall / F1 of recognised vs asked,
    against the archive's judged_accuracy as the accuracy baseline."""
    (tmp_path / "training.json").write_text(json.dumps({"heldout_metrics": {
        "judged_accuracy": 0.99, "reconstruction_mse": 0.03}}))
    q = quality_factory("m", "1", MonitoringConfig(min_labels=10, quality_window=20), tmp_path, "")
    assert q.baseline == {"accuracy": 0.99}
    asked = np.arange(20) % 10
    q.record(obs([f"g{i}" for i in range(20)], np.eye(10, dtype=np.float32)[asked], task="generator", classes=None))
    recognised = np.where(asked == 8, 3, asked)  # every "8" asked for looks like a "3"
    r = q.feedback(items([(f"g{i}", str(recognised[i]) if i % 2 else int(recognised[i])) for i in range(20)]
                         + [("g0", 4)]))
    assert (r.accepted, r.unmatched, r.invalid) == (20, 1, 0)
    bad = q.feedback(items([("nope", "eight")]))
    assert bad.unmatched == 1
    st = q.status()
    assert st["task"] == "generator" and set(st["metrics"]) == {"accuracy", "precision", "recall", "f1"}
    assert st["metrics"]["accuracy"] == pytest.approx(0.9)
    assert st["metrics"]["f1"] == pytest.approx(f1_score(recognised, asked, average="macro"), abs=1e-6)
    assert st["degraded"] is True and st["degraded_metrics"][0]["metric"] == "accuracy"
    assert st["estimated"] is None  # one-hot asked classes are no confidence


def test_a_generator_label_that_is_not_a_class_is_invalid():
    q = monitor()
    q.record(obs(["a", "b"], np.eye(10, dtype=np.float32)[[3, 5]], task="generator", classes=None))
    r = q.feedback(items([("a", 12), ("b", "five")]))
    assert (r.accepted, r.invalid) == (0, 2)
    assert "label 12 is not a class of this model: it has 10 classes" in r.errors[0]


# --- metrics and the judgement ---------------------------------------------------------
def test_classification_metrics_match_scikit_learn():
    p = probs(400, classes=4, seed=3, sharp=0.5)
    rng = np.random.default_rng(1)
    y = np.where(rng.random(400) < 0.7, p.argmax(axis=1), rng.integers(0, 4, 400))
    m = classification_metrics(y, p)
    assert m["accuracy"] == pytest.approx(accuracy_score(y, p.argmax(1)), abs=1e-6)
    assert m["f1"] == pytest.approx(f1_score(y, p.argmax(1), average="macro"), abs=1e-6)
    assert m["log_loss"] == pytest.approx(log_loss(y, p / p.sum(1, keepdims=True), labels=range(4)), abs=1e-4)
    assert m["roc_auc"] == pytest.approx(roc_auc_score(y, p / p.sum(1, keepdims=True), multi_class="ovr"), abs=1e-6)
    ties = np.array([0.1, 0.4, 0.4, 0.8, 0.8, 0.2])
    assert binary_auc(np.array([0, 1, 0, 1, 0, 1]) == 1, ties) == pytest.approx(
        roc_auc_score([0, 1, 0, 1, 0, 1], ties), abs=1e-12)
    binary = classification_metrics(np.array([0, 1, 1, 0]), np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.7, 0.3]]))
    assert binary["roc_auc"] == 1.0 and binary["accuracy"] == 0.75
    logits = classification_metrics(np.array([0, 1]), np.array([[3.0, -1.0], [0.0, 2.0]]))
    assert logits["log_loss"] is None and logits["accuracy"] == 1.0  # scores, not probabilities


def test_metrics_written_with_numpy_match_scikit_learn_and_scipy_on_random_cases():
    """Macro precision / recall / F1 (classes missing from the predictions or the labels), log
    loss, ranks with ties, and regression metrics with several outputs, constant ones among
    them: scikit-learn's and scipy's values, which the monitor no longer imports."""
    rng = np.random.default_rng(7)
    for _ in range(200):
        n, k = int(rng.integers(1, 60)), int(rng.integers(2, 7))
        y, pred = rng.integers(0, k, n), rng.integers(0, k, n)
        assert macro_prf(y, pred) == pytest.approx(
            precision_recall_fscore_support(y, pred, average="macro", zero_division=0)[:3], abs=1e-12)
        p = rng.dirichlet([1.0] * k, size=n)
        assert classification_metrics(y, p, only="log_loss")["log_loss"] == pytest.approx(
            log_loss(y, p, labels=list(range(k))), abs=1e-6)
        x = rng.integers(0, 5, n).astype(np.float64)
        assert list(ranks(x)) == list(rankdata(x))
        outs = int(rng.integers(1, 4))
        truth = rng.normal(size=(n + 1, outs))
        guess = truth + rng.normal(size=truth.shape)
        if rng.random() < 0.4:
            truth[:, 0] = 2.0  # a constant output: predicted exactly (r2 1) or not (0), as scikit-learn says
            if rng.random() < 0.5:
                guess[:, 0] = 2.0
        m = regression_metrics(truth, guess)
        assert m["mse"] == pytest.approx(mean_squared_error(truth, guess), abs=1e-6)
        assert m["mae"] == pytest.approx(mean_absolute_error(truth, guess), abs=1e-6)
        if outs > 1 or np.ptp(truth[:, 0]) > 0:
            assert m["r2"] == pytest.approx(r2_score(truth, guess), abs=1e-6)


def test_the_monitor_computes_quality_and_drift_without_importing_scikit_learn():
    """Importing sklearn.metrics (and scipy.stats with it) cost the monitor process 1.7 s of CPU
    and 86 MB, and stalled the first feedback call after the first label: a fresh interpreter
    computes every metric and every drift score without them."""
    code = """
import sys
import numpy as np
from monitoring.quality.metrics import classification_metrics, regression_metrics
from monitoring.drift import stats
y = np.array([0, 1, 2, 1]); p = np.full((4, 3), 1 / 3)
classification_metrics(y, p); regression_metrics(y.astype(float), y + 0.5)
ref = np.full((2, 4), 0.25); counts = np.array([[5, 5, 5, 5], [1, 2, 3, 4]]); valid = np.ones((2, 4), bool)
stats.jensenshannon(ref, counts, valid); stats.chi2_pvalues(ref, 100, counts, valid)
print(sorted(m for m in ("sklearn", "scipy.stats", "scipy.spatial") if m in sys.modules))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_regression_metrics_match_scikit_learn():
    q = monitor(min_labels=10, quality_window=50)
    rng = np.random.default_rng(0)
    pred = rng.normal(100, 20, 50)
    truth = pred + rng.normal(0, 5, 50)
    q.record(obs([f"r{i}" for i in range(50)], pred, task="regression", classes=None))
    assert q.feedback(items([(f"r{i}", float(truth[i])) for i in range(50)])).accepted == 50
    m = q.status()["metrics"]
    pred32 = pred.astype(np.float32).astype(np.float64)
    assert m["mse"] == pytest.approx(mean_squared_error(truth, pred32), rel=1e-5)
    assert m["mae"] == pytest.approx(mean_absolute_error(truth, pred32), rel=1e-5)
    assert m["r2"] == pytest.approx(r2_score(truth, pred32), rel=1e-5)


def test_degraded_needs_min_labels_and_a_metric_worse_than_baseline_by_the_tolerance():
    n = 600
    p = probs(n, classes=10, seed=5, sharp=0.2)
    truth = p.argmax(axis=1)
    q = monitor(baseline={"accuracy": 0.97, "f1": 0.97}, min_labels=200, quality_window=500)
    q.record(obs([f"r{i}" for i in range(n)], p, classes=tuple(str(c) for c in range(10))))
    rng = np.random.default_rng(2)
    corrupt = rng.random(n) < 0.3
    labels = np.where(corrupt, (truth + 1 + rng.integers(0, 9, n)) % 10, truth)
    q.feedback(items([(f"r{i}", int(labels[i])) for i in range(150)]))
    st = q.status()
    assert st["metrics"]["accuracy"] < 0.8 and st["degraded"] is False  # 150 < min_labels: not judged yet
    q.feedback(items([(f"r{i}", int(labels[i])) for i in range(150, 600)], start=150))
    st = q.status()
    assert st["degraded"] is True and st["window"] == {"labels": 500, "size": 500}
    assert {w["metric"] for w in st["degraded_metrics"]} == {"accuracy", "f1"}
    assert st["windows"] == 1 and st["history"][0]["degraded"] is True
    assert "osprey_quality_degraded{model=\"m\",version=\"1\"} 1" in q.render_lines()


def test_judge_directions():
    assert judge({"accuracy": 0.90}, {"accuracy": 0.96}, 300, 200, 0.05)[0] is True
    assert judge({"accuracy": 0.92}, {"accuracy": 0.96}, 300, 200, 0.05)[0] is False
    assert judge({"accuracy": 0.10}, {"accuracy": 0.96}, 199, 200, 0.05)[0] is False
    # errors: relative tolerance, worse when higher
    assert judge({"mse": 3600.0}, {"mse": 3354.6}, 300, 200, 0.05)[0] is True
    assert judge({"mse": 3400.0}, {"mse": 3354.6}, 300, 200, 0.05)[0] is False
    assert judge({"mae": 10.0, "r2": 0.1}, {"mae": 45.0, "r2": 0.5}, 300, 200, 0.05)[1][0]["metric"] == "r2"


def test_baseline_from_the_profile_else_training_json(tmp_path):
    (tmp_path / "training.json").write_text(json.dumps(
        {"heldout_metrics": {"accuracy": 0.95, "f1": 0.94, "n_heldout": 114, "average": "macro"}}))
    assert load_baseline(tmp_path) == ({"accuracy": 0.95, "f1": 0.94}, "training.json:heldout_metrics")
    (tmp_path / "osprey-profile.json").write_text(json.dumps({"format": "osprey-profile/1", "quality": {"mse": 3.5}}))
    assert load_baseline(tmp_path) == ({"mse": 3.5}, "osprey-profile.json:quality")
    assert load_baseline(tmp_path / "missing") == ({}, None)
    q = quality_factory("m", "1", MonitoringConfig(), tmp_path, "")
    assert q.baseline == {"mse": 3.5} and q.store.kind == "memory"


def test_estimate_before_labels_from_confidence():
    q = monitor()
    p = np.array([[0.9, 0.05, 0.05], [0.6, 0.3, 0.1]], dtype=np.float32)
    q.record(obs(["a", "b"], p))
    st = q.status()
    assert st["estimated"]["accuracy"] == pytest.approx(0.75, abs=1e-6) and st["metrics"] == {}
    assert any('metric="estimated_accuracy"' in line for line in q.render_lines())
    logits = monitor()
    logits.record(obs(["a"], [[2.0, -1.0, 0.5]]))
    assert logits.status()["estimated"] is None


def test_prometheus_families_once_for_many_versions():
    a, b = monitor(), QualityMonitor("m", "2")
    a.record(obs(["x"], probs(1)))
    a.feedback(items([("x", "cat"), ("y", "cat")]))
    lines = render_many([a, b])
    assert lines.count("# TYPE osprey_feedback_total counter") == 1
    assert 'osprey_feedback_total{model="m",version="1",result="matched"} 1' in lines
    assert 'osprey_feedback_total{model="m",version="1",result="unmatched"} 1' in lines
    assert 'osprey_feedback_total{model="m",version="2",result="matched"} 0' in lines
    assert 'osprey_quality_degraded{model="m",version="2"} 0' in lines


# --- Redis -------------------------------------------------------------------------------
def _replica(url: str, **kw) -> QualityMonitor:
    return quality_factory("m", "1", MonitoringConfig(**kw), None, url)


def test_two_replicas_sharing_redis_join_a_label_recorded_by_the_other(redis_server):  # noqa: F811
    a, b = _replica(redis_server.url, min_labels=2, quality_window=10), _replica(redis_server.url, min_labels=2,
                                                                                  quality_window=10)
    assert isinstance(a.store, RedisStore)
    a.record(obs(["r1", "r2", "r3"], probs(3)))
    r = b.feedback(items([("r1", "cat"), ("r2", "bird"), ("zz", "cat"), ("r3", "lion")]))
    assert (r.accepted, r.unmatched, r.invalid) == (2, 1, 1) and "lion" in r.errors[0]
    assert a.feedback(items([("r1", "cat")])).unmatched == 1  # labelled already, on the other replica
    sa, sb = a.status(), b.status()
    assert (sa["labels"], sa["unmatched"], sa["invalid"]) == (2, 2, 1) == (sb["labels"], sb["unmatched"], sb["invalid"])
    assert sa["metrics"] == sb["metrics"] and sa["metrics"]["accuracy"] is not None
    assert sa["store"] == "redis" and sa["unavailable"] is None and sa["predictions_kept"] == 1


def test_redis_prediction_log_expires_and_is_bounded(redis_server):  # noqa: F811
    q = _replica(redis_server.url, feedback_ttl=0.3, max_predictions=5)
    q.record(obs([f"r{i}" for i in range(8)], probs(8)))
    assert q.status()["predictions_kept"] == 5
    assert q.feedback(items([("r0", "cat"), ("r7", "cat")])).as_dict() == {"accepted": 1, "unmatched": 1, "invalid": 0,
                                                                           "unmatched_ids": ["r0"]}
    q.record(obs(["late"], probs(1)))
    time.sleep(0.5)
    assert q.feedback(items([("late", "cat")])).unmatched == 1


def test_redis_down_buffers_predictions_answers_503_and_catches_up(redis_server, monkeypatch):  # noqa: F811
    import monitoring.quality.monitor as qm

    monkeypatch.setattr(qm, "RETRY_S", 0.0)
    q = _replica(redis_server.url)
    q.record(obs(["before"], probs(1)))
    redis_server.stop()
    q.record(obs(["during"], probs(1)))  # buffered, never raises
    with pytest.raises(OspreyError) as exc:
        q.feedback(items([("before", "cat")]))
    assert exc.value.kind is ErrorKind.UNAVAILABLE and exc.value.status == 503
    assert "monitoring state is unavailable" in exc.value.message and "Redis at redis://127.0.0.1" in exc.value.message
    st = q.status()
    assert st["unavailable"] and "Redis" in st["unavailable"]
    assert any(line.startswith("osprey_quality_degraded") for line in q.render_lines())  # still renders
    redis_server.start()
    q.tick()
    assert q.status()["unavailable"] is None
    # the buffered prediction was written once Redis answered (this redis-server keeps nothing
    # across a restart, so the one written before is gone: unmatched, counted)
    r = q.feedback(items([("during", "dog"), ("before", "cat")]))
    assert (r.accepted, r.unmatched) == (1, 1)


def test_a_long_outage_without_traffic_is_logged_once(redis_server, monkeypatch, caplog):  # noqa: F811
    # the monitor ticks every version each second: with nothing buffered, a tick must not
    # declare the store back (and log it) before finding it still down
    import logging

    import monitoring.quality.monitor as qm

    monkeypatch.setattr(qm, "RETRY_S", 0.0)
    q = _replica(redis_server.url)
    q.record(obs(["before"], probs(1)))
    redis_server.stop()
    with caplog.at_level(logging.INFO, logger="osprey.monitoring.quality"):
        for _ in range(4):
            q.tick()
        assert q.status()["unavailable"] and "Redis" in q.status()["unavailable"]
        assert [r.getMessage().split(": ", 1)[1][:30] for r in caplog.records] == ["monitoring state unavailable: "]
        redis_server.start()
        q.tick()
    assert q.status()["unavailable"] is None
    assert sum("available again" in r.getMessage() for r in caplog.records) == 1


def test_a_label_sent_to_two_replicas_at_once_is_joined_once(redis_server):  # noqa: F811
    from concurrent.futures import ThreadPoolExecutor

    a, b = _replica(redis_server.url), _replica(redis_server.url)
    ids = [f"r{i}" for i in range(300)]
    a.record(obs(ids, probs(300)))
    labels = items([(rid, "cat") for rid in ids])
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda q: q.feedback(labels), [a, b, a, b]))
    assert sum(r.accepted for r in results) == 300
    assert sum(r.unmatched for r in results) == 900
    assert a.status()["labels"] == 300


def test_classes_that_do_not_match_the_outputs_are_not_used_for_names():
    q = monitor()
    q.record(obs(["a", "b"], probs(2, classes=4), classes=("x", "y")))  # top-k names, say: not one per output
    r = q.feedback(items([("a", 3), ("b", "x")]))
    assert (r.accepted, r.invalid) == (1, 1) and "class index 0..3" in r.errors[0]


def test_the_prediction_log_keeps_the_newest_rows_within_its_bound_and_ttl():
    from monitoring.quality.store import MemoryStore

    store = MemoryStore()
    store.put([(f"r{i}", b"%d" % i) for i in range(5)], now=0.0, expires=100.0, max_rows=4)
    assert store.get(["r0", "r1", "r4"], now=1.0) == [None, b"1", b"4"]  # the oldest trimmed
    store.put([("r1", b"again"), ("r5", b"5")], now=2.0, expires=200.0, max_rows=4)  # r1 seen again: newest
    assert store.get(["r1", "r2", "r3"], now=3.0) == [b"again", None, b"3"]
    assert store.kept(now=150.0) == 2  # r3 and r4 expired; r1 (sent again) and r5 kept
    assert store.claim(["r1", "r1", "r9"]) == [True, False, False]
    store.put([], now=151.0, expires=300.0, max_rows=4)
    assert store.kept(now=151.0) == 1


def test_a_prediction_made_again_after_its_label_outlives_the_older_one():
    """A client that reuses its request ids: a prediction claimed by its label and then made
    again under the same id is the newer one, and goes with its own put (bound or ttl), not
    with the older put that first held the id."""
    from monitoring.quality.store import MemoryStore

    store = MemoryStore()
    store.put([("a", b"1"), ("b", b"1")], now=0.0, expires=100.0, max_rows=10)
    assert store.claim(["a"]) == [True]
    store.put([("a", b"2")], now=1.0, expires=200.0, max_rows=10)
    store.put([("b", b"3")], now=2.0, expires=300.0, max_rows=10)  # b again, unclaimed: the newest
    assert store.kept(now=150.0) == 2  # the first put expired, and held neither row any more
    assert store.get(["a", "b"], now=150.0) == [b"2", b"3"]
    store.put([(f"x{i}", b"x") for i in range(9)], now=151.0, expires=400.0, max_rows=10)
    assert store.get(["a", "b", "x0"], now=151.0) == [None, b"3", b"x"]  # a (older than b) trimmed first
    assert store.kept(now=151.0) == 10


def test_the_prediction_log_matches_an_ordered_log_under_random_puts_claims_and_expiry():
    """Against the plain definition (an ordered dict: newest at the end, an id predicted again
    moves there, trimmed from the front to the bound, expired from the front): random puts of
    new and repeated ids, claims and time passing."""
    import random
    from collections import OrderedDict

    from monitoring.quality.store import MemoryStore

    rng = random.Random(11)
    store, ref = MemoryStore(), OrderedDict()
    now = 0.0
    for step in range(3000):
        now += rng.random()
        if rng.random() < 0.3 and ref:
            rids = rng.sample(list(ref) + ["nope"], k=min(3, len(ref) + 1))
            expected = []
            for rid in rids:
                expected.append(rid in ref)
                ref.pop(rid, None)
            assert store.claim(rids) == expected, step
            continue
        expires = now + 30.0  # (one feedback_ttl per version)
        rows = [(f"r{rng.randrange(400)}", b"%d" % step) for _ in range(rng.randrange(1, 6))]
        store.put(rows, now, expires, 60)
        for rid, blob in rows:
            ref.pop(rid, None)
            ref[rid] = (expires, blob)
        while len(ref) > 60:
            ref.popitem(last=False)
        while ref and next(iter(ref.values()))[0] <= now:
            ref.popitem(last=False)
        assert store.kept(now) == len(ref), step
        probe = [f"r{i}" for i in range(0, 400, 7)]
        assert store.get(probe, now) == [ref[r][1] if r in ref and ref[r][0] > now else None for r in probe], step


def test_the_prediction_logs_memory_follows_the_rows_kept_when_every_prediction_is_labelled():
    """Rows claimed by their labels (or predicted again under a reused id) leave the log; what
    it keeps of their puts is rebuilt, so memory does not grow with traffic."""
    from monitoring.quality.store import COMPACT_SLACK, MemoryStore

    store = MemoryStore()
    for i in range(20_000):
        store.put([(f"r{i}", b"x")], now=0.0, expires=1e9, max_rows=100_000)
        assert store.claim([f"r{i}"]) == [True]
        store.put([("same", b"%d" % i)], now=0.0, expires=1e9, max_rows=100_000)
    assert store.kept(now=1.0) == 1 and store.get(["same"], now=1.0) == [b"19999"]
    assert sum(len(ids) - start for ids, _, start in store._order) <= 2 + COMPACT_SLACK + 2
