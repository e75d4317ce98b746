"""Canary weights, shadow copies and rollback against the real server process.

* Weights route about their share of the requests that name no version (a binomial bound
  that cannot flake); a request naming a version always gets it; describe, the traffic JSON
  and /metrics show the routing.
* A shadow version gets a copy of what the default answered; clients only see the
  default's answers, even while the shadow is stuck (a gate); copies that find its queue
  full are dropped; every copy is counted by result.
* set-default, clearing weights, rollback (the API and ``osprey rollback``) under steady
  concurrent traffic fail no request.
* Bad bodies are 400 naming what is wrong.

Every step waits on observable state (answers, counts, gate files), never on a fixed sleep.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading

import httpx
import pytest

from tests.conftest import ROOT
from tests.gates import Gate, wait_until
from tests.models import handler_archive, mlp_archive

# Answers which version served it; holds on {"gate": PATH} when its version is in "hold_on".
HANDLER = '''
class Versioned:
    def initialize(self, context):
        self.version = context.manifest["model"]["modelVersion"]

    def handle(self, data, context):
        out = []
        for row in data:
            body = row.get("body")
            if isinstance(body, dict) and body.get("gate") and self.version in body.get("hold_on", ()):
                from tests.gates import hold
                hold(body["gate"])
            out.append({"version": self.version, "id": body.get("id") if isinstance(body, dict) else None})
        return out
'''
ROW = [float(i) for i in range(16)]


def _archives(store, name: str, *versions: str, config: dict | None = None) -> None:
    for v in versions:
        handler_archive(store, name, HANDLER, version=v, config={"batchSize": 1, **(config or {}).get(v, {})})
        (store / f"{name}.mar").rename(store / f"{name}{v}.mar")


@pytest.fixture(scope="module")
def srv(osprey_module, tmp_path_factory):
    store = tmp_path_factory.mktemp("store")
    _archives(store, "canary", "1.0", "2.0")
    _archives(store, "shadowed", "1.0", "2.0", config={"2.0": {"jobQueueSize": 2}})
    _archives(store, "roll", "1.0", "2.0")
    for v in ("1.0", "2.0"):  # the same weights (seed 0) in both: their answers agree
        mlp_archive(store, "twin", version=v)
        (store / "twin.mar").rename(store / f"twin{v}.mar")
    server = osprey_module([], store)
    for url in ("canary1.0.mar", "canary2.0.mar", "shadowed1.0.mar", "shadowed2.0.mar", "roll1.0.mar",
                "roll2.0.mar", "twin1.0.mar", "twin2.0.mar"):
        r = httpx.post(f"{server.management}/models", params={"url": url}, timeout=120)
        assert r.status_code == 200, r.text
    server.store = store
    return server


def _traffic(srv, model: str) -> dict:
    r = httpx.get(f"{srv.management}/models/{model}/traffic", timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def _metric(srv, name: str, **labels) -> float | None:
    text = httpx.get(f"{srv.metrics}/metrics", timeout=30).text
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    m = re.search(rf"^{name}\{{{re.escape(want)}\}} (\S+)$", text, re.M)
    return float(m.group(1)) if m else None


def test_canary_weights_route_about_their_share_and_a_named_version_always_gets_it(srv):
    m, url = srv.management, f"{srv.inference}/predictions/canary"
    r = httpx.put(f"{m}/models/canary/traffic", json={"weights": {"1.0": 90, "2.0": 10}})
    assert r.status_code == 200, r.text
    assert r.json()["shares"] == {"1.0": 0.9, "2.0": 0.1} and r.json()["default"] == "1.0"
    n, seen = 1000, {"1.0": 0, "2.0": 0}
    with httpx.Client(timeout=60) as c:
        for i in range(n):
            r = c.post(url, json={"id": i})
            assert r.status_code == 200, r.text
            seen[r.json()["version"]] += 1
        named = {c.post(f"{url}/1.0", json={"id": i}).json()["version"] for i in range(30)}
    # binomial(1000, 0.1): sd 9.5; 50..150 is more than 5 sd either way
    assert 50 <= seen["2.0"] <= 150, seen
    assert named == {"1.0"}
    t = _traffic(srv, "canary")
    assert t["stats"]["2.0"]["requests"] == seen["2.0"] and t["stats"]["1.0"]["requests"] == seen["1.0"] + 30
    assert t["stats"]["2.0"]["errors"] == 0 and t["stats"]["2.0"]["latency_count"] == seen["2.0"]
    described = httpx.get(f"{m}/models/canary").json()[0]
    assert described["routing"]["weights"] == {"1.0": 90, "2.0": 10}
    assert _metric(srv, "osprey_traffic_share", model="canary", version="2.0") == 0.1
    assert _metric(srv, "osprey_model_default_version_info", model="canary", version="1.0") == 1
    # weights cleared: everything to the default again
    assert httpx.put(f"{m}/models/canary/traffic", json={"weights": {}}).json()["shares"] == {"1.0": 1.0}
    with httpx.Client(timeout=60) as c:
        assert {c.post(url, json={}).json()["version"] for _ in range(30)} == {"1.0"}
    assert _metric(srv, "osprey_traffic_share", model="canary", version="1.0") == 1


def test_shadow_answers_are_discarded_counted_and_never_delay_the_default(srv, tmp_path):
    m, url = srv.management, f"{srv.inference}/predictions/shadowed"
    r = httpx.put(f"{m}/models/shadowed/shadow", json={"version": "2.0"})
    assert r.status_code == 200 and r.json()["shadow"] == "2.0", r.text
    gate = Gate(tmp_path)
    with httpx.Client(timeout=60) as c:
        # the shadow's copy of this request holds in its handler; the client has its answer already
        r = c.post(url, json={"id": "held", "gate": gate.value, "hold_on": ["2.0"]})
        assert r.status_code == 200 and r.json()["version"] == "1.0"
        gate.wait_entered()
        answers = [c.post(url, json={"id": i}).json()["version"] for i in range(5)]
        assert answers == ["1.0"] * 5  # the shadow is stuck; the default answers regardless
        # two copies wait in the shadow's queue (jobQueueSize 2); the other three were dropped
        wait_until(lambda: _traffic(srv, "shadowed")["shadow_results"]["dropped"] == 3, 30, "3 dropped copies")
        gate.open()
        wait_until(lambda: _traffic(srv, "shadowed")["shadow_results"]["disagree"] == 3, 30, "3 compared copies")
        for i in range(3):  # a request naming a version is never copied
            assert c.post(f"{url}/1.0", json={"id": f"named{i}"}).json()["version"] == "1.0"
        assert c.post(url, json={"id": "last"}).json()["version"] == "1.0"
        wait_until(lambda: _traffic(srv, "shadowed")["shadow_results"]["disagree"] == 4, 30, "the last copy")
    t = _traffic(srv, "shadowed")
    assert t["shadow_results"] == {"agree": 0, "disagree": 4, "error": 0, "dropped": 3}
    assert t["stats"]["2.0"]["requests"] == 4 and t["stats"]["1.0"]["requests"] == 10
    assert _metric(srv, "osprey_shadow_requests_total", model="shadowed", version="2.0", result="dropped") == 3
    # the same model as its shadow: every copy agrees
    assert httpx.put(f"{m}/models/twin/shadow", json={"version": "2.0"}).status_code == 200
    with httpx.Client(timeout=60) as c:
        for _ in range(5):
            assert c.post(f"{srv.inference}/predictions/twin", json=ROW).status_code == 200
    wait_until(lambda: _traffic(srv, "twin")["shadow_results"]["agree"] == 5, 30, "5 agreeing copies")
    r = httpx.delete(f"{m}/models/twin/shadow")
    assert r.status_code == 200 and r.json()["shadow"] is None


class _Load:
    """Client threads sending to the model's default route until stopped; every answer kept."""

    def __init__(self, url: str, threads: int = 4):
        self.url, self.answers, self._lock, self._stop = url, [], threading.Lock(), threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]
        for t in self._threads:
            t.start()

    def _run(self) -> None:
        with httpx.Client(timeout=60) as c:
            while not self._stop.is_set():
                try:
                    r = c.post(self.url, json={})
                    answer = (r.status_code, r.json()["version"] if r.status_code == 200 else r.text)
                except Exception as exc:
                    answer = (0, repr(exc))
                with self._lock:
                    self.answers.append(answer)

    def count(self, version: str) -> int:
        with self._lock:
            return sum(1 for s, v in self.answers if s == 200 and v == version)

    def more(self, version: str, n: int = 20) -> None:
        start = self.count(version)
        wait_until(lambda: self.count(version) >= start + n, 60, f"{n} more answers from {version}")

    def stop(self) -> list:
        self._stop.set()
        for t in self._threads:
            t.join(60)
        return self.answers


