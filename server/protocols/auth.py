"""Token authorization keys, TorchServe style: ``key_file.json`` with management,
inference and API keys; clients send ``Authorization: Bearer <key>``."""

from __future__ import annotations

import datetime as _dt
import json
import os
import secrets
from pathlib import Path

__all__ = ["Keys"]


def _new_key() -> str:
    return secrets.token_urlsafe(6)[:8]


class Keys:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.keys = {"management": _new_key(), "inference": _new_key(), "API": _new_key()}
        self.routers: dict[str, list] = {"management": [], "inference": []}
        self.write()

    def write(self) -> None:
        expires = (_dt.datetime.now(_dt.timezone.utc) + _dt.timedelta(days=3650)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        data = {"management": {"key": self.keys["management"], "expiration time": expires},
                "inference": {"key": self.keys["inference"], "expiration time": expires},
                "API": {"key": self.keys["API"]}}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(data, fh, indent=2)
        os.replace(tmp, self.path)

    def attach(self, kind: str, router) -> None:
        router.token = self.keys[kind]
        self.routers[kind].append(router)

    def rotate(self, kind: str, api_key: str) -> bool:
        """``POST /token?type=inference|management`` with the API key: a new key of that kind."""
        if kind not in self.routers or not secrets.compare_digest(api_key, self.keys["API"]):
            return False
        self.keys[kind] = _new_key()
        for router in self.routers[kind]:
            router.token = self.keys[kind]
        self.write()
        return True
