"""The server's management API as a retraining job uses it.

A retraining job runs in a worker process (a child of the server, or ``osprey worker`` on
another machine): it registers the challenger, moves traffic and reads live numbers through
the same management API an operator uses, so every step is visible, authorised and logged
like a person's (``server.management_client``: standard library only).
"""

from __future__ import annotations

import urllib.parse
from typing import Any

from server.management_client import ManagementError, call

__all__ = ["ServerClient", "ApiError"]

ApiError = ManagementError  # .status: the HTTP status, or None when the server could not be reached


class ServerClient:
    """The management API (and the inference API's monitoring JSON) for one server."""

    def __init__(self, management_url: str, inference_url: str | None = None, token: str | None = None,
                 inference_token: str | None = None, timeout: float = 120.0):
        self.management = management_url.rstrip("/")
        self.inference = (inference_url or "").rstrip("/")
        self.token, self.inference_token, self.timeout = token, inference_token, timeout

    def manage(self, method: str, path: str, body: Any = None, query: dict | None = None) -> Any:
        if query:
            path += "?" + urllib.parse.urlencode(query)
        return call(method, self.management, path, token=self.token, body=body, timeout=self.timeout)

    def infer_api(self, method: str, path: str, body: Any = None) -> Any:
        if not self.inference:
            raise ManagementError("no inference URL given")
        return call(method, self.inference, path, token=self.inference_token, body=body, timeout=self.timeout)

    # -- the calls a job makes ----------------------------------------------------------------
    def versions(self, model: str) -> list[dict]:
        """TorchServe's describe (all versions) of ``model``."""
        out = self.manage("GET", f"/models/{urllib.parse.quote(model)}/all")
        return out if isinstance(out, list) else [out]

    def register_challenger(self, job_id: str, archive: str) -> Any:
        """The job's own archive (``MODEL-vVERSION-JOB.mar`` in the model store), model API on or off."""
        return self.manage("POST", f"/retraining/jobs/{urllib.parse.quote(job_id)}/challenger",
                           query={"archive": archive})

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
        """The monitoring JSON of a version: None when there is no inference URL, or monitoring is
        off for the version or on the server (404, 503 saying so). Any other failure (the server
        cannot be reached at that URL, a refused token, an error) raises ApiError naming the URL:
        a promotion must not go on as if no labels had come."""
        if not self.inference:
            return None
        try:
            return self.infer_api("GET", f"/monitoring/{urllib.parse.quote(model)}/{urllib.parse.quote(version)}")
        except ApiError as exc:
            if exc.status == 404 or (exc.status == 503 and "monitoring is off" in str(exc)):
                return None
            hint = ("; a job on another host calls the server at its advertised_host setting "
                    "(OSPREY_ADVERTISED_HOST, in Kubernetes the pod IP)") if exc.status is None else ""
            raise ApiError(f"live quality of {model} {version} could not be read from the server's inference API "
                           f"at {self.inference}: {exc}{hint}", exc.status) from None
