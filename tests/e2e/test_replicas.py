"""Issue 14 item 4: three real ``osprey serve`` replicas behind a real HAProxy, one real redis-server.

The replicas share a model store and ``redis_url``; HAProxy (Debian's) runs the configuration
``deploy/local-cluster/run`` renders for users (health checks on each replica's readiness
endpoint, retries of failed connections and empty answers on another replica), with short
check intervals. What a user relies on, each checked through the balancer and then on every
replica directly:

* load spreads over the three replicas;
* a version registered, promoted (set-default, canary weights, shadow) or rolled back through
  any replica becomes the routing of every replica within seconds (state in Redis), and a
  replica restarted afterwards starts with it;
* a drift episode seen through the balancer is one status on every replica and exactly one
  retraining job; a label sent to any replica joins the prediction another replica made;
* a rolling restart (SIGTERM one replica, wait until HAProxy has it back, the next) under
  steady load fails no request;
* a replica killed with SIGKILL under steady load: HAProxy routes around it, at most the
  requests in flight at the kill fail (HAProxy retries them elsewhere, so usually none), and
  every request after HAProxy marked it down succeeds.

Every wait polls observable state (answers, HAProxy's stats socket, logs) against a deadline.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.conftest import ROOT, free_port
from tests.models import handler_archive
from tests.monitoring_models import classifier_archive, rows
from tests.prometheus_helpers import require
from tests.redis_server import RedisProcess

REPLICAS = 3
DEADLINE_S = 15.0  # "within seconds": the most a change may take to reach every replica
SHIFT = 2.5  # standard deviations: rows this far off the baseline are drift
# each replica profiles its first rows until one profile is shared (first wins): a small baseline,
# so the ~55 rows each replica gets of the first 160 are past it
MONITORING = {"window": 50, "baseline_requests": 40, "components": 2, "min_labels": 40, "quality_window": 40}

# Answers which version and which process served it; sleeps {"sleep": s} so requests are in flight.
ECHO = '''
import os
import time

class Echo:
    def initialize(self, context):
        self.version = context.manifest["model"]["modelVersion"]

    def handle(self, data, context):
        out = []
        for row in data:
            body = row.get("body")
            if isinstance(body, dict) and body.get("sleep"):
                time.sleep(body["sleep"])
            out.append({"version": self.version, "pid": os.getpid()})
        return out
'''


def _deploy_script():
    """deploy/local-cluster/run as a module: the test renders HAProxy's config as users get it."""
    path = ROOT / "deploy" / "local-cluster" / "run"
    loader = importlib.machinery.SourceFileLoader("local_cluster_run", str(path))
    spec = importlib.util.spec_from_loader("local_cluster_run", loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


class Replica:
    """One ``osprey serve`` on fixed ports (a restart comes back on the same ones)."""

    def __init__(self, name: str, workdir: Path, store: Path, models: list[str], redis_url: str):
        self.name = name
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.ports = {k: free_port() for k in ("inference", "management", "metrics")}
        self.inference = f"http://127.0.0.1:{self.ports['inference']}"
        self.management = f"http://127.0.0.1:{self.ports['management']}"
        self.command = _deploy_script().replica_command(sys.executable, str(store), models, self.ports,
                                                           str(workdir))
        self.env = {**os.environ, "PYTHONPATH": str(ROOT), "OSPREY_REDIS_URL": redis_url}
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def start(self) -> "Replica":
        self.starts += 1
        self.log_path = self.workdir / f"server-{self.starts}.log"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(self.command, cwd=self.workdir, env=self.env, stdout=log,
                                         stderr=subprocess.STDOUT)
        return self

    def wait_ready(self, timeout: float = 90.0) -> "Replica":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.log()}")
            if "Osprey ready" in self.log():
                return self
            time.sleep(0.05)
        raise TimeoutError(f"{self.name} not ready after {timeout} s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


class HAProxy:
    """Debian's haproxy with deploy/local-cluster's configuration; its stats socket tells each
    server's state."""

    def __init__(self, workdir: Path, replicas: list[Replica]):
        self.binary = shutil.which("haproxy") or ("/usr/sbin/haproxy" if Path("/usr/sbin/haproxy").exists()
                                                  else require("haproxy"))
        self.workdir = workdir
        self.ports = {"inference": free_port(), "management": free_port()}
        self.inference = f"http://127.0.0.1:{self.ports['inference']}"
        self.management = f"http://127.0.0.1:{self.ports['management']}"
        self.socket = str(workdir / "haproxy.sock")
        self.config = workdir / "haproxy.cfg"
        self.config.write_text(_deploy_script().render_haproxy(
            [{"name": r.name, "inference_port": r.ports["inference"], "management_port": r.ports["management"]}
             for r in replicas], inference_port=self.ports["inference"], management_port=self.ports["management"],
            stats_socket=self.socket, pid_file=str(workdir / "haproxy.pid"), check_interval="100ms", fall=2,
            rise=1))
        check = subprocess.run([self.binary, "-c", "-f", str(self.config)], capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr
        with open(workdir / "haproxy.log", "wb") as log:
            self.proc = subprocess.Popen([self.binary, "-f", str(self.config)], stdout=log, stderr=subprocess.STDOUT)

    def states(self, backend: str = "inference") -> dict[str, str]:
        """Each server's status in ``backend`` (UP, DOWN, ...), from ``show stat``."""
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(5)
            s.connect(self.socket)
            s.sendall(b"show stat\n")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        lines = data.decode().splitlines()
        header = lines[0].lstrip("# ").split(",")
        out = {}
        for line in lines[1:]:
            row = dict(zip(header, line.split(",")))
            if row.get("pxname") == backend and row.get("svname") not in ("FRONTEND", "BACKEND"):
                out[row["svname"]] = row["status"]
        return out

    def wait_state(self, name: str, status: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                states = {b: self.states(b).get(name) for b in ("inference", "management")}
            except (FileNotFoundError, ConnectionRefusedError):  # HAProxy is starting
                assert self.proc.poll() is None, (self.workdir / "haproxy.log").read_text()
                states = {}
            if states and all(s == status for s in states.values()):
                return
            assert time.monotonic() < deadline, f"HAProxy never had {name} {status}: {states}"
            time.sleep(0.02)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("cluster")
    store = root / "store"
    store.mkdir()
    for v in ("1.0", "2.0", "3.0"):
        handler_archive(store, "echo", ECHO, version=v, config={"batchSize": 1})
        (store / "echo.mar").rename(store / f"echo{v}.mar")
    # drift, feedback and retraining triggers (a job is queued on Redis; no worker runs it here)
    classifier_archive(store, "clf", monitoring=MONITORING, retraining={"triggers": ["drift"], "cooldown": 3600})
    redis = RedisProcess(root / "redis").start()
    replicas = [Replica(f"r{i}", root / f"r{i}", store, ["echo=echo1.0.mar", "clf=clf.mar"], redis.url)
                for i in range(REPLICAS)]
    lb = None
    try:
        for r in replicas:
            r.start()
        for r in replicas:
            r.wait_ready()
        lb = HAProxy(root, replicas)
        for r in replicas:
            lb.wait_state(r.name, "UP")
        yield lb, replicas, redis
    finally:
        for r in replicas:
            r.stop()
        if lb is not None:
            lb.stop()
        redis.stop()


def _infer(client: httpx.Client, body: dict | None = None) -> dict:
    r = client.post("/predictions/echo", json=body or {})
    assert r.status_code == 200, r.text
    return r.json()


def _defaults(replicas: list[Replica]) -> dict[str, str]:
    """What each replica answers a request that names no version with (asked directly)."""
    return {r.name: httpx.post(f"{r.inference}/predictions/echo", json={}, timeout=10).json()["version"]
            for r in replicas}


def _until_every(replicas: list[Replica], what: str, probe) -> None:
    """``probe(replica)`` true on every replica before DEADLINE_S."""
    deadline = time.monotonic() + DEADLINE_S
    while True:
        seen = {r.name: probe(r) for r in replicas}
        if all(seen.values()):
            return
        assert time.monotonic() < deadline, f"not every replica has {what} after {DEADLINE_S} s: {seen}"
        time.sleep(0.05)


class Load:
    """Steady requests through the balancer from ``workers`` threads until stopped; counts
    answers, failures and (for a kill) the requests outstanding at a moment."""

    def __init__(self, base: str, workers: int = 4, sleep: float = 0.02):
        self.base, self.workers, self.body = base, workers, {"sleep": sleep}
        self.ok: list[tuple[float, int]] = []  # (time answered, pid)
        self.failed: list[tuple[float, str]] = []
        self.outstanding = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(workers)]

    def _run(self) -> None:
        with httpx.Client(base_url=self.base, timeout=60) as c:
            while not self._stop.is_set():
                with self._lock:
                    self.outstanding += 1
                try:
                    r = c.post("/predictions/echo", json=self.body)
                    outcome = (r.json()["pid"], None) if r.status_code == 200 else (None, f"{r.status_code} {r.text}")
                except (httpx.HTTPError, ValueError, KeyError) as exc:
                    outcome = (None, f"{type(exc).__name__}: {exc}")
                with self._lock:
                    self.outstanding -= 1
                    if outcome[1] is None:
                        self.ok.append((time.monotonic(), outcome[0]))
                    else:
                        self.failed.append((time.monotonic(), outcome[1]))

    def __enter__(self) -> "Load":
        for t in self._threads:
            t.start()
        self.wait_answers(self.workers * 2)
        return self

    def wait_answers(self, n: int, timeout: float = 30.0) -> None:
        """At least ``n`` more answers arrive (the load really flows)."""
        start = len(self.ok)
        deadline = time.monotonic() + timeout
        while len(self.ok) < start + n:
            assert time.monotonic() < deadline, f"load stalled: {len(self.ok) - start} answers; failed {self.failed[-3:]}"
            time.sleep(0.01)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(60)


def test_load_spreads_over_every_replica(cluster):
    lb, replicas, _ = cluster
    pids = {r.proc.pid for r in replicas}
    with httpx.Client(base_url=lb.inference, timeout=30) as c, ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda _: _infer(c, {"sleep": 0.01})["pid"], range(60)))
    counts = {pid: answers.count(pid) for pid in pids}
    assert set(answers) == pids, counts
    assert min(counts.values()) >= 10, counts  # leastconn over three equal replicas: none starved


