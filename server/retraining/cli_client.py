"""``osprey jobs list|show|cancel``: the management API's retraining routes, printed for people.

It talks to a server (``--url``, the management address; ``--token`` or ``--key-file`` for the
management key) rather than reading Redis or the job files: one path for both backends, the
server's token guards it, and with the embedded queue only the server can stop a job it runs.

Exit status: 0 done, 1 the server refused (409: the job has already finished), 3 the server is
unreachable, 4 the token was refused, 5 no such job.
"""

from __future__ import annotations

import json
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

__all__ = ["jobs_command", "JobsClientError"]

DEFAULT_KEY_FILE = "key_file.json"


class JobsClientError(Exception):
    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


def _management_key(path: str) -> str:
    try:
        data = json.loads(Path(path).read_text())
        return data["management"]["key"]
    except FileNotFoundError:
        raise JobsClientError(f"key file {path} does not exist", 2) from None
    except (ValueError, KeyError, TypeError):
        raise JobsClientError(f"key file {path} has no management key (it is the server's key_file.json)", 2) from None


def _message(body: bytes) -> str:
    text = body.decode("utf-8", errors="replace").strip()
    try:
        data = json.loads(text)
        if isinstance(data, dict):
            text = str(data.get("message") or data.get("error") or text)
    except ValueError:
        pass
    return text.splitlines()[0][:300] if text else ""


def _call(method: str, url: str, token: str | None, timeout: float) -> dict:
    headers = {"Accept": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(url, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as exc:
        message = _message(exc.read())
        if exc.code in (401, 403) or (exc.code == 400 and "token" in message.lower()):
            hint = "the token was refused" if token else "the server requires a token"
            raise JobsClientError(f"{exc.code} from {url}: {hint}: pass the management key (--token, or "
                                  "--key-file with the server's key_file.json)", 4) from None
        if exc.code == 404:
            raise JobsClientError(message or f"{url}: not found", 5) from None
        raise JobsClientError(f"{exc.code}: {message}" if message else f"{url} answered {exc.code}", 1) from None
    except (urllib.error.URLError, OSError) as exc:
        raise JobsClientError(f"cannot reach the Osprey server at {url}: {getattr(exc, 'reason', exc)}", 3) from None
    except ValueError:
        raise JobsClientError(f"{url} answered something that is not JSON", 1) from None


def _when(ts) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ts)) if ts else "-"


def print_list(jobs: list[dict], out=sys.stdout) -> None:
    if not jobs:
        print("no retraining jobs", file=out)
        return
    rows = [("ID", "MODEL", "TRIGGER", "EPISODE", "STATE", "PROGRESS", "TRIES", "CREATED (UTC)", "MESSAGE")]
    for j in jobs:
        rows.append((j["id"], j["model"], j["trigger"], j["episode"], j["state"], f"{100 * j.get('progress', 0):.0f}%",
                     f"{j.get('attempts', 0)}/{j.get('max_attempts', '?')}", _when(j.get("created")),
                     (j.get("message") or "")[:60]))
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]) - 1)]
    for r in rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)) + "  " + str(r[-1]), file=out)


def print_job(j: dict, out=sys.stdout) -> None:
    def line(k, v):
        print(f"{k + ':':12s} {v}", file=out)

    line("job", j["id"])
    line("model", f"{j['model']} (champion {j['version']})")
    line("trigger", f"{j['trigger']}, episode {j['episode']}")
    line("state", j["state"] + (f", phase {j['phase']}" if j.get("phase") else ""))
    line("progress", f"{100 * j.get('progress', 0):.0f}%")
    line("message", j.get("message") or "-")
    line("attempts", f"{j.get('attempts', 0)} of {j.get('max_attempts', '?')}")
    line("created", _when(j.get("created")))
    line("started", _when(j.get("started")))
    line("finished", _when(j.get("finished")))
    if j.get("worker"):
        line("worker", j["worker"])
    if j.get("challenger"):
        line("challenger", j["challenger"])
    if j.get("gate"):
        line("gate", ", ".join(f"{k}={v}" for k, v in j["gate"].items()))
    if j.get("error"):
        line("error", j["error"].strip().splitlines()[-1])
    if j.get("steps"):
        print("steps:", file=out)
        for s in j["steps"]:
            print(f"  {_when(s.get('ts'))}  {s.get('step')}" + (f": {s['detail']}" if s.get("detail") else ""), file=out)
    if j.get("log_tail"):
        print("log (tail):", file=out)
        for entry in j["log_tail"]:
            print(f"  {entry}", file=out)


def jobs_command(args) -> int:
    try:
        token = args.token
        if token is None and args.key_file:
            token = _management_key(args.key_file)
        elif token is None and Path(DEFAULT_KEY_FILE).is_file():
            token = _management_key(DEFAULT_KEY_FILE)
        base = args.url.strip().rstrip("/")
        base = base if "://" in base else f"http://{base}"
        if args.jobs_command == "list":
            if args.limit < 1:
                raise JobsClientError("--limit must be at least 1", 2)
            query = {"limit": str(args.limit), **({"model": args.model} if args.model else {})}
            data = _call("GET", f"{base}/retraining/jobs?{urllib.parse.urlencode(query)}", token, args.timeout)
            print(json.dumps(data, indent=2)) if args.json else print_list(data.get("jobs", []))
            return 0
        url = f"{base}/retraining/jobs/{urllib.parse.quote(args.job_id, safe='')}"
        data = _call("DELETE" if args.jobs_command == "cancel" else "GET", url, token, args.timeout)
        print(json.dumps(data, indent=2)) if args.json else print_job(data)
        return 0
    except JobsClientError as exc:
        print(f"osprey jobs {args.jobs_command}: {exc}", file=sys.stderr)
        return exc.code
