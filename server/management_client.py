"""A small client for the management port, for commands such as ``osprey rollback``.

``call("POST", "http://127.0.0.1:8081", "/models/m/rollback", token=...)`` returns the
answer's JSON; any failure is a :class:`ManagementError` whose message says what happened
(the server's own message for an HTTP error, a hint for a refused token, the address for a
server that cannot be reached). The management key is ``--token``, or read from the
server's ``key_file.json`` (``--key-file``, default ./key_file.json when it exists).
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

__all__ = ["ManagementError", "call", "management_key", "add_client_arguments", "quote",
           "DEFAULT_MANAGEMENT", "DEFAULT_KEY_FILE"]

DEFAULT_MANAGEMENT = "http://127.0.0.1:8081"
DEFAULT_KEY_FILE = "key_file.json"


class ManagementError(Exception):
    """A management call failed; ``status`` is the HTTP status, or None when none came back."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


def quote(segment: str) -> str:
    """One URL path segment (a model name or version)."""
    return urllib.parse.quote(segment, safe="")


def management_key(token: str | None, key_file: str | None) -> str | None:
    """``token``, else the management key of ``key_file`` (or ./key_file.json when it exists), else None."""
    if token:
        return token
    path = key_file or (DEFAULT_KEY_FILE if os.path.exists(DEFAULT_KEY_FILE) else None)
    if path is None:
        return None
    try:
        return str(json.loads(Path(path).read_text())["management"]["key"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ManagementError(f"cannot read the management key from the key file {path}: "
                              f"{exc.__class__.__name__}: {exc}") from None


def call(method: str, base: str, path: str, *, token: str | None = None, body: Any = None,
         timeout: float = 60.0) -> Any:
    """``method base+path`` with an optional JSON body; the answer's JSON."""
    url = base.rstrip("/") + path
    headers = {"Accept": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    request = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            raw = r.read()
    except urllib.error.HTTPError as exc:
        text = exc.read().decode(errors="replace")
        try:
            message = json.loads(text).get("message") or text
        except (ValueError, AttributeError):
            message = text
        if exc.code in (401, 403) and "token" in message.lower():
            message += (" (pass the management key with --token, or --key-file with the server's key_file.json)"
                        if token else " (the server requires a token: pass the management key with --token, "
                                      "or --key-file with the server's key_file.json)")
        raise ManagementError(f"{method} {url}: HTTP {exc.code}: {message.strip()}", exc.code) from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ManagementError(f"{method} {url}: cannot reach the management API ({reason}); is the server "
                              "running, and is --management its management address?") from None
    try:
        return json.loads(raw) if raw.strip() else {}
    except ValueError:
        raise ManagementError(f"{method} {url}: the answer is not JSON: {raw[:200]!r}") from None


def add_client_arguments(p) -> None:
    """``--management``, ``--token`` / ``--key-file`` and ``--timeout`` on a command's parser."""
    p.add_argument("--management", default=DEFAULT_MANAGEMENT,
                   help="the server's management address (default: %(default)s)")
    auth = p.add_mutually_exclusive_group()
    auth.add_argument("--token", help="the management key (Authorization: Bearer)")
    auth.add_argument("--key-file", help=f"the server's key file; its management key is sent (default: "
                                         f"./{DEFAULT_KEY_FILE} when it exists)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds the call may take (default %(default)s)")