def test_a_version_promoted_or_rolled_back_through_any_replica_reaches_every_replica(cluster):
    lb, replicas, _ = cluster
    assert _defaults(replicas) == {r.name: "1.0" for r in replicas}
    # registered through the balancer: one replica takes the call, every replica loads it
    r = httpx.post(f"{lb.management}/models", params={"url": "echo2.0.mar", "model_name": "echo"}, timeout=60)
    assert r.status_code == 200, r.text
    _until_every(replicas, "echo 2.0 READY", lambda rep: httpx.get(
        f"{rep.inference}/v2/models/echo/versions/2.0/ready", timeout=10).status_code == 200)
    # promoted through one replica's own management port: every replica's default within seconds
    r = httpx.put(f"{replicas[0].management}/models/echo/2.0/set-default", timeout=60)
    assert r.status_code == 200, r.text
    _until_every(replicas, "default 2.0", lambda rep: _defaults([rep])[rep.name] == "2.0")
    for rep in replicas:  # describe says so too, with the history for rollback
        routing = httpx.get(f"{rep.management}/models/echo", timeout=10).json()[0]["routing"]
        assert routing["default"] == "2.0" and routing["previous"] == ["1.0"], (rep.name, routing)
    # canary weights and a shadow set through the balancer are every replica's
    r = httpx.put(f"{lb.management}/models/echo/traffic", json={"weights": {"1.0": 1, "2.0": 3}}, timeout=60)
    assert r.status_code == 200, r.text
    _until_every(replicas, "weights 1.0:1 2.0:3", lambda rep: httpx.get(
        f"{rep.management}/models/echo/traffic", timeout=10).json()["weights"] == {"1.0": 1.0, "2.0": 3.0})
    r = httpx.put(f"{lb.management}/models/echo/traffic", json={"weights": {}}, timeout=60)
    assert r.status_code == 200, r.text
    r = httpx.put(f"{lb.management}/models/echo/shadow", json={"version": "1.0"}, timeout=60)
    assert r.status_code == 200, r.text
    _until_every(replicas, "shadow 1.0, no weights", lambda rep: (lambda t: t["shadow"] == "1.0" and t["weights"] == {})(
        httpx.get(f"{rep.management}/models/echo/traffic", timeout=10).json()))
    # a check made where the call lands still answers the caller: 409 naming the version
    r = httpx.put(f"{lb.management}/models/echo/shadow", json={"version": "2.0"}, timeout=60)
    assert r.status_code == 409 and "is the default version" in r.json()["message"], r.text
    # rolled back through the last replica: 1.0 is every replica's default again, the shadow gone
    r = httpx.post(f"{replicas[-1].management}/models/echo/rollback", timeout=60)
    assert r.status_code == 200 and r.json()["default"] == "1.0", r.text
    _until_every(replicas, "default 1.0 after the rollback", lambda rep: _defaults([rep])[rep.name] == "1.0")
    for rep in replicas:
        t = httpx.get(f"{rep.management}/models/echo/traffic", timeout=10).json()
        assert t["default"] == "1.0" and t["shadow"] is None and t["weights"] == {}, (rep.name, t)
    # a version registered through one replica and unregistered through another leaves every replica
    r = httpx.post(f"{replicas[0].management}/models", params={"url": "echo3.0.mar", "model_name": "echo"},
                   timeout=60)
    assert r.status_code == 200, r.text
    _until_every(replicas, "echo 3.0 READY", lambda rep: httpx.get(
        f"{rep.inference}/v2/models/echo/versions/3.0/ready", timeout=10).status_code == 200)
    r = httpx.delete(f"{replicas[1].management}/models/echo/3.0", timeout=60)
    assert r.status_code == 200, r.text
    _until_every(replicas, "echo 3.0 gone", lambda rep: httpx.get(
        f"{rep.management}/models/echo/3.0", timeout=10).status_code == 404)
    # promoted again for what follows: a replica restarted later must come back with 2.0
    r = httpx.put(f"{lb.management}/models/echo/2.0/set-default", timeout=60)
    assert r.status_code == 200, r.text
    _until_every(replicas, "default 2.0 again", lambda rep: _defaults([rep])[rep.name] == "2.0")


