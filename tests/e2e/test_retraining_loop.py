"""The retraining loop end to end, against real processes: ``osprey serve`` (embedded job queue,
or two replicas on a real redis-server), ``osprey worker``, and the job processes they start.

1. Embedded: digits_cnn meets labelled inverted digits; ``osprey retrain`` queues a job that,
   under a steady client load, trains, passes the gate, canaries and becomes the default with
   not one failed request; the drift reference moves to the new version's training data;
   /metrics shows the job and the new default.
2. Redis, two replicas, one worker: a drift episode starts exactly one job whichever replica
   saw it; Alertmanager's webhook for the same episode starts no second one; bad JSON is a 400.
3. Faults: an entry point that raises, weights that cannot load, an unknown model, a model
   without an entry point, a malformed ``retraining:`` section, a cancel mid-training, a worker
   SIGKILLed mid-job (the real pipeline: once in training, once in canary with its challenger
   registered), Redis down while triggers fire.
4. A shadow promotion: clients see only the champion's answers while the shadow runs.
5. Automatic rollback: a challenger whose live quality drops in probation is rolled back
   under load with not one failed request.

Models are copies of the examples (``example_store``) with a ``retraining:`` section that keeps
each loop short (canary judged on a few dozen requests, no minimum time, a short probation,
latency bounds loose: timings on a loaded 2-core machine are noise). Tests wait on observable
state (job records, files written by the entry points in tests/retraining_entries.py, gate
files they wait for, server logs), polling with a deadline; nothing sleeps to synchronise.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import subprocess
import sys
import threading
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.builtin_models import example_store, variant
from tests.gates import alive
from tests.conftest import ROOT, OspreyProcess

FAST = {"OSPREY_RETRAINING_HEARTBEAT": "2", "OSPREY_RETRAINING_SWEEP_INTERVAL": "1",
        "OSPREY_RETRAINING_CANCEL_GRACE": "1"}
ENTRIES = "tests.retraining_entries"
# gate and promotion bounds that timing noise cannot trip (latency is not what these tests are about)
LOOSE_GATE = {"max_latency_ratio": 100}
ANY_GATE = {"min_improvement": -1.0, "max_regression": 1e6, "max_latency_ratio": 100}
CANCER_CLASSES = ["malignant", "benign"]
TERMINAL = ("succeeded", "rejected", "failed", "cancelled")


# ------------------------------------------------------------------------------------------ helpers

def wait_for(check, timeout: float = 60.0, what: str = "the condition", poll: float = 0.1):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(poll)


def job(srv, job_id: str) -> dict:
    r = httpx.get(f"{srv.management}/retraining/jobs/{job_id}", timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def jobs(srv, model: str) -> list[dict]:
    r = httpx.get(f"{srv.management}/retraining/jobs", params={"model": model}, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()["jobs"]


def wait_job(srv, job_id: str, check=lambda j: j["state"] in TERMINAL, timeout: float = 120.0,
             what: str = "the job to end") -> dict:
    last: dict = {}

    def probe():
        last.update(job(srv, job_id))
        return check(last)
    try:
        wait_for(probe, timeout, what, poll=0.2)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; the job: {json.dumps(last, indent=1)[-4000:]}") from None
    return dict(last)


def steps(record: dict) -> list[str]:
    return [s["step"] for s in record["steps"]]


def versions(srv, model: str) -> dict[str, bool]:
    """{version: is the default} of a model: TorchServe's describe (all versions) and the traffic JSON."""
    r = httpx.get(f"{srv.management}/models/{model}/all", timeout=30)
    assert r.status_code == 200, r.text
    default = traffic(srv, model)["default"]
    return {d["modelVersion"]: d["modelVersion"] == default for d in r.json()}


