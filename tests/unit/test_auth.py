"""Token keys: expiry, rotation, what the key file says."""

from __future__ import annotations

import json
import time

from server.protocols.auth import Keys


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
