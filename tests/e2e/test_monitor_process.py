"""The monitor in its own process (setting ``monitor_isolation=process``, the default), against a
real server.

One ``osprey serve`` with the default settings serves a thread-instance and a
process-instance classifier, each also with retraining on (its answered inputs held for
their labels). What tests/e2e/test_monitoring.py checks in depth (there, replica B keeps the
monitor a thread of its server) holds here with process instances too: drift episodes, the
JSON, Prometheus families, feedback joins and live quality, labelled rows kept for retraining,
and process instances' children sending their observations to the monitor process themselves. Killing the monitor process
leaves serving alone: predictions keep answering, the monitoring API answers 503 naming it,
and a new monitor process takes over. Every wait is on state, never a sleep.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from monitoring.monitor import FEEDBACK_SETTLE_S
from monitoring.process import PROCESS_NAME
from tests.conftest import ROOT, OspreyProcess
from tests.e2e.test_monitoring import (BASELINE, REPLICA_MONITORING, _drift_through, _post_feedback, _requests,
                                      send_rest)
from tests.monitoring_models import classifier_archive, metric_lines, rows, wait_monitoring
from tests.redis_server import RedisProcess

RETRAINING = {"triggers": [], "min_labels": 10}


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    root = tmp_path_factory.mktemp("monitor-process")
    store = root / "store"
    store.mkdir()
    classifier_archive(store, "clf_rest")
    classifier_archive(store, "clf_proc", isolation="process")
    classifier_archive(store, "clf_keep", isolation="process", retraining=RETRAINING)
    classifier_archive(store, "clf_keep_t", retraining=RETRAINING)
    classifier_archive(store, "clf_live", retraining=RETRAINING)
    classifier_archive(store, "clf_live_p", isolation="process", retraining=RETRAINING)
    models = [f"{n}={n}.mar" for n in ("clf_rest", "clf_proc", "clf_keep", "clf_keep_t", "clf_live", "clf_live_p")]
    (root / "srv").mkdir()
    proc = OspreyProcess(root / "srv", store, models, extra_args=["--no-grpc"])  # (the default: a monitor process)
    try:
        proc.wait_ready(120)
        yield proc
    finally:
        proc.stop()


def _monitor_pids(server_pid: int) -> list[int]:
    """The server's children named as the monitor process names itself."""
    out = []
    for task in Path(f"/proc/{server_pid}/task").iterdir():
        try:
            children = (task / "children").read_text().split()
        except OSError:  # a thread that ended meanwhile
            continue
        for pid in children:
            try:
                if Path(f"/proc/{pid}/comm").read_text().strip() == PROCESS_NAME:
                    out.append(int(pid))
            except OSError:
                continue
    return out


