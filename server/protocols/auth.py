"""Token authorization keys, TorchServe style: ``key_file.json`` with management,
inference and API keys; clients send ``Authorization: Bearer <key>``.

The management and inference keys expire ``token_expiration_min`` minutes after they were
made (TorchServe's setting; 0, Osprey's default, means they do not expire; TorchServe's
default is 60); the API key never expires. ``GET`` (or ``POST``) ``/token?type=inference|management``
on the management port, with the API key, makes a new key of that kind with a new expiry
and writes it to the key file, as TorchServe does.

By default each server makes its own random keys at start (TorchServe's behaviour). An operator
can supply them instead (settings ``inference_key``, ``management_key``, ``api_key``, e.g. from
a Kubernetes Secret): then every replica accepts the same keys, and with ``redis_url`` set they
are kept in Redis (server/core/shared_keys.py), so a ``/token`` rotation through any
replica reaches every replica within ``SYNC_INTERVAL_S``: each server re-reads the shared keys
in the background (:meth:`Keys.watch`); a request's check stays a comparison with the key in
memory. The key file is written either way, and again whenever the keys change.
"""

from __future__ import annotations

import asyncio
import datetime as _dt
import json
import logging
import os
import secrets
import time
from pathlib import Path
from typing import Mapping

from server.core.errors import ErrorKind, OspreyError

__all__ = ["Keys", "SYNC_INTERVAL_S"]

log = logging.getLogger("osprey.auth")

NEVER_S = 3650 * 86400.0  # what the key file says of a key that does not expire
SYNC_INTERVAL_S = 1.0  # how often a server with shared keys re-reads them from Redis


def _new_key() -> str:
    return secrets.token_urlsafe(6)[:8]