def traffic(srv, model: str) -> dict:
    r = httpx.get(f"{srv.management}/models/{model}/traffic", timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def retrain(srv, model: str) -> httpx.Response:
    return httpx.post(f"{srv.management}/models/{model}/retrain", timeout=60)


def osprey_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "server.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})


def metric(srv, pattern: str) -> float | None:
    text = httpx.get(f"{srv.metrics}/metrics", timeout=30).text
    m = re.search(rf"^{pattern} ([0-9.e+-]+)$", text, re.M)
    return float(m.group(1)) if m else None


def cancer_rows(n: int, start: int = 0, scale: float = 1.0) -> list[tuple[dict, str]]:
    """Held-out breast-cancer records (``scale`` times each feature: a shifted stream) and labels."""
    ex = example_store("cancer_mlp")
    data = np.load(ex / "samples" / "cancer_heldout.npz")
    features = list(json.loads((ex / "samples" / "cancer_record.json").read_text()))
    out = []
    for i in range(start, start + n):
        x, y = data["x"][i % len(data["x"])], int(data["y"][i % len(data["y"])])
        out.append(({f: float(v) * scale for f, v in zip(features, x)}, CANCER_CLASSES[y]))
    return out


def predict(srv, model: str, body, version: str | None = None, client: httpx.Client | None = None) -> httpx.Response:
    url = f"{srv.inference}/predictions/{model}" + (f"/{version}" if version else "")
    c = client or httpx
    if isinstance(body, (bytes, bytearray)):
        return c.post(url, content=bytes(body), headers={"content-type": "image/png"}, timeout=60)
    return c.post(url, json=body, timeout=60)


def label(srv, model: str, rows: list[tuple], count, *, workers: int = 4) -> None:
    """Send each row's input, post its label, and wait until ``count()`` (the model's labelled
    rows, as a job reads them) has grown by len(rows)."""
    before = count()
    with httpx.Client(timeout=60) as c, ThreadPoolExecutor(workers) as pool:
        answers = list(pool.map(lambda row: predict(srv, model, row[0], client=c), rows))
        assert all(a.status_code == 200 for a in answers), [a.text for a in answers if a.status_code != 200][:3]
        items = [{"request_id": a.headers["x-request-id"], "label": y} for a, (_, y) in zip(answers, rows)]
        r = c.post(f"{srv.inference}/feedback/{model}", json={"feedback": items})
        assert r.status_code == 200 and r.json()["accepted"] == len(items), r.text
    wait_for(lambda: count() >= before + len(rows), 30, f"{len(rows)} labelled rows of {model}")


def store_rows(store: Path, model: str):
    from monitoring.dataset import read_rows

    return lambda: len(read_rows(model, root=store))


def cancer(store: Path, name: str, *, drop_training: bool = False, **settings) -> str:
    """A copy of cancer_mlp named ``name`` in ``store`` with model-config ``settings``."""
    variant(example_store("cancer_mlp") / "cancer_mlp.mar", store, name, **settings)
    if drop_training:
        (store / name / "training.json").unlink()
    return name


def published(store: Path, model: str) -> list[str]:
    """The archives retraining jobs wrote for ``model`` into the model store."""
    return sorted(p.name for p in store.glob(f"{model}-v*.mar"))


class Load:
    """A steady client load: ``threads`` clients sending ``body(i)`` in a loop; every answer's
    status (and body) is kept, so a test can assert that none failed. With ``label(i)``, each
    client posts its answers' labels, ten at a time (labels arriving as production sends them)."""

    def __init__(self, srv, model: str, body, threads: int = 2, label=None):
        self.srv, self.model, self.body, self.label = srv, model, body, label
        self.feedback_failures: list[str] = []
        self.stop_event = threading.Event()
        self.lock = threading.Lock()
        self.answers: list[tuple[int, int, str]] = []  # (i, status, text)
        self.threads = [threading.Thread(target=self._run, args=(k, threads), daemon=True) for k in range(threads)]
        for t in self.threads:
            t.start()

    def _run(self, k: int, n: int) -> None:
        i, labels = k, []
        with httpx.Client(timeout=60) as c:
            while not self.stop_event.is_set():
                try:
                    r = predict(self.srv, self.model, self.body(i), client=c)
                    status, text = r.status_code, r.text
                except httpx.HTTPError as exc:
                    status, text = 0, repr(exc)
                with self.lock:
                    self.answers.append((i, status, text))
                if self.label is not None and status == 200:
                    labels.append({"request_id": r.headers["x-request-id"], "label": self.label(i)})
                    if len(labels) >= 10:
                        f = c.post(f"{self.srv.inference}/feedback/{self.model}", json={"feedback": labels})
                        if f.status_code != 200:
                            self.feedback_failures.append(f.text)
                        labels = []
                i += n

    @property
    def count(self) -> int:
        with self.lock:
            return len(self.answers)

    def failures(self) -> list[tuple[int, int, str]]:
        with self.lock:
            return [a for a in self.answers if a[1] != 200]

    def stop(self) -> None:
        self.stop_event.set()
        for t in self.threads:
            t.join(60)


# --------------------------------------------------------------------------- the embedded server

DIGITS_RETRAINING = {
    "triggers": ["manual"], "cooldown": 0, "min_labels": 200,
    "gate": {"max_regression": 0.1, **LOOSE_GATE},
    "promotion": {"policy": "canary", "canary_share": 0.5, "min_requests": 30, "min_seconds": 0, "max_seconds": 120,
                  "probation": 3, "max_latency_ratio": 100},
}
DIGITS_MONITORING = {"window": 100, "min_window": 20}


@pytest.fixture(scope="module")
def emb(tmp_path_factory):
    """One server with the embedded job queue (jobs run as its children) and every model the
    embedded tests use; ``emb.store``, ``emb.marks`` (a folder for the entry points' files)."""
    root = tmp_path_factory.mktemp("loop-embedded")
    store, marks = root / "store", root / "marks"
    store.mkdir()
    marks.mkdir()
    ex = example_store("digits_cnn", "cancer_mlp")
    shutil.copytree(ex / "samples", store / "samples")
    variant(ex / "digits_cnn.mar", store, "digits_cnn", retraining=DIGITS_RETRAINING, monitoring=DIGITS_MONITORING)
    # manual jobs only: a quality trigger must not start jobs of its own while the tests label answers
    fault = {"triggers": ["manual"], "min_labels": 20, "cooldown": 0, "gate": ANY_GATE,
             "promotion": {"policy": "direct", "probation": 0}}
    cancer(store, "c_raises", retraining={**fault, "entry_point": f"{ENTRIES}:raises"})
    cancer(store, "c_badweights", retraining={**fault, "entry_point": f"{ENTRIES}:bad_weights"})
    cancer(store, "c_held", retraining={**fault, "entry_point": f"{ENTRIES}:held",
                                        "hyperparameters": {"dir": str(marks / "held"),
                                                            "gate": str(marks / "held-gate")}})
    cancer(store, "c_noentry", drop_training=True)
    flipped = {**fault, "entry_point": f"{ENTRIES}:flipped", "hyperparameters": {"dir": str(marks / "flipped")}}
    cancer(store, "c_shadow", retraining={**flipped, "promotion": {
        "policy": "shadow", "min_requests": 25, "min_seconds": 0, "max_seconds": 120, "probation": 0,
        "max_latency_ratio": 100}})
    cancer(store, "c_rollback", retraining={**flipped, "promotion": {
        "policy": "direct", "min_requests": 20, "probation": 120, "max_latency_ratio": 100}})
    models = ["digits_cnn", "c_raises", "c_badweights", "c_held", "c_noentry", "c_shadow", "c_rollback"]
    work = root / "server"
    work.mkdir()
    srv = OspreyProcess(work, store, [f"{m}={m}" for m in models], extra_args=["--no-grpc"], env=FAST)
    try:
        srv.wait_ready(180)
        srv.marks = marks
        yield srv
    finally:
        srv.stop()


# ------------------------------------------------------------------------- 1. the loop, embedded

def test_embedded_loop_digits_retrained_on_inverted_digits_promoted_under_load(emb):
    from examples.digits_cnn import digit_png
    from examples.traffic import shift_digits

    held = np.load(emb.store / "samples" / "digits_heldout.npz")
    grids, labels = shift_digits(held["images"], held["labels"], "inverted", 300, seed=1)
    label(emb, "digits_cnn", [(digit_png(g), str(int(y))) for g, y in zip(grids, labels)],
          store_rows(emb.store, "digits_cnn"), workers=8)
    # a label the model cannot take is refused and not kept as a training row ...
    answer = predict(emb, "digits_cnn", digit_png(grids[0]))
    r = httpx.post(f"{emb.inference}/feedback/digits_cnn", timeout=60,
                   json={"request_id": answer.headers["x-request-id"], "label": "cat"})
    assert r.status_code == 400 and "'cat' is not a class of this model" in r.json()["message"], r.text
    assert "kept" not in r.json(), r.text
    # ... and one kept by an older Osprey costs its row, not the retraining
    from monitoring.dataset import dataset_path, read_rows

    kept = read_rows("digits_cnn", root=emb.store)
    assert len(kept) == 300 and {row["label"] for row in kept} <= {str(d) for d in range(10)}
    with open(dataset_path(emb.store, "digits_cnn"), "ab") as f:
        pickle.dump(dict(kept[0], rid="kept-by-an-older-osprey", label="cat"), f, protocol=5)
    stream, _ = shift_digits(held["images"], held["labels"], "inverted", 200, seed=2)
    pngs = [digit_png(g) for g in stream]
    load = Load(emb, "digits_cnn", lambda i: pngs[i % len(pngs)])
    try:
        wait_for(lambda: load.count >= 20, 60, "the load to run")
        out = osprey_cli("retrain", "digits_cnn", "--management", emb.management)
        assert out.returncode == 0, out.stderr
        m = re.fullmatch(r"job (\w+) queued for digits_cnn 1\.0 \(trigger manual\)\n", out.stdout)
        assert m, out.stdout
        done = wait_job(emb, m.group(1), timeout=240, what="the digits job to end")
        n = load.count
        wait_for(lambda: load.count >= n + 30, 60, "requests answered by the new default")
        # a closed monitoring window of 2.0 (which the load's inverted digits fill)
        status = wait_for(lambda: (s := httpx.get(f"{emb.inference}/monitoring/digits_cnn/2.0", timeout=30).json())
                          ["windows"] >= 1 and s, 90, "a monitoring window of 2.0")
    finally:
        load.stop()
    assert done["state"] == "succeeded", json.dumps(done, indent=1)[-3000:]
    assert load.failures() == [], load.failures()[:5]
    assert done["challenger"] == "2.0" and done["trigger"] == "manual" and done["attempts"] == 1
    gate = done["gate"]
    hold = gate["holdout"]
    assert gate["metric"] == "accuracy" and hold["rows"] >= 60
    assert hold["challenger"]["accuracy"] >= hold["champion"]["accuracy"] + 0.01, hold
    assert gate["golden"]["rows"] > 0 and "latency" in gate and "size_bytes" in gate
    canary = gate["promotion"]["canary"]
    assert canary["challenger"]["requests"] >= 30 and canary["challenger"]["errors"] == 0, canary
    for step in ("training", "gate passed", "registered", "canary", "canary passed", "promoted", "probation passed"):
        assert step in steps(done), steps(done)
    left_out = [s["detail"] for s in done["steps"] if s["step"] == "data" and s["detail"].startswith("left out")]
    assert left_out == ["left out 1 row(s) whose label digits_cnn cannot take, e.g. row kept-by-an-older-osprey: "
                        "label 'cat' is not a class of this model (one of ['0', '1', '2', '3', '4', '5', '6', '7', "
                        "'8', '9'])"], steps(done)
    assert versions(emb, "digits_cnn") == {"1.0": False, "2.0": True}
    assert published(emb.store, "digits_cnn") == [f"digits_cnn-v2.0-{done['id'][:12]}.mar"]
    # the drift reference moved: 2.0 is watched against its own profile, built from its training data
    # (the reference digits and the labelled inverted ones), not 1.0's (upright digits only)
    with zipfile.ZipFile(emb.store / published(emb.store, "digits_cnn")[0]) as zf:
        profile = json.loads(zf.read("osprey-profile.json"))
    with zipfile.ZipFile(example_store("digits_cnn") / "digits_cnn.mar") as zf:
        old_profile = json.loads(zf.read("osprey-profile.json"))
    assert profile["version"] == "2.0" and profile["source"] == "reference.npz: training data of this version"
    edges = {f["name"]: f.get("edges") for f in profile["features"]}
    assert edges["mean"] != {f["name"]: f.get("edges") for f in old_profile["features"]}["mean"]
    old = httpx.get(f"{emb.inference}/monitoring/digits_cnn/1.0", timeout=30).json()
    assert status["reference"] == "archive", status.get("degraded")
    score = {v: {f["name"]: f for f in s["drift"]["features"]}["mean"] for v, s in (("1.0", old), ("2.0", status))}
    assert score["2.0"]["reference"]["edges"][1:-1] == edges["mean"][1:-1]
    # the same inverted stream is much closer to 2.0's reference than to 1.0's
    assert score["2.0"]["score"] < score["1.0"]["score"], score
    # /metrics: the job by result and the new default
    wait_for(lambda: metric(emb, r'osprey_retraining_jobs_total\{model="digits_cnn",trigger="manual",'
                                 r'result="succeeded"\}') == 1, 30, "the job in /metrics")
    assert metric(emb, r'osprey_model_default_version_info\{model="digits_cnn",version="2.0"\}') == 1


# ----------------------------------------------------------------------------- 3. faults, embedded

def test_entry_point_that_raises_fails_the_job_with_its_traceback_champion_untouched(emb):
    label(emb, "c_raises", cancer_rows(30), store_rows(emb.store, "c_raises"))
    r = retrain(emb, "c_raises")
    assert r.status_code == 202 and r.json()["created"], r.text
    done = wait_job(emb, r.json()["job"]["id"])
    assert done["state"] == "failed", done
    assert "the feature store is gone" in done["message"], done["message"]
    log = "\n".join(done["log_tail"])
    assert "Traceback (most recent call last)" in log and "retraining_entries.py" in log, log
    assert "RuntimeError: the feature store is gone (raised on purpose by the test)" in log, log
    assert done["error"] and "RuntimeError" in done["error"]
    assert versions(emb, "c_raises") == {"1.0": True} and published(emb.store, "c_raises") == []
    assert predict(emb, "c_raises", cancer_rows(1)[0][0]).status_code == 200


def test_weights_that_cannot_load_fail_the_job_saying_so(emb):
    label(emb, "c_badweights", cancer_rows(30), store_rows(emb.store, "c_badweights"))
    r = retrain(emb, "c_badweights")
    assert r.status_code == 202, r.text
    done = wait_job(emb, r.json()["job"]["id"])
    assert done["state"] == "failed", done
    assert "cancer_mlp.pt" in done["message"] and "load" in done["message"], done["message"]
    assert "gate" not in steps(done) and "registered" not in steps(done)
    assert versions(emb, "c_badweights") == {"1.0": True} and published(emb.store, "c_badweights") == []


def test_retrain_unknown_model_is_404_and_a_model_without_entry_point_400(emb):
    r = retrain(emb, "no_such_model")
    assert r.status_code == 404 and "no_such_model" in r.json()["message"], r.text
    out = osprey_cli("retrain", "no_such_model", "--management", emb.management)
    assert out.returncode == 1 and "404" in out.stderr and "no_such_model" in out.stderr, out.stderr
    r = retrain(emb, "c_noentry")
    assert r.status_code == 400, r.text
    assert "model c_noentry version 1.0 has no training entry point" in r.json()["message"], r.text
    out = osprey_cli("retrain", "c_noentry", "--management", emb.management)
    assert out.returncode == 1 and "has no training entry point" in out.stderr, out.stderr
    assert jobs(emb, "c_noentry") == [] and jobs(emb, "no_such_model") == []
    # the same parameters as a JSON body: taken, never silently ignored
    url = f"{emb.management}/models/digits_cnn/retrain"
    before = len(jobs(emb, "digits_cnn"))
    r = httpx.post(url, json={"version": "9.9"}, timeout=60)
    assert r.status_code == 404 and "9.9" in r.json()["message"], r.text
    for kwargs, needle in (({"content": b"{bad"}, "the retrain body is not valid JSON"),
                           ({"json": {"versoin": "1.0"}}, "unknown key(s) 'versoin' in the retrain body"),
                           ({"json": ["1.0"]}, "the retrain body must be a JSON object"),
                           ({"json": {"reason": 5}}, "'reason' in the retrain body must be a string"),
                           ({"json": {"version": 1.10}}, "'version' in the retrain body must be a string"),
                           ({"json": {"version": "1.0"}, "params": {"version": "2.0"}}, "give it once")):
        r = httpx.post(url, timeout=60, **kwargs)
        assert r.status_code == 400 and needle in r.json()["message"], (kwargs, r.text)
    assert len(jobs(emb, "digits_cnn")) == before


@pytest.mark.parametrize("section, named", [
    ({"gate": {"min_improvment": 0.05}}, "retraining.gate.min_improvment is not a setting"),
    ({"promotion": {"canary_share": 2}}, "retraining.promotion.canary_share must be from"),
    ({"triggers": ["drift", "sometimes"]}, "retraining.triggers must be one of"),
    ({"cooldown": "1h"}, "retraining.cooldown must be a number"),
    (5, "retraining must be a mapping of settings"),
])
def test_malformed_retraining_section_is_400_at_registration_naming_the_key(emb, section, named):
    name = cancer(emb.store, f"c_bad_{abs(hash(named)) % 10**6}", retraining=section)
    r = httpx.post(f"{emb.management}/models", params={"url": name}, timeout=120)
    assert r.status_code == 400 and named in r.json()["message"], r.text
    assert httpx.get(f"{emb.management}/models/{name}", timeout=30).status_code == 404


def test_cancel_during_training_stops_the_process_and_leaves_serving_as_it_was(emb):
    label(emb, "c_held", cancer_rows(30), store_rows(emb.store, "c_held"))
    before = traffic(emb, "c_held")
    r = retrain(emb, "c_held")
    assert r.status_code == 202, r.text
    job_id = r.json()["job"]["id"]
    marks = emb.marks / "held"
    wait_for((marks / "pid-1").exists, 90, "the entry point to start training")
    pid = int((marks / "pid-1").read_text())
    assert job(emb, job_id)["state"] == "running"
    out = osprey_cli("jobs", "cancel", job_id, "--json", "--management", emb.management)
    assert out.returncode == 0, out.stderr
    record = json.loads(out.stdout)
    assert record["state"] == "cancelled" and record["message"] == "cancelled while running; its process was stopped"
    assert not alive(pid)
    assert not (emb.marks / "held-gate").exists() and len((marks / "runs.jsonl").read_text().splitlines()) == 1
    after = traffic(emb, "c_held")
    assert versions(emb, "c_held") == {"1.0": True} and published(emb.store, "c_held") == []
    assert {k: after[k] for k in ("default", "weights", "shadow")} == {k: before[k] for k in ("default", "weights",
                                                                                              "shadow")}
    work = emb.store / ".osprey" / "work" / job_id
    assert not [p for p in work.rglob("*") if p.suffix in (".pt", ".mar")], list(work.rglob("*"))
    assert predict(emb, "c_held", cancer_rows(1)[0][0]).status_code == 200
    out = osprey_cli("jobs", "cancel", job_id, "--management", emb.management)
    assert out.returncode == 1 and "HTTP 409" in out.stderr, out.stderr


# --------------------------------------------------------------------- 4. shadow promotion, embedded

def _top(text: str) -> str:
    answer = json.loads(text)
    return max(answer, key=answer.get)


def test_shadow_promotion_clients_only_see_the_champions_answers_then_promoted(emb):
    label(emb, "c_shadow", cancer_rows(30), store_rows(emb.store, "c_shadow"))
    records = [body for body, _ in cancer_rows(40, start=30)]
    champion = [_top(predict(emb, "c_shadow", b, version="1.0").text) for b in records]
    r = retrain(emb, "c_shadow")
    assert r.status_code == 202, r.text
    job_id = r.json()["job"]["id"]
    during, after, disagreed, i = [], [], 0, 0
    state = job(emb, job_id)
    with httpx.Client(timeout=60) as c:
        while state["state"] not in TERMINAL or len(after) < 10:
            t0 = traffic(emb, "c_shadow")
            answer = predict(emb, "c_shadow", records[i % len(records)], client=c)
            t1 = traffic(emb, "c_shadow")
            assert answer.status_code == 200, answer.text
            if t0["shadow"] == t1["shadow"] == "2.0" and t0["default"] == t1["default"] == "1.0":
                during.append((i % len(records), _top(answer.text)))
                disagreed = max(disagreed, t1["shadow_results"].get("disagree", 0))
            elif t0["default"] == t1["default"] == "2.0":
                after.append((i % len(records), _top(answer.text)))
            i += 1
            if state["state"] not in TERMINAL:
                state = job(emb, job_id)
            assert i < 2000, state
    assert state["state"] == "succeeded", state
    assert len(during) >= 10, (len(during), steps(state))
    assert [a for k, a in during] == [champion[k] for k, a in during]  # the clients saw the champion only
    assert disagreed >= 10  # the shadow's answers were compared (the flipped model disagrees) and dropped
    assert [a for k, a in after] == [CANCER_CLASSES[1 - CANCER_CLASSES.index(champion[k])] for k, a in after]
    shadow = state["gate"]["promotion"]["shadow"]
    assert shadow["challenger"]["requests"] >= 25 and shadow["challenger"]["errors"] == 0, shadow
    assert {"shadow", "shadow passed", "promoted"} <= set(steps(state)) and "canary" not in steps(state)
    assert versions(emb, "c_shadow") == {"1.0": False, "2.0": True}
    assert traffic(emb, "c_shadow")["shadow"] is None


def test_challenger_degrading_live_quality_in_probation_is_rolled_back_under_load(emb):
    label(emb, "c_rollback", cancer_rows(30), store_rows(emb.store, "c_rollback"))  # 1.0's live quality, too
    rows = cancer_rows(60, start=30)
    r = retrain(emb, "c_rollback")
    assert r.status_code == 202, r.text
    job_id = r.json()["job"]["id"]
    load = Load(emb, "c_rollback", lambda i: rows[i % len(rows)][0], label=lambda i: rows[i % len(rows)][1])
    try:
        done = wait_job(emb, job_id, timeout=120)
        n = load.count
        wait_for(lambda: load.count >= n + 20, 60, "answers after the rollback")
    finally:
        load.stop()
    assert done["state"] == "rejected", done
    assert done["message"].startswith("rolled back in probation: live quality"), done["message"]
    assert {"promoted", "probation", "rolled back"} <= set(steps(done))
    probation = done["gate"]["promotion"]["probation"]
    assert probation["challenger"]["quality"] < probation["baseline"]["quality"] - 0.02, probation
    assert load.failures() == [] and load.feedback_failures == [], (load.failures()[:3], load.feedback_failures[:3])
    assert versions(emb, "c_rollback") == {"1.0": True, "2.0": False}
    assert traffic(emb, "c_rollback")["previous"] == []
    # the answers after the rollback are the champion's again
    body = rows[0][0]
    assert predict(emb, "c_rollback", body).text == predict(emb, "c_rollback", body, version="1.0").text


# ------------------------------------------------------------- Redis: two replicas and osprey worker

DRIFT_MONITORING = {"window": 50, "min_window": 20, "episode_windows": 2, "episode_drifted": 2}


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """A redis-server, two server replicas sharing it and one model store (``stack.a``,
    ``stack.b``), and one ``osprey worker`` (``stack.workers``; ``stack.worker(name)`` starts another)."""
    from tests.redis_server import RedisProcess
    from tests.worker_process import WorkerProcess

    root = tmp_path_factory.mktemp("loop-redis")
    store, marks = root / "store", root / "marks"
    store.mkdir()
    marks.mkdir()
    # drift and alerts start jobs (a 10 min cooldown, shared through Redis); the job then finds
    # too few labels and ends rejected, which is all these tests need of it
    cancer(store, "c_drift", monitoring=DRIFT_MONITORING,
           retraining={"triggers": ["drift", "alert"], "cooldown": 600, "min_labels": 10_000})
    cancer(store, "c_kill", retraining={
        "triggers": ["manual"], "cooldown": 0, "min_labels": 20, "entry_point": f"{ENTRIES}:held", "gate": ANY_GATE,
        "hyperparameters": {"dir": str(marks / "kill"), "gate": str(marks / "kill-gate")},
        "promotion": {"policy": "canary", "canary_share": 0.5, "min_requests": 10, "min_seconds": 0,
                      "max_seconds": 300, "probation": 0, "max_latency_ratio": 100}})
    cancer(store, "c_down", retraining={"triggers": ["manual", "alert"], "cooldown": 600, "min_labels": 10_000})
    redis = RedisProcess(root / "redis").start()
    servers, workers = [], []

    class Stack:
        pass

    s = Stack()
    s.root, s.store, s.marks, s.redis, s.workers = root, store, marks, redis, workers

    def worker(name: str) -> WorkerProcess:
        w = WorkerProcess(root, redis.url, store, name, env=FAST)
        workers.append(w)
        return w.wait_ready()

    s.worker = worker
    try:
        for name in ("a", "b"):  # started together: each takes seconds on 2 cores
            work = root / name
            work.mkdir()
            servers.append(OspreyProcess(work, store, ["c_drift=c_drift", "c_kill=c_kill", "c_down=c_down"],
                                         extra_args=["--no-grpc"], env={**FAST, "OSPREY_REDIS_URL": redis.url}))
        w = WorkerProcess(root, redis.url, store, "first", env=FAST)
        workers.append(w)
        for srv in servers:
            srv.wait_ready(180)
        w.wait_ready()
        s.a, s.b = servers
        yield s
    finally:
        for w in workers:
            w.stop()
        for srv in servers:
            srv.stop()
        redis.stop()


def redis_rows(stack, model: str):
    import redis as redis_lib

    from monitoring.dataset import read_rows

    client = redis_lib.Redis.from_url(stack.redis.url)
    return lambda: len(read_rows(model, redis=client))


def alert(srv, model: str, name: str = "OspreyDriftDetected", status: str = "firing", **extra) -> httpx.Response:
    """Alertmanager's webhook call (its JSON, as a receiver with webhook_configs gets it)."""
    payload = {"version": "4", "groupKey": "{}:{alertname=\"%s\"}" % name, "status": status, "receiver": "osprey",
               "groupLabels": {"alertname": name}, "commonLabels": {"alertname": name, "model": model},
               "externalURL": "http://alertmanager:9093",
               "alerts": [{"status": status, "labels": {"alertname": name, "model": model, "version": "1.0",
                                                        "severity": "warning"},
                           "annotations": {"summary": f"{model} 1.0 drifted"}, "startsAt": "2026-11-29T10:00:00Z",
                           "endsAt": "0001-01-01T00:00:00Z", "fingerprint": "4b3c1e9f0a2d5e61", **extra}]}
    return httpx.post(f"{srv.management}/alerts", json=payload, timeout=60)


# ------------------------------------------------------------------- 2. triggers: one job per episode

def test_drift_episode_seen_by_two_replicas_starts_exactly_one_job_and_the_alert_no_second(stack):
    a, b = stack.a, stack.b
    shifted = cancer_rows(200, scale=3.0)  # every feature three times its usual size

    def episode_open() -> bool:
        return all(httpx.get(f"{s.inference}/monitoring/c_drift/1.0", timeout=30).json()["drift"]["detected"]
                   for s in (a, b))
    sent = 0
    with httpx.Client(timeout=60) as c:
        while not episode_open():  # windows of 50, shared through Redis: both replicas fill them
            assert sent < len(shifted), "no drift episode after 200 shifted requests"
            for k in range(sent, sent + 50):
                assert predict((a, b)[k % 2], "c_drift", shifted[k][0], client=c).status_code == 200
            sent += 50
            wait_for(lambda: httpx.get(f"{a.inference}/monitoring/c_drift/1.0", timeout=30).json()["requests"]
                     >= sent, 30, "the monitor to count the requests")
    # each replica's trigger sees the episode: one queues the job, the other finds the cooldown
    # taken (or, once that job ended rejected for too few labels and gave the cooldown back, the
    # episode's job made already)
    pattern = re.compile(r"event=retrain_(job_queued|trigger_cooling|trigger_known) model=c_drift "
                         r"(?:version=1\.0 )?trigger=drift episode=drift:1\.0:1")
    seen = wait_for(lambda: all(pattern.search(s.log()) for s in (a, b)) and
                    sorted(pattern.search(s.log()).group(1) for s in (a, b)), 60,
                    "both replicas' triggers to act on the episode")
    assert seen[0] == "job_queued" and seen[1] in ("trigger_cooling", "trigger_known"), seen
    listed = jobs(a, "c_drift")  # the same one job from both (compared by id: the worker may be updating it)
    assert len(listed) == 1 and [j["id"] for j in jobs(b, "c_drift")] == [listed[0]["id"]], listed
    first = listed[0]
    assert first["trigger"] == "drift" and first["episode"] == "drift:1.0:1"
    done = wait_job(a, first["id"], what="the worker to run the drift job")
    assert done["state"] == "rejected" and "retraining needs min_labels 10000" in done["message"], done
    assert done["worker"].endswith(f":{stack.workers[0].proc.pid}")
    # Alertmanager routes OspreyDriftDetected for the same episode, to either replica: no second job
    for s in (b, a):
        r = alert(s, "c_drift")
        assert r.status_code == 200 and r.json() == {"jobs": [], "ignored": 0, "errors": []}, r.text
    r = alert(a, "c_drift", status="resolved")
    assert r.status_code == 200 and r.json()["ignored"] == 1, r.text
    assert [j["id"] for j in jobs(a, "c_drift")] == [first["id"]]
    # bad webhook bodies: 400 naming what is wrong
    r = httpx.post(f"{a.management}/alerts", content=b'{"alerts": [', timeout=30)
    assert r.status_code == 400 and "the alerts body is not valid JSON" in r.json()["message"], r.text
    r = httpx.post(f"{a.management}/alerts", json={"receiver": "osprey"}, timeout=30)
    assert r.status_code == 400 and 'an object with an "alerts" list' in r.json()["message"], r.text
    r = alert(a, "no_such_model")
    assert r.status_code == 200 and "no_such_model" in r.json()["errors"][0], r.text


# ----------------------------------------------------------------------- 3. faults with Redis

def test_worker_sigkilled_mid_job_reruns_it_on_another_and_leaves_no_half_registered_version(stack):
    a, marks = stack.a, stack.marks / "kill"
    label(a, "c_kill", cancer_rows(40), redis_rows(stack, "c_kill"))
    stack.worker("second")
    r = retrain(a, "c_kill")
    assert r.status_code == 202, r.text
    job_id = r.json()["job"]["id"]
    by_pid = {w.proc.pid: w for w in stack.workers}

    def runner(record: dict):
        return by_pid[int(record["worker"].rsplit(":", 1)[1])]

    # 1. killed in training (the entry point waits for the gate file)
    wait_for((marks / "pid-1").exists, 90, "the first run to train")
    victim = runner(job(a, job_id))
    victim.proc.kill()
    victim.proc.wait(10)
    wait_for(lambda: not alive(int((marks / "pid-1").read_text())), 15, "the job's process to die with its worker")
    wait_for((marks / "pid-2").exists, 60, "the rerun on the other worker")
    rerun = job(a, job_id)
    assert rerun["attempts"] == 2 and runner(rerun) is not victim and "worker lost" in steps(rerun), rerun
    # 2. killed in canary: its challenger registered and taking half of the traffic
    stack.worker("third")
    by_pid.update({w.proc.pid: w for w in stack.workers})
    (stack.marks / "kill-gate").touch()
    wait_job(a, job_id, lambda j: "canary" in steps(j), 120, "the rerun to reach the canary")
    assert versions(a, "c_kill") == {"1.0": True, "2.0": False}
    assert traffic(a, "c_kill")["weights"] == {"1.0": 0.5, "2.0": 0.5}
    victim = runner(job(a, job_id))
    victim.proc.kill()
    victim.proc.wait(10)
    # the third run takes the dead run's challenger out before it trains again
    third = wait_job(a, job_id, lambda j: j["attempts"] == 3 and "cleanup" in steps(j), 60, "the third run's cleanup")
    assert runner(third) is not victim
    assert published(stack.store, "c_kill") == []  # the dead run's archive went with its registration
    wait_job(a, job_id, lambda j: steps(j).count("canary") == 2, 120, "the third run's canary")
    assert versions(a, "c_kill") == {"1.0": True, "2.0": False}  # the same version number, made again
    records = [body for body, _ in cancer_rows(50)]
    load = Load(a, "c_kill", lambda i: records[i % len(records)])
    try:
        done = wait_job(a, job_id, timeout=120, what="the job to end")
    finally:
        load.stop()
    assert done["state"] == "succeeded" and done["attempts"] == 3, done
    assert load.failures() == [], load.failures()[:3]
    assert len((marks / "runs.jsonl").read_text().splitlines()) == 3
    assert done["challenger"] == "2.0" and versions(a, "c_kill") == {"1.0": False, "2.0": True}
    assert published(stack.store, "c_kill") == [f"c_kill-v2.0-{job_id[:12]}.mar"]


def test_redis_down_serving_goes_on_and_a_trigger_fired_meanwhile_is_delivered_once(stack):
    a = stack.a
    stack.redis.stop()
    try:
        with httpx.Client(timeout=60) as c:
            for body, _ in cancer_rows(10):
                r = predict(a, "c_down", body, client=c)
                assert r.status_code == 200, r.text
        r = retrain(a, "c_down")
        assert r.status_code == 503 and "the retraining queue's Redis is unreachable" in r.json()["message"], r.text
        r = alert(a, "c_down")
        assert r.status_code == 200 and r.json() == {"jobs": [], "ignored": 0, "errors": []}, r.text
        wait_for(lambda: "event=retrain_trigger_kept model=c_down trigger=alert" in a.log(), 30, "the trigger kept")
        r = httpx.get(f"{a.management}/retraining/jobs", timeout=30)
        assert r.status_code == 503, r.text
    finally:
        stack.redis.start()  # the same port, empty (nothing kept on disk)
    listed = wait_for(lambda: (r := httpx.get(f"{a.management}/retraining/jobs", params={"model": "c_down"},
                                              timeout=30)).status_code == 200 and r.json()["jobs"], 60,
                      "the kept trigger to be delivered")
    assert len(listed) == 1 and listed[0]["trigger"] == "alert", listed
    done = wait_job(a, listed[0]["id"], what="a worker to run the delivered job")
    assert done["state"] == "rejected" and "min_labels" in done["message"], done
    assert len(jobs(a, "c_down")) == 1 and a.log().count("event=retrain_job_queued model=c_down") == 1