def _socket_folder(pid: int) -> Path:
    """The folder of the Unix socket process ``pid`` listens on (from /proc/net/unix)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    for line in Path("/proc/net/unix").read_text().splitlines()[1:]:
        fields = line.split()
        if len(fields) >= 8 and fields[6] in inodes and fields[7].endswith("monitor.sock"):
            return Path(fields[7]).parent
    raise AssertionError(f"process {pid} listens on no monitor.sock")


def _gauge(srv, name: str) -> float:
    text = httpx.get(f"{srv.metrics}/metrics", timeout=30).text
    values = [float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " ")]
    assert len(values) == 1, f"{name}: {values}"
    return values[0]


def _wait(predicate, what: str, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = predicate()
        if got:
            return got
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_the_monitor_runs_in_a_child_process_of_the_server(srv):
    pids = _wait(lambda: _monitor_pids(srv.proc.pid), "the monitor process")
    assert len(pids) == 1 and pids[0] != srv.proc.pid
    # the server's own threads: no analysis thread of the in-process monitor beside its link
    names = {(t / "comm").read_text().strip() for t in Path(f"/proc/{srv.proc.pid}/task").iterdir()}
    assert "osprey-monitor" in names and PROCESS_NAME not in names
    assert _gauge(srv, "osprey_monitor_process_up") == 1 and _gauge(srv, "osprey_monitor_process_restarts_total") == 0


def test_drift_through_rest_with_thread_instances(srv):
    _drift_through(srv, "clf_rest", lambda data: send_rest(srv.inference, "clf_rest", data))
    assert metric_lines(srv.metrics, "osprey_drift_detected", "clf_rest") == {'{model="clf_rest",version="1.0"}': 1.0}
    assert metric_lines(srv.metrics, "osprey_drift_episodes_total", "clf_rest") == {
        '{model="clf_rest",version="1.0"}': 1.0}


def test_feedback_joins_and_live_quality_through_the_monitor_process(srv):
    sent = send_rest(srv.inference, "clf_proc", rows(60, seed=6))
    s = wait_monitoring(srv.inference, "clf_proc", _requests(60))
    assert s["requests"] == 60 and s["baseline_progress"] == {"rows": 60, "needed": BASELINE}
    assert s["degraded"] is None
    r = _post_feedback(srv, "clf_proc", [{"request_id": rid, "label": cls} for rid, cls in sent[:20]] +
                       [{"request_id": "never-sent", "label": 1}, {"request_id": sent[20][0], "label": "x"}])
    assert r.status_code == 200, r.text
    body = r.json()
    assert {k: body[k] for k in ("accepted", "unmatched", "invalid")} == {"accepted": 20, "unmatched": 1, "invalid": 1}
    assert body["errors"] == [f"feedback[21] (request_id '{sent[20][0]}'): label 'x' is not a class of this model "
                              "(a class index 0..2)"]
    q = httpx.get(f"{srv.inference}/monitoring/clf_proc").json()["quality"]
    assert q["labels"] == 20 and q["metrics"]["accuracy"] == 1.0
    assert metric_lines(srv.metrics, "osprey_monitored_requests_total", "clf_proc") == {
        '{model="clf_proc",version="1.0"}': 60.0}
    feedback = metric_lines(srv.metrics, "osprey_feedback_total", "clf_proc")
    assert feedback['{model="clf_proc",version="1.0",result="matched"}'] == 20.0


@pytest.mark.parametrize("model", ["clf_keep", "clf_keep_t"])
def test_labelled_inputs_are_kept_for_retraining(srv, model):
    """Process instances' children hold their answered inputs in the monitor process; thread
    instances' are held through the server's link: a label joins them either way."""
    sent = send_rest(srv.inference, model, rows(12, seed=9))
    wait_monitoring(srv.inference, model, _requests(12))
    r = _post_feedback(srv, model, [{"request_id": rid, "label": cls} for rid, cls in sent])
    assert r.status_code == 200 and r.json() == {"accepted": 12, "unmatched": 0, "invalid": 0, "kept": 12}, r.text
    # the rows file the retraining job reads, written by the monitor process
    rows_file = Path(srv.store) / ".osprey" / "datasets" / f"{model}.pkl"
    assert rows_file.is_file() and rows_file.stat().st_size > 0


@pytest.mark.parametrize("model", ["clf_live", "clf_live_p"])
def test_under_traffic_a_label_sent_with_its_answer_joins_and_an_unknown_id_does_not_hold_the_call(srv, model):
    """While predictions keep coming, a label sent the moment its answer arrived joins its
    prediction and its held inputs, and a label for an id nobody answered is counted unmatched
    without waiting for predictions that might still come: the data plane first has the
    model's instances hand over what they captured (a barrier; a process instance's child also
    posts a mark behind its observations on its own link to the monitor process, which the
    monitor reads before the join), so nothing of this server's is on its way. Without the
    barrier such a call waited FEEDBACK_SETTLE_S (10 s) while traffic flowed (every new
    observation looked like the label's prediction arriving), past this client's timeout."""
    stop = threading.Event()
    sent = []

    def traffic():
        data = rows(100, seed=12)
        with httpx.Client(base_url=srv.inference, timeout=30) as c:
            while not stop.is_set():
                r = c.post(f"/predictions/{model}", json=data[len(sent) % len(data)].tolist())
                sent.append(r.status_code)

    loader = threading.Thread(target=traffic, name="traffic")
    loader.start()
    try:
        wait_monitoring(srv.inference, model, _requests(50), what="traffic flowing through the monitor")
        for k in range(3):
            (rid, cls), = send_rest(srv.inference, model, rows(1, seed=40 + k))
            r = httpx.post(f"{srv.inference}/feedback/{model}", timeout=FEEDBACK_SETTLE_S * 0.8,
                           json=[{"request_id": rid, "label": cls}, {"request_id": f"never-answered-{k}", "label": 0}])
            assert r.status_code == 200, r.text
            assert r.json() == {"accepted": 1, "unmatched": 1, "invalid": 0, "kept": 1,
                                "unmatched_ids": [f"never-answered-{k}"]}, r.text
        assert loader.is_alive() and len(sent) > 50  # the traffic never stopped meanwhile
    finally:
        stop.set()
        loader.join()
    assert set(sent) == {200}


def test_killing_the_monitor_process_leaves_serving_alone(srv):
    old = _wait(lambda: _monitor_pids(srv.proc.pid), "the monitor process")[0]
    os.kill(old, signal.SIGKILL)
    # the monitoring API names what happened (the next process starts at least 1 s after the
    # exit is seen), then answers again once the new process is up
    seen_503 = []

    def back():
        r = httpx.get(f"{srv.inference}/monitoring/clf_proc", timeout=30)
        if r.status_code == 503:
            seen_503.append(r.json()["message"])
            return None
        return r if r.status_code == 200 and seen_503 else None
    _wait(back, "a 503 naming the monitor process, then the monitoring API answering again")
    assert seen_503[-1].startswith(f"monitoring is unavailable: the monitor process (pid {old}) exited with code -9; "
                                   "it is being restarted"), seen_503
    # serving went on meanwhile, and goes on
    for answer in send_rest(srv.inference, "clf_rest", rows(20, seed=11)):
        assert answer[0]
    new = _monitor_pids(srv.proc.pid)
    assert new and old not in new
    # the new process monitors new traffic (what the old one kept in memory is gone)
    send_rest(srv.inference, "clf_proc", rows(30, seed=12))
    s = wait_monitoring(srv.inference, "clf_proc", _requests(30))
    assert s["requests"] == 30, s["requests"]
    assert "event=monitor_process_exited" in srv.log()
    assert srv.proc.poll() is None
    assert _gauge(srv, "osprey_monitor_process_up") == 1 and _gauge(srv, "osprey_monitor_process_restarts_total") == 1


def test_the_server_stops_its_monitor_process(tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    classifier_archive(store, "clf")
    proc = OspreyProcess(tmp_path, store, ["clf=clf.mar"], config={"monitor_isolation": "process"},
                         extra_args=["--no-grpc"])
    try:
        proc.wait_ready(120)
        pid = _wait(lambda: _monitor_pids(proc.proc.pid), "the monitor process")[0]
        folder = _socket_folder(pid)
        assert folder.is_dir()
        proc.proc.send_signal(signal.SIGTERM)
        assert proc.proc.wait(60) == 0
        assert not Path(f"/proc/{pid}").exists()  # ended and reaped by the server, not left to init
        assert not folder.exists()
        assert "event=monitor_process_killed" not in proc.log()  # it ended when told, not killed
    finally:
        proc.stop()


def test_a_bad_monitor_isolation_setting_is_refused(tmp_path):
    r = subprocess.run([sys.executable, "-m", "server.cli", "serve", "--foreground", "--model-store", str(tmp_path),
                        "--no-grpc"], capture_output=True, text=True, timeout=60, cwd=tmp_path,
                       env={**os.environ, "PYTHONPATH": str(ROOT), "OSPREY_MONITOR_ISOLATION": "fork"})
    assert r.returncode != 0
    assert "setting monitor_isolation: 'fork' must be thread or process" in r.stderr + r.stdout


def test_with_redis_a_new_monitor_process_carries_on_where_the_killed_one_stopped(tmp_path):
    """What the monitor keeps in Redis (windows, the prediction log) outlives its process: after
    a SIGKILL the new process reports the windows already closed, and a label for a prediction
    answered before the kill still joins."""
    store = tmp_path / "store"
    store.mkdir()
    classifier_archive(store, "clf", monitoring=REPLICA_MONITORING)
    redis = RedisProcess(tmp_path / "redis").start()
    proc = OspreyProcess(tmp_path, store, ["clf=clf.mar"], extra_args=["--no-grpc"],
                         config={"monitor_isolation": "process", "redis_url": redis.url})
    try:
        proc.wait_ready(120)
        sent = send_rest(proc.inference, "clf", rows(60, seed=21))  # the baseline of 60 ...
        wait_monitoring(proc.inference, "clf", lambda s: s["baseline_progress"] == {"rows": 60, "needed": 60})
        sent += send_rest(proc.inference, "clf", rows(60, seed=22))  # ... then a window of 50
        before = wait_monitoring(proc.inference, "clf", lambda s: s["windows"] >= 1 and s["requests"] >= 120)
        assert before["reference"] == "baseline" and before["degraded"] is None
        old = _wait(lambda: _monitor_pids(proc.proc.pid), "the monitor process")[0]
        os.kill(old, signal.SIGKILL)

        def restarted():
            pids = _monitor_pids(proc.proc.pid)
            if not pids or old in pids:
                return None
            r = httpx.get(f"{proc.inference}/monitoring/clf", timeout=30)
            # its first answer may precede its first read of Redis (as a new replica's): wait for that
            return r.json() if r.status_code == 200 and r.json()["windows"] else None
        after = _wait(restarted, "a new monitor process reporting the windows kept in Redis")
        assert after["windows"] == before["windows"] and after["history"] == before["history"]
        assert after["reference"] == "baseline"  # the shared profile, not a new baseline
        r = _post_feedback(proc, "clf", [{"request_id": rid, "label": cls} for rid, cls in sent[:5]])
        assert r.status_code == 200 and r.json() == {"accepted": 5, "unmatched": 0, "invalid": 0}, r.text
    finally:
        proc.stop()
        redis.stop()