def test_canary_promotion_and_rollback_under_load_fail_no_request(srv):
    m = srv.management
    assert _metric(srv, "osprey_model_rollbacks_total", model="roll") == 0  # from registration on
    load = _Load(f"{srv.inference}/predictions/roll")
    try:
        load.more("1.0")
        assert httpx.put(f"{m}/models/roll/traffic", json={"weights": {"1.0": 80, "2.0": 20}}).status_code == 200
        load.more("2.0", 5)
        # promotion: set-default, then clear the weights
        assert httpx.put(f"{m}/models/roll/2.0/set-default").status_code == 200
        assert httpx.put(f"{m}/models/roll/traffic", json={"weights": None}).json()["shares"] == {"2.0": 1.0}
        load.more("2.0")
        r = httpx.post(f"{m}/models/roll/rollback")
        assert r.status_code == 200 and r.json()["default"] == "1.0" and r.json()["previous"] == "2.0", r.text
        load.more("1.0")
        r = httpx.post(f"{m}/models/roll/rollback")  # nothing further back
        assert r.status_code == 409 and "no earlier default" in r.json()["message"]
        # the same through the CLI
        assert httpx.put(f"{m}/models/roll/2.0/set-default").status_code == 200
        load.more("2.0")
        cli = subprocess.run([sys.executable, "-m", "server.cli", "rollback", "roll", "--management", m],
                             capture_output=True, text=True, cwd=ROOT, timeout=120)
        assert cli.returncode == 0 and 'rolled back from version "2.0" to "1.0"' in cli.stdout, cli.stderr
        load.more("1.0")
        cli = subprocess.run([sys.executable, "-m", "server.cli", "rollback", "roll", "--management", m],
                             capture_output=True, text=True, cwd=ROOT, timeout=120)
        assert cli.returncode == 1 and "HTTP 409" in cli.stderr and "no earlier default" in cli.stderr
        assert _metric(srv, "osprey_model_rollbacks_total", model="roll") == 2  # the refused ones do not count
    finally:
        answers = load.stop()
    failed = [a for a in answers if a[0] != 200]
    assert not failed, f"{len(failed)} of {len(answers)} requests failed, e.g. {failed[:3]}"
    assert _traffic(srv, "roll")["default"] == "1.0"