def test_drift_through_the_balancer_is_one_status_and_one_job_and_feedback_joins_anywhere(cluster):
    lb, replicas, _ = cluster

    def send(data: np.ndarray) -> list[tuple[str, int]]:
        with httpx.Client(base_url=lb.inference, timeout=30) as c, ThreadPoolExecutor(6) as pool:
            def one(row):
                r = c.post("/predictions/clf", json=row.tolist())
                assert r.status_code == 200, r.text
                return r.headers["x-request-id"], int(np.argmax(r.json()))
            return list(pool.map(one, list(data)))

    def status(rep: Replica) -> dict:
        return httpx.get(f"{rep.inference}/monitoring/clf", timeout=10).json()

    def monitored() -> int:
        return max(status(rep)["requests"] for rep in replicas)

    sent = send(rows(160, seed=1))  # past the baseline (100 rows) and into the first window
    sent += send(rows(150, seed=2, shift=SHIFT))  # three windows of drifted rows
    deadline = time.monotonic() + 30
    while True:  # one drift status: every replica reads the same windows and episode from Redis
        seen = [status(rep) for rep in replicas]
        first = seen[0]
        if first["drift"]["detected"] and all(s["windows"] == first["windows"] and s["drift"] == first["drift"]
                                              and s["history"] == first["history"] for s in seen):
            break
        assert time.monotonic() < deadline, seen
        time.sleep(0.05)
    assert first["drift"]["episodes"] == 1 and first["drift"]["episode"]["open"]
    assert [h["window"] for h in first["history"]] == list(range(1, first["windows"] + 1))
    # exactly one retraining job for the episode, whichever replica is asked
    deadline = time.monotonic() + 30
    while True:
        jobs = [httpx.get(f"{rep.management}/retraining/jobs", params={"model": "clf"}, timeout=10).json()
                for rep in replicas]
        ids = [sorted(j["id"] for j in (listing.get("jobs", listing) if isinstance(listing, dict) else listing))
               for listing in jobs]
        if ids[0]:
            break
        assert time.monotonic() < deadline, jobs
        time.sleep(0.05)
    assert len(ids[0]) == 1 and ids[0] == ids[1] == ids[2], ids
    # labels sent through the balancer (to whichever replica) join predictions made on any replica
    labels = [{"request_id": rid, "label": cls} for rid, cls in sent[:40]]
    accepted = 0
    with httpx.Client(base_url=lb.inference, timeout=30) as c:
        for i in range(0, 40, 4):  # ten calls, spread by the balancer
            r = c.post("/feedback/clf", json=labels[i:i + 4])
            assert r.status_code == 200, r.text
            accepted += r.json()["accepted"]
            assert r.json()["unmatched"] == 0, r.text
    assert accepted == 40
    # the same label sent again, to another replica: counted once
    r = httpx.post(f"{replicas[1].inference}/feedback/clf", json=labels[:1], timeout=30)
    assert r.json()["accepted"] == 0, r.text
    for rep in replicas:
        q = status(rep)["quality"]
        assert q["labels"] == 40 and q["store"] == "redis", (rep.name, q)
    assert monitored() >= 310


