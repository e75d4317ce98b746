"""The replicas' shared routing (server/shared_routing.py) against a real redis-server.

Two registries in one process stand for two replicas (stand-in versions, so nothing loads):
a change made through one is the other's after a sync, two changes made at the same moment
through different replicas both survive (compare-and-set on the revision), a refused change
writes nothing, and the document rules for registered and unregistered versions.
"""

from __future__ import annotations

import asyncio
import json
import time
from types import SimpleNamespace

import pytest
import redis

from server.core.errors import ErrorKind, OspreyError
from server.core.registry import Registry, _Model
from server.core.stats import VersionStats
from server.settings import Settings
from server.shared_routing import PREFIX, SharedRouting, with_version, without_version
from tests.redis_server import redis_server  # noqa: F401 (fixture)


def _version(version: str, created: float = 0.0):
    config = SimpleNamespace(batch_size=1, max_batch_delay_ms=5.0, response_timeout_s=10.0, min_workers=1)
    return SimpleNamespace(name="m", version=version, ready=True, instances=[], shadow_results={},
                           stats=VersionStats(), url=f"m{version}.mar", handler="h", config=config, created=created)


def _replica(tmp_path, url: str, name: str):
    reg = Registry(Settings(workdir=str(tmp_path / name)), asyncio.get_running_loop(), instance_factory=None)
    reg.models["m"] = _Model(versions={v: _version(v) for v in ("1.0", "2.0", "3.0")}, default="1.0")
    shared = SharedRouting(reg, url, interval=0.05)
    reg.shared = shared
    return reg, shared


def _doc(url: str) -> tuple[int, dict]:
    raw = redis.Redis.from_url(url).hgetall(PREFIX + "model:m")
    return int(raw[b"revision"]), json.loads(raw[b"doc"])


async def test_a_change_through_one_replica_is_the_others_after_a_sync(tmp_path, redis_server):  # noqa: F811
    a, sa = _replica(tmp_path, redis_server.url, "a")
    b, sb = _replica(tmp_path, redis_server.url, "b")
    try:
        assert not await sa.reconcile()  # the first sync publishes what A holds; the next applies it
        assert await sa.reconcile() and await sb.reconcile()
        rev, doc = _doc(redis_server.url)
        assert doc["default"] == "1.0" and sorted(doc["versions"]) == ["1.0", "2.0", "3.0"]
        assert doc["versions"]["2.0"]["url"] == "m2.0.mar" and doc["versions"]["2.0"]["options"]["batch_size"] == 1
        await sa.change("m", lambda: a.set_default("m", "2.0"))
        await sa.change("m", lambda: a.set_traffic("m", {"2.0": 9, "3.0": 1}))
        rev2, doc = _doc(redis_server.url)
        assert rev2 > rev and doc["default"] == "2.0" and doc["previous"] == ["1.0"]
        assert b.traffic("m")["default"] == "1.0"  # not yet: B has not synced
        await sb.reconcile()
        t = b.traffic("m")
        assert (t["default"], t["weights"], t["previous"]) == ("2.0", {"2.0": 9.0, "3.0": 1.0}, ["1.0"])
        assert b.route("m").version in ("2.0", "3.0")
        # a rollback through B is A's
        await sb.change("m", lambda: b.rollback("m"))
        await sa.reconcile()
        t = a.traffic("m")
        assert (t["default"], t["weights"], t["previous"]) == ("1.0", {}, [])
        assert a.rollbacks("m") == 0 and b.rollbacks("m") == 1  # counted where it was done (summed over replicas)
    finally:
        await sa.close()
        await sb.close()


async def test_changes_made_at_the_same_time_on_two_replicas_both_survive(tmp_path, redis_server):  # noqa: F811
    a, sa = _replica(tmp_path, redis_server.url, "a")
    b, sb = _replica(tmp_path, redis_server.url, "b")
    try:
        await sa.reconcile()
        await sb.reconcile()
        # both start from the same revision; B's write loses the race, re-reads A's, redoes its own
        await asyncio.gather(sa.change("m", lambda: a.set_traffic("m", {"1.0": 1, "3.0": 1})),
                             sb.change("m", lambda: b.set_shadow("m", "2.0")))
        _, doc = _doc(redis_server.url)
        assert doc["weights"] == {"1.0": 1.0, "3.0": 1.0} and doc["shadow"] == "2.0", doc
        await sa.reconcile()
        await sb.reconcile()
        for reg in (a, b):
            t = reg.traffic("m")
            assert t["weights"] == {"1.0": 1.0, "3.0": 1.0} and t["shadow"] == "2.0", t
    finally:
        await sa.close()
        await sb.close()


