"""A small client for the server's management and inference APIs, used by jobs and the CLI.

A retraining job runs in a worker process (a child of the server, or ``osprey worker`` on
another machine): it registers the challenger, moves traffic and reads live numbers through
the same management API an operator uses, so every step is visible, authorised and logged
like a person's. Standard library only (urllib): the worker needs nothing else to talk to us.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

__all__ = ["ServerClient", "ApiError"]


class ApiError(Exception):
    """The server answered an error (``status``, its message), or could not be reached (status 0)."""

    def __init__(self, status: int, message: str):
        super().__init__(f"{status}: {message}" if status else message)
        self.status, self.message = status, message


class ServerClient:
    def __init__(self, management_url: str, inference_url: str | None = None, token: str | None = None,
                 inference_token: str | None = None, timeout: float = 120.0):
        self.management = management_url.rstrip("/")
        self.inference = (inference_url or "").rstrip("/")
        self.token, self.inference_token, self.timeout = token, inference_token, timeout

    def _call(self, base: str, token: str | None, method: str, path: str, body: Any = None,
              query: dict | None = None) -> Any:
        url = base + path + ("?" + urllib.parse.urlencode(query) if query else "")
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(url, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        if token:
            req.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as r:
                raw = r.read()
        except urllib.error.HTTPError as e:
            raw = e.read()
            try:
                msg = json.loads(raw).get("message") or raw.decode(errors="replace")
            except (ValueError, AttributeError):
                msg = raw.decode(errors="replace")
            raise ApiError(e.code, msg) from None
        except (urllib.error.URLError, OSError) as e:
            raise ApiError(0, f"cannot reach {base}: {getattr(e, 'reason', e)}") from None
        if not raw:
            return None
        try:
            return json.loads(raw)
        except ValueError:
            return raw.decode(errors="replace")

    def manage(self, method: str, path: str, body: Any = None, query: dict | None = None) -> Any:
        return self._call(self.management, self.token, method, path, body, query)

    def infer_api(self, method: str, path: str, body: Any = None) -> Any:
        if not self.inference:
            raise ApiError(0, "no inference URL given")
        return self._call(self.inference, self.inference_token, method, path, body)

    # -- the calls a job makes ----------------------------------------------------------------
    def versions(self, model: str) -> list[dict]:
        """TorchServe's describe (all versions) of ``model``."""
        out = self.manage("GET", f"/models/{urllib.parse.quote(model)}/all")
        return out if isinstance(out, list) else [out]

    def register(self, url: str, model: str, workers: int = 1) -> Any:
        return self.manage("POST", "/models", query={"url": url, "model_name": model, "initial_workers": workers,
                                                     "synchronous": "true"})

    def unregister(self, model: str, version: str) -> Any:
        return self.manage("DELETE", f"/models/{urllib.parse.quote(model)}/{urllib.parse.quote(version)}")

    def set_default(self, model: str, version: str) -> Any:
        return self.manage("PUT", f"/models/{urllib.parse.quote(model)}/{urllib.parse.quote(version)}/set-default")

    def traffic(self, model: str) -> dict:
        return self.manage("GET", f"/models/{urllib.parse.quote(model)}/traffic")

    def set_traffic(self, model: str, weights: dict[str, float] | None) -> Any:
        return self.manage("PUT", f"/models/{urllib.parse.quote(model)}/traffic", body={"weights": weights or {}})

    def set_shadow(self, model: str, version: str | None) -> Any:
        if version is None:
            return self.manage("DELETE", f"/models/{urllib.parse.quote(model)}/shadow")
        return self.manage("PUT", f"/models/{urllib.parse.quote(model)}/shadow", body={"version": version})

    def rollback(self, model: str) -> Any:
        return self.manage("POST", f"/models/{urllib.parse.quote(model)}/rollback")

    def monitoring(self, model: str, version: str) -> dict | None:
        """The monitoring JSON of a version (None when there is no inference URL or it is off)."""
        if not self.inference:
            return None
        try:
            return self.infer_api("GET", f"/monitoring/{urllib.parse.quote(model)}/{urllib.parse.quote(version)}")
        except ApiError:
            return None