def test_a_replica_killed_under_load_fails_at_most_its_requests_in_flight(cluster):
    lb, replicas, _ = cluster
    victim = replicas[0]
    with Load(lb.inference, workers=4, sleep=0.05) as load:
        load.wait_answers(12)
        with load._lock:  # no request starts or ends meanwhile
            in_flight = load.outstanding  # every request the client had out; the victim held some of them
            victim.proc.send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        victim.proc.wait(10)
        lb.wait_state(victim.name, "DOWN", timeout=10)
        down_at = time.monotonic()
        load.wait_answers(30)
    failed = [f for f in load.failed if f[0] >= killed_at]
    assert len(failed) <= in_flight, (in_flight, failed)
    assert [f for f in failed if f[0] > down_at] == [], failed
    after = [pid for t, pid in load.ok if t > down_at]
    assert len(after) >= 30 and victim.proc.pid not in after
    print(f"\nSIGKILL under load: {in_flight} requests outstanding at the kill, {len(failed)} failed, "
          f"HAProxy marked it down {down_at - killed_at:.2f} s later, {len(after)} answered since")


def test_rolling_restart_under_steady_load_fails_no_request(cluster):
    """SIGTERM one replica (the one killed above is simply started again), wait until HAProxy has
    it back UP, then the next; a steady load meanwhile fails nothing."""
    lb, replicas, _ = cluster
    with Load(lb.inference, workers=2, sleep=0.05) as load:
        for rep in replicas:
            if rep.proc.poll() is None:
                rep.stop(signal.SIGTERM)  # drains: listeners close, readiness 503, what it holds is answered
            lb.wait_state(rep.name, "DOWN")
            rep.start().wait_ready()
            lb.wait_state(rep.name, "UP")
            load.wait_answers(10)
    assert load.failed == [], load.failed[:5]
    served = {pid for _, pid in load.ok}
    assert {r.proc.pid for r in replicas} <= served  # every new process took traffic
    # each restarted replica came back with the shared routing: 2.0 is the default everywhere
    assert _defaults(replicas) == {r.name: "2.0" for r in replicas}
