"""Two replicas sharing one real redis-server: one drift status, one episode; Redis down and
back. Every wait is ``Monitor.drain`` (no sleeps)."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import pytest

from monitoring.monitor import Monitor
from tests.redis_server import redis_server  # noqa: F401 (fixture)

from .test_monitor import CFG, Versions, archive, obs, stream  # noqa: F401 (fixture)


@pytest.fixture
def replicas(redis_server):  # noqa: F811
    made = []

    def make(versions, n=2):
        for _ in range(n):
            made.append(Monitor(SimpleNamespace(monitoring=True, redis_url=redis_server.url), versions))
        return made[-n:]
    yield make
    for m in made:
        m.close()


def drain_all(*monitors):
    for _ in range(2):  # the second round re-reads what the others committed
        for m in monitors:
            assert m.drain(30)


def shared(status):
    return {k: status[k] for k in ("reference", "requests", "windows", "drift", "history")}


def test_two_replicas_show_one_status_and_one_episode(archive, replicas):  # noqa: F811
    versions = Versions()
    versions.add("m", "1", archive, replace(CFG, drift_share=0.2))
    a, b = replicas(versions)
    traffic = stream(1000, 10) + stream(2000, 20, shift=1.0)
    for i, o in enumerate(traffic):
        (a if i % 2 else b).observe(o)
    drain_all(a, b)
    sa, sb = a.status("m", "1"), b.status("m", "1")
    assert shared(sa) == shared(sb)
    assert sa["requests"] == 3000 and sa["windows"] == 6 and sa["degraded"] is None
    assert sa["drift"]["detected"] and sa["drift"]["episodes"] == 1 and sa["drift"]["features"][0]["name"] == "x"
    assert [h["window"] for h in sa["history"]] == [1, 2, 3, 4, 5, 6]
    for m in (a, b):  # each replica exports the shared episode and its own rows
        text = m.render()
        assert 'osprey_drift_episodes_total{model="m",version="1"} 1.0' in text
        assert 'osprey_monitored_requests_total{model="m",version="1"} 1500.0' in text


def test_a_replica_without_traffic_reads_the_shared_state(archive, replicas):  # noqa: F811
    versions = Versions()
    versions.add("m", "1", archive)
    a, b = replicas(versions)
    for o in stream(1000, 30):
        a.observe(o)
    drain_all(a)
    b.status("m", "1")  # first ask: b starts following the version
    drain_all(b)
    assert shared(b.status("m", "1")) == shared(a.status("m", "1"))
    assert b.status("m", "1")["windows"] == 2


def test_replicas_adopt_one_baseline(tmp_path, replicas):
    versions = Versions()
    versions.add("m", "1", tmp_path, replace(CFG, baseline_requests=500))
    a, b = replicas(versions)
    for o in stream(600, 40):
        a.observe(o)
    b.observe(obs(50, 99))
    drain_all(a, b)
    va, vb = a._versions[("m", "1")], b._versions[("m", "1")]
    assert va.layout.fingerprint == vb.layout.fingerprint
    sb = b.status("m", "1")
    assert sb["reference"] == "baseline" and sb["baseline_progress"] == {"rows": 500, "needed": 500}
    for i, o in enumerate(stream(1000, 50)):
        (a if i % 2 else b).observe(o)
    drain_all(a, b)
    assert a.status("m", "1")["windows"] == b.status("m", "1")["windows"] == 2


def test_redis_down_degrades_monitoring_only_and_it_catches_up(archive, replicas, redis_server):  # noqa: F811
    versions = Versions()
    versions.add("m", "1", archive)
    (m,) = replicas(versions, n=1)
    for o in stream(500, 60):
        m.observe(o)
    drain_all(m)
    assert m.status("m", "1")["windows"] == 1
    redis_server.stop()
    for o in stream(1000, 70):
        m.observe(o)  # the serving side: an append, whatever Redis does
    assert m.drain(30)
    s = m.status("m", "1")
    assert s["degraded"].startswith("Redis unavailable: ConnectionError")
    assert s["windows"] == 1  # the last state read, still answered
    assert 'osprey_monitoring_degraded{model="m",version="1"} 1.0' in m.render()
    redis_server.start()  # a fresh Redis (no persistence): the buffered rows arrive in order
    drain_all(m)
    s = m.status("m", "1")
    assert s["degraded"] is None and s["requests"] == 1000 and s["windows"] == 2
    assert 'osprey_monitoring_degraded{model="m",version="1"} 0.0' in m.render()