def _iso(epoch: float) -> str:
    return _dt.datetime.fromtimestamp(epoch, _dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class Keys:
    """The keys: made here (``supplied`` None), or the operator's (``{"management", "inference",
    "API"}``); ``store`` (a shared_keys.RedisKeyStore, with supplied keys only) shares them."""

    def __init__(self, path: str | os.PathLike, expiration_min: float = 0.0,
                 supplied: Mapping[str, str] | None = None, store=None):
        self.path = Path(path)
        self.lifetime_s = max(float(expiration_min), 0.0) * 60.0  # 0: never
        if supplied:
            self.keys = {kind: str(supplied[kind]) for kind in ("management", "inference", "API")}
        else:
            self.keys = {"management": _new_key(), "inference": _new_key(), "API": _new_key()}
        self.expires: dict[str, float | None] = {kind: self._expiry() for kind in ("management", "inference")}
        self.routers: dict[str, list] = {"management": [], "inference": []}
        self.store = store if supplied else None
        self._seed = None
        self._store_down: str | None = None  # the error while Redis cannot be reached (logged once)
        self._rotations = 0  # rotations through this server (a shared read that began before one is stale)
        if self.store is not None:
            from server.core.shared_keys import seed_of

            self._seed = seed_of(self.keys)
            self.sync(force=True)  # this server's supplied keys win over keys from other supplied ones
        self.write()

    @classmethod
    def from_settings(cls, settings) -> "Keys | None":
        """None with token authorization off; the supplied keys when the settings give them
        (shared through Redis with redis_url); else new random keys, TorchServe's way."""
        if settings.disable_token_authorization:
            return None
        path = Path(settings.workdir) / settings.key_file
        if not settings.inference_key:
            return cls(path, settings.token_expiration_min)
        supplied = {"management": settings.management_key, "inference": settings.inference_key,
                    "API": settings.api_key}
        store = None
        if settings.redis_url:
            from server.core.shared_keys import RedisKeyStore

            store = RedisKeyStore(settings.redis_url)
        return cls(path, settings.token_expiration_min, supplied=supplied, store=store)

    def _expiry(self) -> float | None:
        return time.time() + self.lifetime_s if self.lifetime_s > 0 else None

    def write(self) -> None:
        far = _iso(time.time() + NEVER_S)
        data = {kind: {"key": self.keys[kind], "expiration time": far if self.expires[kind] is None
                       else _iso(self.expires[kind])} for kind in ("management", "inference")}
        data["API"] = {"key": self.keys["API"]}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(data, fh, indent=2)
        os.replace(tmp, self.path)

    def check(self, kind: str, token: str) -> bool:
        """``token`` is the current key of ``kind`` and has not expired."""
        if not secrets.compare_digest(token.encode("utf-8", "replace"), self.keys[kind].encode()):
            return False
        expires = self.expires.get(kind)
        return expires is None or time.time() < expires

    def _publish(self, kind: str) -> None:
        for router in self.routers[kind]:
            router.token, router.token_expires = self.keys[kind], self.expires[kind]

    def attach(self, kind: str, router) -> None:
        self.routers[kind].append(router)
        self._publish(kind)

    def rotate(self, kind: str, api_key: str) -> bool:
        """``/token?type=inference|management`` with the API key: a new key of that kind, in this
        process (see :meth:`rotate_shared` for keys shared through Redis)."""
        if kind not in self.routers or not self.check("API", api_key):
            return False
        self._set(kind, _new_key(), self._expiry())
        self.write()
        return True

    async def rotate_shared(self, kind: str, api_key: str) -> bool:
        """:meth:`rotate` for every server: the new key goes to Redis first (off the event loop)
        and is taken here once it is there; Redis unreachable: 503, the old key stays."""
        if self.store is None:
            return self.rotate(kind, api_key)
        if kind not in self.routers or not self.check("API", api_key):
            return False
        key, expires = _new_key(), self._expiry()
        try:
            await asyncio.to_thread(self.store.rotate, kind, key, expires)
        except Exception as exc:
            raise OspreyError(ErrorKind.UNAVAILABLE, f"the new {kind} key could not be stored in Redis "
                                                     f"({self.store.url}): {exc}; the key was not rotated",
                              retry_after=1) from None
        self._set(kind, key, expires)
        self._rotations += 1
        self.write()
        return True

    def _set(self, kind: str, key: str, expires: float | None) -> None:
        self.keys[kind] = key
        if kind in self.routers:  # management, inference (the API key never expires)
            self.expires[kind] = expires
            self._publish(kind)

    # -- shared keys (supplied keys with redis_url) ----------------------------------------------
    def sync(self, force: bool = False) -> bool:
        """Take the shared keys from Redis (writing this server's when Redis has none, or with
        ``force`` when Redis's descend from other supplied keys). True when a key changed here.
        Redis unreachable: the keys stay as they are, logged once per outage. Blocking: the
        server runs it at start, and :meth:`watch` its Redis call in a thread."""
        shared = self._read_shared(force)
        return shared is not None and self._take(*shared)

    def _take(self, shared: dict[str, str], until: dict[str, float | None]) -> bool:
        changed = [k for k in ("management", "inference", "API") if shared[k] != self.keys[k]
                   or (k != "API" and until[k] != self.expires[k])]
        for kind in changed:
            self._set(kind, shared[kind], until.get(kind))
        if changed:
            log.info("token keys: the shared %s key%s changed (rotated through another server, or new supplied "
                     "keys)", " and ".join(changed), "s" if len(changed) > 1 else "")
            self.write()
        return bool(changed)

    async def watch(self, interval: float = SYNC_INTERVAL_S) -> None:
        """Re-read the shared keys every ``interval`` seconds until cancelled (nothing to do without
        a store). The Redis call runs in a thread; the keys change on the event loop."""
        if self.store is None:
            return
        while True:
            await asyncio.sleep(interval)
            rotations = self._rotations
            shared = await asyncio.to_thread(self._read_shared)
            if shared is not None and rotations == self._rotations:  # else read before a rotation here: stale
                self._take(*shared)

    def _read_shared(self, force: bool = False):
        try:
            shared = self.store.sync(self._seed, self.keys, self.expires, force=force)
        except Exception as exc:  # redis.RedisError, OSError: Redis is down or unreachable
            if self._store_down is None:
                log.warning("token keys: Redis %s cannot be reached (%s): keeping the keys this server has until "
                            "it answers; a /token rotation elsewhere does not reach this server meanwhile",
                            self.store.url, exc)
            self._store_down = str(exc)
            return None
        if self._store_down is not None:
            log.info("token keys: Redis %s answers again; the shared keys are read from it", self.store.url)
            self._store_down = None
        return shared

    def close(self) -> None:
        if self.store is not None:
            self.store.close()
