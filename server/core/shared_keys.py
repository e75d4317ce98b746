"""Token keys shared by every server on one Redis (``redis_url``), when the operator supplies them.

One hash, ``osprey:auth:keys``, holds the current management, inference and API keys, the
expiry of the first two (epoch seconds, empty: never) and ``seed``: a digest of the keys the
operator supplied (``inference_key``, ``management_key``, ``api_key``). A server that starts
with the same supplied keys as the hash's seed takes the hash as it is (so a key rotated with
``/token`` before it started is the one it accepts); one that starts with other supplied keys
(the Secret was changed) writes its own, which every other server then takes up. An empty
hash (a Redis that lost its data) is filled by the first server that looks.

Each call is one Redis round trip (a Lua script, atomic): :meth:`sync` is what a server runs
at start and then every ``SYNC_INTERVAL_S`` in the background, never on a request's path.
"""

from __future__ import annotations

import hashlib
__all__ = ["RedisKeyStore", "KEY", "seed_of", "KINDS"]

KEY = "osprey:auth:keys"
KINDS = ("management", "inference", "API")

# ARGV: force ("1": write unless the seed matches; "0": write only into an empty hash), seed,
# then management, management_expires, inference, inference_expires, API. Returns the hash.
_SYNC = """
local seed = redis.call('HGET', KEYS[1], 'seed')
local write = (not seed) or (ARGV[1] == '1' and seed ~= ARGV[2])
if write then
  redis.call('DEL', KEYS[1])
  redis.call('HSET', KEYS[1], 'seed', ARGV[2], 'management', ARGV[3], 'management_expires', ARGV[4],
             'inference', ARGV[5], 'inference_expires', ARGV[6], 'API', ARGV[7])
end
return redis.call('HGETALL', KEYS[1])
"""


def seed_of(keys: dict[str, str]) -> str:
    """A digest of the supplied keys: which Secret the hash's keys descend from."""
    return hashlib.sha256("\0".join(keys[k] for k in KINDS).encode()).hexdigest()


def _expiry_text(value: float | None) -> str:
    return "" if value is None else repr(float(value))


class RedisKeyStore:
    """The shared keys in Redis. Every method raises ``redis.RedisError`` (or OSError) when Redis
    cannot be reached; the caller keeps the keys it has."""

    def __init__(self, redis_url: str, timeout: float = 1.0):
        import redis as redis_lib

        self.url = redis_url
        self.redis = redis_lib.Redis.from_url(redis_url, socket_timeout=timeout, socket_connect_timeout=timeout)
        self._sync = self.redis.register_script(_SYNC)

    def sync(self, seed: str, keys: dict[str, str], expires: dict[str, float | None], *,
             force: bool) -> tuple[dict[str, str], dict[str, float | None]]:
        """The shared (keys, expiries), after writing ``keys`` when the hash is empty, or (``force``)
        when it descends from other supplied keys."""
        raw = self._sync(keys=[KEY], args=["1" if force else "0", seed, keys["management"],
                                           _expiry_text(expires["management"]), keys["inference"],
                                           _expiry_text(expires["inference"]), keys["API"]])
        data = {raw[i].decode(): raw[i + 1].decode() for i in range(0, len(raw), 2)}
        shared = {k: data[k] for k in KINDS}
        until = {k: float(data[f"{k}_expires"]) if data.get(f"{k}_expires") else None
                 for k in ("management", "inference")}
        return shared, until

    def read(self) -> dict[str, str] | None:
        """The shared keys as they are (None when no server has written them)."""
        data = {k.decode(): v.decode() for k, v in self.redis.hgetall(KEY).items()}
        return {k: data[k] for k in KINDS} if all(k in data for k in KINDS) else None

    def rotate(self, kind: str, key: str, expires: float | None) -> None:
        """``kind``'s new key, for every server (one HSET: both fields at once)."""
        self.redis.hset(KEY, mapping={kind: key, f"{kind}_expires": _expiry_text(expires)})

    def close(self) -> None:
        try:
            self.redis.close()
        except Exception:  # closing a client whose server is gone
            pass
