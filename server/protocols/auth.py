"""Token authorization keys, TorchServe style: ``key_file.json`` with management,
inference and API keys; clients send ``Authorization: Bearer <key>``.

The management and inference keys expire ``token_expiration_min`` minutes after they were
made (TorchServe's setting; 0, Osprey's default, means they do not expire; TorchServe's
default is 60); the API key never expires. ``GET`` (or ``POST``) ``/token?type=inference|management``
on the management port, with the API key, makes a new key of that kind with a new expiry
and writes it to the key file, as TorchServe does.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import secrets
import time
from pathlib import Path

__all__ = ["Keys"]

NEVER_S = 3650 * 86400.0  # what the key file says of a key that does not expire


def _new_key() -> str:
    return secrets.token_urlsafe(6)[:8]


def _iso(epoch: float) -> str:
    return _dt.datetime.fromtimestamp(epoch, _dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class Keys:
    def __init__(self, path: str | os.PathLike, expiration_min: float = 0.0):
        self.path = Path(path)
        self.lifetime_s = max(float(expiration_min), 0.0) * 60.0  # 0: never
        self.keys = {"management": _new_key(), "inference": _new_key(), "API": _new_key()}
        self.expires: dict[str, float | None] = {kind: self._expiry() for kind in ("management", "inference")}
        self.routers: dict[str, list] = {"management": [], "inference": []}
        self.write()

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
        """``/token?type=inference|management`` with the API key: a new key of that kind."""
        if kind not in self.routers or not self.check("API", api_key):
            return False
        self.keys[kind] = _new_key()
        self.expires[kind] = self._expiry()
        self._publish(kind)
        self.write()
        return True