@pytest.mark.parametrize("method, path, body, status, words", [
    ("PUT", "canary/traffic", b"{not json", 400, "not valid JSON"),
    ("PUT", "canary/traffic", b"", 400, "JSON request body is required"),
    ("PUT", "canary/traffic", b"[1, 2]", 400, "must be a JSON object"),
    ("PUT", "canary/traffic", b"{}", 400, "field 'weights' is required"),
    ("PUT", "canary/traffic", b'{"weights": {"1.0": 1}, "share": 3}', 400, "unknown field(s) 'share'"),
    ("PUT", "canary/traffic", b'{"weights": [90, 10]}', 400, "must be an object of version: weight"),
    ("PUT", "canary/traffic", b'{"weights": {"1.0": -5}}', 400, "version 1.0 must be a finite number >= 0"),
    ("PUT", "canary/traffic", b'{"weights": {"1.0": "ninety"}}', 400, "version 1.0 must be a number"),
    ("PUT", "canary/traffic", b'{"weights": {"1.0": 0, "2.0": 0}}', 400, "all zero"),
    ("PUT", "canary/traffic", b'{"weights": {"1.0": 90, "7.0": 10}}', 404, "7.0"),
    ("PUT", "nope/traffic", b'{"weights": {"1.0": 1}}', 404, "Model not found: nope"),
    ("PUT", "canary/shadow", b'{"version": 2}', 400, "field 'version' must be a version string"),
    ("PUT", "canary/shadow", b'{}', 400, "field 'version' must be a version string"),
    ("PUT", "canary/shadow", b'{"version": "1.0"}', 409, "is the default version"),
    ("PUT", "canary/shadow", b'{"version": "7.0"}', 404, "7.0"),
    ("POST", "canary/rollback", b"", 409, "no earlier default"),
    ("GET", "nope/traffic", b"", 404, "Model not found: nope"),
])
def test_bad_traffic_requests_are_refused_naming_what_is_wrong(srv, method, path, body, status, words):
    before = _traffic(srv, "canary")
    r = httpx.request(method, f"{srv.management}/models/{path}", content=body,
                      headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == status, r.text
    assert words in r.json()["message"], r.json()["message"]
    after = _traffic(srv, "canary")
    assert {k: after[k] for k in ("default", "weights", "shadow")} == {k: before[k] for k in ("default", "weights", "shadow")}


def test_traffic_routes_and_the_cli_need_the_management_key(osprey, store, tmp_path):
    _archives(store, "keyed", "1.0", "2.0")
    srv = osprey([], store, token_auth=True)
    key = srv.keys()["management"]["key"]
    auth = {"Authorization": f"Bearer {key}"}
    m = srv.management
    for url in ("keyed1.0.mar", "keyed2.0.mar"):
        assert httpx.post(f"{m}/models", params={"url": url}, headers=auth, timeout=120).status_code == 200
    assert httpx.put(f"{m}/models/keyed/traffic", json={"weights": {"2.0": 1}}).status_code == 401
    assert httpx.post(f"{m}/models/keyed/rollback").status_code == 401
    inference = {"Authorization": f"Bearer {srv.keys()['inference']['key']}"}
    assert httpx.put(f"{m}/models/keyed/traffic", json={"weights": {"2.0": 1}}, headers=inference).status_code == 401
    r = httpx.put(f"{m}/models/keyed/traffic", json={"weights": {"2.0": 1}}, headers=auth)
    assert r.status_code == 200 and r.json()["shares"] == {"2.0": 1.0}
    assert httpx.put(f"{m}/models/keyed/2.0/set-default", headers=auth).status_code == 200
    base = [sys.executable, "-m", "server.cli", "rollback", "keyed", "--management", m]
    cli = subprocess.run(base, capture_output=True, text=True, cwd=tmp_path, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert cli.returncode == 1 and "HTTP 401" in cli.stderr and "--token" in cli.stderr, cli.stderr
    cli = subprocess.run(base + ["--key-file", str(srv.workdir / "key_file.json")], capture_output=True, text=True,
                         cwd=tmp_path, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert cli.returncode == 0 and 'to "1.0"' in cli.stdout, cli.stderr
    r = httpx.get(f"{m}/models/keyed/traffic", headers=auth).json()
    assert (r["default"], r["weights"]) == ("1.0", {})  # rollback cleared the weights
