"""Overload: does useful throughput hold when the offered load is twice the capacity?

For each model: the capacity, probed once (closed loop at c=32 with ``openloop.py --closed``,
the way an operator measures it, on the first server: with ``--compare``, the older tree) or
given (``--capacity mlp=4000,digits_cnn=1500``); then Poisson arrivals (``openloop.c``, or
``openloop.py`` without a C compiler) at 1x and ``factor`` x that same capacity for
``seconds`` each, the same rates offered to every server. Phases are interleaved server by
server, in ABBA order (1x: A then B, 2x: B then A), so that background load on a shared machine
hits the servers alike.

Per phase, over the requests scheduled in the measured window (after a warm-up):

- **goodput**: 200 answers whose latency (from the *scheduled* send, so the driver's own
  queue counts) is within the objective (``--objective-ms``, default 1000), per second of the
  window. The goal: goodput at 2x >= 90% of the capacity.
- ``ok_rps``: all 200 answers per second of the time it took to answer them (the window, or
  longer where the server fell behind; the driver waits up to 60 s for stragglers): what the
  earlier entries in CHANGES.md called goodput.
- refusals: 503s per second, the share that carried ``Retry-After``, and their latency;
  ``other``: any other status (504 deadline, 500); ``unanswered``: connection errors plus
  requests the driver stopped waiting for.
- latency (p50, p99) of the 200 answers.

    python -m benchmarks.overload                                   # mlp and digits_cnn, 60 s windows
    python -m benchmarks.overload --compare /tmp/old-tree           # and an older tree, same rates
    python -m benchmarks.overload --capacity digits_cnn=1500 --models digits_cnn --seconds 20

``benchmarks.run`` calls :func:`overload` for its ``overload`` section (``--overload``).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

from .models import BenchModel, build_models
from .systems import Osprey, _env

__all__ = ["overload", "summary", "parse_capacities", "main"]

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
GOAL = 0.90
OBJECTIVE_MS = 1000.0


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _json(cmd: list[str], timeout: float) -> dict:
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed: {out.stderr[-500:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def parse_capacities(text: str | None) -> dict[str, float]:
    """``"mlp=4000,digits_cnn=1500.5"`` -> ``{"mlp": 4000.0, "digits_cnn": 1500.5}``."""
    caps: dict[str, float] = {}
    for item in (text or "").split(","):
        if not item.strip():
            continue
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise ValueError(f"--capacity: expected MODEL=REQ_PER_S, got {item!r}")
        rate = float(value)
        if not rate > 0:
            raise ValueError(f"--capacity: {name.strip()} must be > 0, got {value!r}")
        caps[name.strip()] = rate
    return caps


def _open(binary: str | None, url: str, m: BenchModel, rate: float, seconds: float, warmup: float,
          objective_ms: float) -> dict:
    if binary:
        parts = urlsplit(url)
        cmd = [binary, parts.hostname, str(parts.port), parts.path, str(m.body), m.content_type,
               f"{rate:.1f}", f"{seconds:g}", f"{warmup:g}", "512", "1", f"{objective_ms:g}"]
    else:
        cmd = [sys.executable, "-m", "benchmarks.openloop", "--url", url, "--body", str(m.body),
               "--content-type", m.content_type, "--rate", f"{rate:.1f}", "--duration", f"{seconds:g}",
               "--warmup", f"{warmup:g}", "--objective-ms", f"{objective_ms:g}"]
    t0 = time.monotonic()
    r = _json(cmd, seconds + warmup + 180)
    r["wall_s"] = round(time.monotonic() - t0, 2)
    return r


def summary(r: dict, seconds: float, warmup: float, capacity: float) -> dict:
    """One phase of the open-loop driver's JSON (openloop.c or openloop.py) in the terms above."""
    status = {str(k): v for k, v in (r.get("status") or {}).items()}
    span = max(seconds, (r.get("wall_s") or 0.0) - warmup)
    refused = r.get("refused") or {}
    n503 = refused.get("count", status.get("503", 0))
    ok = r.get("ok", 0)
    within = r.get("ok_within", ok)
    other = sum(v for k, v in status.items() if k not in ("0", "200", "503"))
    goodput = within / seconds
    return {"offered_rps": round(r.get("sent", 0) / seconds, 1),
            "goodput_rps": round(goodput, 1), "goodput_ratio": round(goodput / capacity, 3) if capacity else 0.0,
            "objective_ms": r.get("objective_ms"), "ok_within": within,
            "ok_rps": round(ok / span, 1), "answer_span_s": round(span, 2),
            "refused_rps": round(n503 / seconds, 1),
            "refused_retry_after": round(refused["retry_after"] / n503, 3) if n503 and "retry_after" in refused else None,
            "refused_p50_ms": (refused.get("latency") or {}).get("p50_ms"),
            "refused_p99_ms": (refused.get("latency") or {}).get("p99_ms"),
            "other": other, "status": status, "unanswered": r.get("unfinished", 0) + status.get("0", 0),
            "p50_ms": r.get("p50_ms"), "p99_ms": r.get("p99_ms"), "wall_s": r.get("wall_s"),
            "lateness_p99_ms": (r.get("lateness") or {}).get("p99_ms")}


