"""Two real servers as two pods of one Deployment are: the same supplied keys (a Secret), the
same real Redis. A key rotated through one is the key of both; and the client a retraining job
uses reports a server it cannot reach instead of taking it for "no quality data"."""

from __future__ import annotations

import time

import httpx
import pytest

from server.retraining.client import ApiError, ServerClient
from server.retraining.pipeline import _quality_reader
from tests.conftest import OspreyProcess, free_port
from tests.redis_server import RedisProcess

KEYS = {"OSPREY_INFERENCE_KEY": "infer-key-1", "OSPREY_MANAGEMENT_KEY": "mgmt-key-1", "OSPREY_API_KEY": "api-key-01"}


@pytest.fixture(scope="module")
def replicas(tmp_path_factory):
    root = tmp_path_factory.mktemp("replicas")
    (root / "store").mkdir()
    with RedisProcess(root / "redis") as redis:
        env = {**KEYS, "OSPREY_REDIS_URL": redis.url}
        servers = []
        try:
            for name in ("a", "b"):  # started together: one start's wait, not two
                (root / name).mkdir()
                servers.append(OspreyProcess(root / name, root / "store", [], token_auth=True, env=env))
            for server in servers:
                server.wait_ready()
            yield servers
        finally:
            for server in servers:
                server.stop()


def _status(url: str, key: str) -> int:
    return httpx.get(url, headers={"Authorization": f"Bearer {key}"}, timeout=10).status_code


def _until(check, seconds: float = 10.0, what: str = ""):
    """Poll ``check`` until it is true (each server re-reads the shared keys every second)."""
    deadline = time.monotonic() + seconds
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"not within {seconds} s: {what}"
        time.sleep(0.05)


def test_a_key_rotated_through_one_replica_is_the_key_of_every_replica(replicas):
    a, b = replicas
    for server in (a, b):  # the supplied keys, not random ones: one key opens every replica
        assert _status(f"{server.inference}/ping", "infer-key-1") == 200
        assert _status(f"{server.management}/models", "mgmt-key-1") == 200
        assert server.keys()["API"]["key"] == "api-key-01"

    # the inference key, rotated through a with the API key
    r = httpx.post(f"{a.management}/token", params={"type": "inference"},
                   headers={"Authorization": "Bearer api-key-01"}, timeout=10)
    assert r.status_code == 200, r.text
    new = a.keys()["inference"]["key"]
    assert new != "infer-key-1"
    _until(lambda: _status(f"{b.inference}/ping", new) == 200, what="b accepts the key rotated through a")
    assert _status(f"{b.inference}/ping", "infer-key-1") == 401  # the old key is refused everywhere
    assert _status(f"{a.inference}/ping", "infer-key-1") == 401
    assert b.keys()["inference"]["key"] == new  # b's key file follows (CLI tools, deploy/compose/management_token.py)

    # the management key, through b: a follows (a replica started later with the same Secret
    # takes the rotated keys, not the Secret's: tests/unit/test_auth.py)
    r = httpx.get(f"{b.management}/token", params={"type": "management"},
                  headers={"Authorization": "Bearer api-key-01"}, timeout=10)
    assert r.status_code == 200, r.text
    management = b.keys()["management"]["key"]
    _until(lambda: _status(f"{a.management}/models", management) == 200, what="a takes b's management key")
    assert _status(f"{a.management}/models", "mgmt-key-1") == 401


def test_a_job_that_cannot_read_live_quality_says_so(replicas):
    """Before advertised_host, a worker in another pod called the server's 127.0.0.1 and got
    "no quality data" back without a word. Now: quiet only where monitoring is off or the
    version is unknown (404), else an error naming the URL, and a line in the job's log."""
    a = replicas[0]
    keys = a.keys()
    reachable = ServerClient(a.management, a.inference, keys["management"]["key"], keys["inference"]["key"])
    assert reachable.monitoring("no_such_model", "1") is None  # 404: nothing to read, nothing wrong

    wrong_token = ServerClient(a.management, a.inference, keys["management"]["key"], "not-the-key")
    with pytest.raises(ApiError, match=f"at {a.inference}.*HTTP 401"):
        wrong_token.monitoring("no_such_model", "1")

    nowhere = f"http://127.0.0.1:{free_port()}"  # nothing listens there, as a pod's own loopback
    client = ServerClient(a.management, nowhere, keys["management"]["key"], keys["inference"]["key"], timeout=5)
    lines = []
    quality = _quality_reader(client, "digits_cnn", "accuracy", 20, log=lines.append)
    with pytest.raises(ApiError, match=f"at {nowhere}.*advertised_host") as err:
        quality("1")
    assert err.value.status is None
    assert len(lines) == 1 and lines[0].startswith("ERROR") and nowhere in lines[0]
