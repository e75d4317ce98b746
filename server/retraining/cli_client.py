"""``osprey jobs list|show|cancel|k8s-manifest``: the management API's retraining routes, printed for people.

It talks to a server's management port rather than reading Redis or the job files: one path for both backends, the
server's token guards it, and with the embedded queue only the server can stop a job it runs.

Calls go through ``server.management_client`` (``--management``, ``--token`` / ``--key-file``,
``--timeout``). Exit status: 0 done, 1 the call failed (the message says why: 404 no such job,
409 a job that has already finished, a refused token, an unreachable server), 2 bad arguments.
"""

from __future__ import annotations

import json
import sys
import time
import urllib.parse

from server.management_client import ManagementError, call, management_key, quote

__all__ = ["jobs_command", "print_list", "print_job"]


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
        token = management_key(args.token, args.key_file)
        if args.jobs_command == "list":
            if args.limit < 1:
                print("osprey jobs list: --limit must be at least 1", file=sys.stderr)
                return 2
            query = {"limit": str(args.limit), **({"model": args.model} if args.model else {})}
            data = call("GET", args.management, f"/retraining/jobs?{urllib.parse.urlencode(query)}", token=token,
                        timeout=args.timeout)
            print(json.dumps(data, indent=2)) if args.json else print_list(data.get("jobs", []))
            return 0
        if args.jobs_command == "k8s-manifest":
            from server.retraining.jobs import JobRecord
            from server.retraining.k8s_job import render_job

            data = call("GET", args.management, f"/retraining/jobs/{quote(args.job_id)}", token=token,
                        timeout=args.timeout)
            try:
                print(render_job(JobRecord.from_dict(data), args.image, args.claim, args.template), end="")
            except (ValueError, OSError, KeyError) as exc:
                print(f"osprey jobs k8s-manifest: {exc}", file=sys.stderr)
                return 2
            return 0
        data = call("DELETE" if args.jobs_command == "cancel" else "GET", args.management,
                    f"/retraining/jobs/{quote(args.job_id)}", token=token, timeout=args.timeout)
        print(json.dumps(data, indent=2)) if args.json else print_job(data)
        return 0
    except ManagementError as exc:
        print(f"osprey jobs {args.jobs_command}: {exc}", file=sys.stderr)
        return 1