async def test_a_refused_change_writes_nothing_and_the_pubsub_message_syncs_without_the_tick(tmp_path, redis_server):  # noqa: F811
    a, sa = _replica(tmp_path, redis_server.url, "a")
    b, sb = _replica(tmp_path, redis_server.url, "b")
    sb.interval = 30.0  # only the pub/sub message can make B sync within the test
    try:
        await sa.reconcile()
        await sb.start()
        await asyncio.sleep(0)
        rev, _ = _doc(redis_server.url)
        with pytest.raises(OspreyError) as e:
            await sa.change("m", lambda: a.set_shadow("m", "1.0"))  # the default: 409, as on one server
        assert e.value.kind is ErrorKind.CONFLICT
        assert _doc(redis_server.url)[0] == rev
        await sa.change("m", lambda: a.set_default("m", "3.0"))
        deadline = time.monotonic() + 10
        while b.traffic("m")["default"] != "3.0":
            assert time.monotonic() < deadline, b.traffic("m")
            await asyncio.sleep(0.01)
    finally:
        await sa.close()
        await sb.close()


def test_the_document_rules_for_versions_registered_and_unregistered():
    doc = {"versions": {}, "removed": {"2.0": 5.0}, "default": "", "previous": [], "weights": {}, "shadow": None}
    with_version(doc, "1.0", {"url": "a"})
    with_version(doc, "2.0", {"url": "b"})
    assert doc["default"] == "1.0" and doc["removed"] == {}  # registered again: no longer removed
    with_version(doc, "2.0", {"url": "other"})
    assert doc["versions"]["2.0"] == {"url": "b"}  # kept as it is: replicas publishing twice change nothing
    with_version(doc, "10.0", {"url": "c"})
    doc.update(default="2.0", previous=["1.0"], weights={"2.0": 1, "10.0": 1}, shadow="10.0")
    without_version(doc, "10.0", 7.0)
    assert doc["weights"] == {"2.0": 1} and doc["shadow"] is None and doc["removed"] == {"10.0": 7.0}
    without_version(doc, "2.0", 8.0)  # the default goes: the newest left takes over, as on one server
    assert doc["default"] == "1.0" and doc["previous"] == [] and doc["weights"] == {}
    without_version(doc, "1.0", 9.0)
    assert doc["versions"] == {} and doc["default"] == ""


async def test_redis_down_refuses_a_change_naming_redis_and_an_emptied_redis_is_filled_again(tmp_path, redis_server):  # noqa: F811
    a, sa = _replica(tmp_path, redis_server.url, "a")
    b, sb = _replica(tmp_path, redis_server.url, "b")
    try:
        await sa.reconcile()
        await sa.change("m", lambda: a.set_default("m", "2.0"))
        await sb.reconcile()
        redis_server.stop()
        with pytest.raises(OspreyError) as e:
            await sa.change("m", lambda: a.set_default("m", "3.0"))
        assert e.value.kind is ErrorKind.UNAVAILABLE and "shared routing state in Redis is unavailable" in e.value.message
        assert a.traffic("m")["default"] == "2.0" and b.traffic("m")["default"] == "2.0"  # serving goes on
        redis_server.start()  # the same port, empty (no persistence): the replicas publish what they have
        for _ in range(3):
            await sa.reconcile()
            await sb.reconcile()
        _, doc = _doc(redis_server.url)
        assert doc["default"] == "2.0" and sorted(doc["versions"]) == ["1.0", "2.0", "3.0"]
        await sb.change("m", lambda: b.set_default("m", "3.0"))
        await sa.reconcile()
        assert a.traffic("m")["default"] == "3.0"
    finally:
        await sa.close()
        await sb.close()


def test_adopt_applies_only_what_this_replica_can_serve_and_names_the_rest(tmp_path):
    loop = asyncio.new_event_loop()
    try:
        reg = Registry(Settings(workdir=str(tmp_path)), loop, instance_factory=None)
        reg.models["m"] = _Model(versions={v: _version(v) for v in ("1.0", "2.0")}, default="1.0")
        reg.models["m"].versions["2.0"].ready = False  # still loading here
        missing = reg.adopt("m", {"default": "2.0", "previous": ["1.0"], "weights": {"1.0": 1, "9.0": 1},
                                  "shadow": "9.0"})
        assert sorted(set(missing)) == ["2.0", "9.0"]
        t = reg.traffic("m")  # the default stays until 2.0 can serve; unknown versions take no traffic
        assert (t["default"], t["weights"], t["shadow"], t["previous"]) == ("1.0", {"1.0": 1.0}, None, [])
        reg.models["m"].versions["2.0"].ready = True
        assert reg.adopt("m", {"default": "2.0", "previous": ["1.0"], "weights": {}, "shadow": "1.0"}) == []
        t = reg.traffic("m")
        assert (t["default"], t["weights"], t["shadow"], t["previous"]) == ("2.0", {}, "1.0", ["1.0"])
        assert reg.route("m").version == "2.0" and reg.shadow_for(reg.models["m"].versions["2.0"]).version == "1.0"
    finally:
        loop.close()