def _fmt(tag: str, m: str, what: str, s: dict) -> str:
    ra = s["refused_retry_after"]
    return (f"  {tag:8s} {m:12s} {what}: goodput {s['goodput_rps']:.0f}/s = {s['goodput_ratio']:.0%} of capacity "
            f"(200s {s['ok_rps']:.0f}/s, p50 {s['p50_ms'] or 0:.1f} ms p99 {s['p99_ms'] or 0:.1f} ms), "
            f"refused {s['refused_rps']:.0f}/s (Retry-After {'-' if ra is None else f'{ra:.0%}'}, "
            f"p50 {s['refused_p50_ms'] or 0:.1f} ms p99 {s['refused_p99_ms'] or 0:.1f} ms), other {s['other']}, "
            f"unanswered {s['unanswered']}, answered in {s['answer_span_s']:.1f} s, "
            f"load {os.getloadavg()[0]:.1f}")


def overload(servers: "Osprey | dict[str, Osprey]", models: list[BenchModel], *, seconds: float = 60.0,
             factor: float = 2.0, probe_s: float = 10.0, warmup: float = 2.0, binary: str | None = None,
             capacities: dict[str, float] | None = None, objective_ms: float = OBJECTIVE_MS) -> list[dict]:
    """Per model: one capacity (given in ``capacities`` or probed once on the first server), then
    open loop at 1x and ``factor`` x it on every server; one row per model and server. Several
    servers (``{tag: server}``, e.g. two trees of Osprey) are offered the same rates, phase by
    phase in ABBA order."""
    if not isinstance(servers, dict):
        servers = {getattr(servers, "name", "osprey"): servers}
    capacities = capacities or {}
    tags = list(servers)
    rows = []
    for m in models:
        probe = None
        if m.name in capacities:
            cap = capacities[m.name]
            log(f"  {m.name:12s} capacity given: {cap:.0f}/s")
        else:
            first = servers[tags[0]]
            probe = _json([sys.executable, "-m", "benchmarks.openloop", "--url", first.predict_url(m.name),
                           "--body", str(m.body), "--content-type", m.content_type, "--closed", "32",
                           "--duration", f"{probe_s:g}", "--warmup", "1"], probe_s + 120)
            cap = probe["rps"]
            log(f"  {m.name:12s} capacity (closed loop c=32, {probe_s:g} s, on {tags[0]}): {cap:.0f}/s, "
                f"{probe['errors']} errors, load {os.getloadavg()[0]:.1f}")
        phases: dict[str, dict[str, dict]] = {tag: {} for tag in tags}
        for i, (name, mult) in enumerate((("at_capacity", 1.0), (f"at_{factor:g}x", factor))):
            for tag in (tags if i % 2 == 0 else tags[::-1]):
                r = _open(binary, servers[tag].predict_url(m.name), m, mult * cap, seconds, warmup, objective_ms)
                s = phases[tag][name] = summary(r, seconds, warmup, cap)
                s["loadavg"] = round(os.getloadavg()[0], 2)
                log(_fmt(tag, m.name, f"open {mult:g}x {mult * cap:.0f}/s", s))
        for tag in tags:
            atn = phases[tag][f"at_{factor:g}x"]
            rows.append({"server": tag, "model": m.name, "capacity_rps": round(cap, 1), "capacity_probe": probe,
                         **phases[tag], "factor": factor, "seconds": seconds, "objective_ms": objective_ms,
                         "goodput_ratio": atn["goodput_ratio"], "goal": GOAL,
                         "met": atn["goodput_ratio"] >= GOAL and atn["unanswered"] == 0})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default=str(HERE / ".work"))
    ap.add_argument("--models", default="mlp,digits_cnn")
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--factor", type=float, default=2.0)
    ap.add_argument("--capacity", default=None, metavar="MODEL=RPS,...",
                    help="capacity per model (req/s) instead of probing it (closed loop c=32 on the first server)")
    ap.add_argument("--objective-ms", type=float, default=OBJECTIVE_MS,
                    help="a 200 counts as goodput when answered within this (from its scheduled send)")
    ap.add_argument("--config", action="append", default=[], metavar="key=value", help="Osprey setting")
    ap.add_argument("--compare", default=None, metavar="TREE",
                    help="also run the Osprey of this source tree (tag 'before'), phase by phase with this one")
    args = ap.parse_args(argv)
    try:
        capacities = parse_capacities(args.capacity)
    except ValueError as exc:
        ap.error(str(exc))
    work = Path(args.work).resolve()
    from .run import openloop_binary

    built = build_models(work, with_cnn=False, with_digits="digits_cnn" in args.models)
    models = [built[n] for n in args.models.split(",")]
    notes: list[str] = []
    exe = openloop_binary(work, notes)
    cfg = dict(kv.split("=", 1) for kv in args.config)
    trees = {"before": args.compare} if args.compare else {}
    trees["after" if args.compare else "osprey"] = None
    servers: dict[str, Osprey] = {}
    try:
        for tag, tree in trees.items():
            server = Osprey(work / f"overload-{tag}", models, config=cfg, tag=tag)
            if tree:
                cmd = server.command

                def command(cmd=cmd, tree=tree):
                    c, env, cwd = cmd()
                    return c, _env(PYTHONPATH=tree), cwd
                server.command = command
            servers[tag] = server.start()
        rows = overload(servers, models, seconds=args.seconds, factor=args.factor, binary=str(exe) if exe else None,
                        capacities=capacities, objective_ms=args.objective_ms)
    finally:
        for server in servers.values():
            server.stop()
    print(json.dumps({"date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                      "command": "python -m benchmarks.overload " + " ".join(argv or sys.argv[1:]),
                      "config": cfg, "loadavg_end": os.getloadavg(), "trees": {t: p or str(ROOT) for t, p in trees.items()}, "notes": notes,
                      "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
