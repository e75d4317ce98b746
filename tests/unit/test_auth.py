"""Token keys: expiry, rotation, what the key file says."""

from __future__ import annotations

import asyncio
import json
import logging
import time

import pytest

from server.core.errors import ErrorKind, OspreyError
from server.protocols.auth import Keys
from tests.redis_server import redis_server  # noqa: F401 (fixture)


class _Router:
    token = None
    token_expires = None


def test_keys_do_not_expire_by_default_and_rotation_needs_the_api_key(tmp_path):
    keys = Keys(tmp_path / "key_file.json")
    router = _Router()
    keys.attach("inference", router)
    assert router.token == keys.keys["inference"] and router.token_expires is None
    assert keys.check("inference", keys.keys["inference"]) and not keys.check("inference", "wrong")
    old = keys.keys["inference"]
    assert not keys.rotate("inference", keys.keys["management"])
    assert not keys.rotate("API", keys.keys["API"])  # only inference and management keys rotate
    assert keys.rotate("inference", keys.keys["API"])
    assert keys.keys["inference"] != old and router.token == keys.keys["inference"]
    on_disk = json.loads((tmp_path / "key_file.json").read_text())
    assert on_disk["inference"]["key"] == keys.keys["inference"] and set(on_disk) == {"management", "inference", "API"}
    assert (tmp_path / "key_file.json").stat().st_mode & 0o777 == 0o600


def test_keys_expire_after_token_expiration_min_but_the_api_key_never(tmp_path, monkeypatch):
    now = [1_000_000.0]
    monkeypatch.setattr(time, "time", lambda: now[0])
    keys = Keys(tmp_path / "key_file.json", expiration_min=0.5)
    router = _Router()
    keys.attach("management", router)
    assert router.token_expires == now[0] + 30
    assert keys.check("management", keys.keys["management"])
    now[0] += 31
    assert not keys.check("management", keys.keys["management"])
    assert keys.check("API", keys.keys["API"])
    assert keys.rotate("management", keys.keys["API"])
    assert keys.check("management", keys.keys["management"]) and router.token_expires == now[0] + 30


# --- keys an operator supplies, shared by replicas through Redis --------------------------------

SUPPLIED = {"management": "mgmt-key-1", "inference": "infer-key-1", "API": "api-key-01"}


def test_supplied_keys_are_the_keys_and_go_to_the_key_file(tmp_path):
    keys = Keys(tmp_path / "key_file.json", supplied=SUPPLIED)
    assert keys.keys == SUPPLIED and keys.store is None
    on_disk = json.loads((tmp_path / "key_file.json").read_text())
    assert {k: on_disk[k]["key"] for k in on_disk} == SUPPLIED
    assert keys.rotate("inference", "api-key-01") and keys.keys["inference"] != SUPPLIED["inference"]


def test_keys_from_settings(tmp_path):
    from server.settings import Settings

    assert Keys.from_settings(Settings(workdir=str(tmp_path), disable_token_authorization=True)) is None
    made = Keys.from_settings(Settings(workdir=str(tmp_path)))
    assert made.keys != SUPPLIED and made.store is None  # TorchServe's way: random, per process
    given = Keys.from_settings(Settings(workdir=str(tmp_path), key_file="k.json", inference_key="infer-key-1",
                                        management_key="mgmt-key-1", api_key="api-key-01"))
    assert given.keys == SUPPLIED and (tmp_path / "k.json").exists()


def test_supplied_keys_with_redis_follow_a_rotation_and_a_new_secret(tmp_path, redis_server):
    from server.core.shared_keys import RedisKeyStore

    a = Keys(tmp_path / "a.json", supplied=SUPPLIED, store=RedisKeyStore(redis_server.url))
    b = Keys(tmp_path / "b.json", supplied=SUPPLIED, store=RedisKeyStore(redis_server.url))
    router = _Router()
    b.attach("inference", router)
    assert asyncio.run(a.rotate_shared("inference", "api-key-01"))
    rotated = a.keys["inference"]
    assert rotated != SUPPLIED["inference"] and b.keys["inference"] == SUPPLIED["inference"]
    assert b.sync() and b.keys["inference"] == rotated and router.token == rotated  # what watch() runs
    assert json.loads((tmp_path / "b.json").read_text())["inference"]["key"] == rotated
    assert not b.sync()  # nothing new: nothing changes, the key file is not rewritten
    # a replica started later with the same Secret takes the rotated key, not the Secret's
    c = Keys(tmp_path / "c.json", supplied=SUPPLIED, store=RedisKeyStore(redis_server.url))
    assert c.keys["inference"] == rotated
    # a replica started with a new Secret: its keys win, and the others take them up
    new_secret = {"management": "mgmt-key-2", "inference": "infer-key-2", "API": "api-key-02"}
    d = Keys(tmp_path / "d.json", supplied=new_secret, store=RedisKeyStore(redis_server.url))
    assert d.keys == new_secret
    assert a.sync() and a.keys == new_secret and not a.check("API", "api-key-01")


def test_shared_keys_survive_redis_down_and_refill_an_empty_redis(tmp_path, redis_server, caplog):
    from server.core.shared_keys import RedisKeyStore

    caplog.set_level(logging.INFO, "osprey.auth")
    redis_server.stop()
    a = Keys(tmp_path / "a.json", supplied=SUPPLIED, store=RedisKeyStore(redis_server.url, timeout=0.5))
    assert a.keys == SUPPLIED  # Redis down at start: the supplied keys, and one warning
    assert not a.sync()
    assert sum("cannot be reached" in r.message for r in caplog.records) == 1
    with pytest.raises(OspreyError) as err:  # a rotation that cannot reach the others is refused
        asyncio.run(a.rotate_shared("inference", "api-key-01"))
    assert err.value.kind is ErrorKind.UNAVAILABLE and redis_server.url in err.value.message
    assert a.keys == SUPPLIED
    redis_server.start()  # an empty Redis (it lost its data): the first server to look fills it
    assert not a.sync()
    assert RedisKeyStore(redis_server.url).read() == SUPPLIED
    assert any("answers again" in r.message for r in caplog.records)


def test_watch_takes_up_a_rotation_within_its_interval(tmp_path, redis_server):
    from server.core.shared_keys import RedisKeyStore

    async def scenario():
        a = Keys(tmp_path / "a.json", supplied=SUPPLIED, store=RedisKeyStore(redis_server.url))
        b = Keys(tmp_path / "b.json", supplied=SUPPLIED, store=RedisKeyStore(redis_server.url))
        watcher = asyncio.create_task(b.watch(interval=0.05))
        try:
            assert await a.rotate_shared("management", "api-key-01")
            deadline = time.monotonic() + 5
            while b.keys["management"] != a.keys["management"]:
                assert time.monotonic() < deadline, "the rotation did not reach the other server"
                await asyncio.sleep(0.01)
        finally:
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)
    asyncio.run(scenario())
