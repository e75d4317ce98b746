"""Overload: does useful throughput hold when the offered load is twice the capacity?

For each model: a capacity probe (closed loop at c=32 with ``openloop.py --closed``, the way an
operator measures it), then Poisson arrivals (``openloop.c``, or ``openloop.py`` without a C
compiler) at 1x that capacity and at ``factor`` x it for ``seconds`` each. Goodput is the
number of 200 answers per second of the measured window; the goal is goodput at 2x >= 90% of
the capacity. Every answer must arrive (no connection errors, none unanswered); the refused
excess is 503, whose latency is reported beside it.

    python -m benchmarks.overload --seconds 60              # mlp and digits_cnn, default settings
    python -m benchmarks.overload --seconds 20 --compare /tmp/old-tree   # and an older tree, side by side

``benchmarks.run`` calls :func:`overload` for its ``overload`` section (``--overload``).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

from .models import BenchModel, build_models
from .systems import Osprey, _env

__all__ = ["overload", "main"]

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
GOAL = 0.90


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _json(cmd: list[str], timeout: float) -> dict:
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed: {out.stderr[-500:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _open(binary: str | None, url: str, m: BenchModel, rate: float, seconds: float, warmup: float) -> dict:
    if binary:
        parts = urlsplit(url)
        cmd = [binary, parts.hostname, str(parts.port), parts.path, str(m.body), m.content_type,
               f"{rate:.1f}", f"{seconds:g}", f"{warmup:g}", "512", "1"]
    else:
        cmd = [sys.executable, "-m", "benchmarks.openloop", "--url", url, "--body", str(m.body),
               "--content-type", m.content_type, "--rate", f"{rate:.1f}", "--duration", f"{seconds:g}",
               "--warmup", f"{warmup:g}"]
    t0 = time.monotonic()
    r = _json(cmd, seconds + warmup + 180)
    r["wall_s"] = round(time.monotonic() - t0, 2)
    return r


def _summary(r: dict, seconds: float, warmup: float) -> dict:
    """Goodput: 200 answers to the requests scheduled in the measured window, per second of the
    time it took to answer them (the window, or longer where the server fell behind: the driver
    waits for every answer)."""
    status = {str(k): v for k, v in (r.get("status") or {}).items()}
    span = max(seconds, (r.get("wall_s") or 0.0) - warmup)
    return {"offered_rps": round(r.get("sent", 0) / seconds, 1), "goodput_rps": round(r.get("ok", 0) / span, 1),
            "answer_span_s": round(span, 2),
            "status": status, "unanswered": r.get("unfinished", 0) + status.get("0", 0),
            "p50_ms": r.get("p50_ms"), "p99_ms": r.get("p99_ms"), "wall_s": r.get("wall_s"),
            "lateness_p99_ms": (r.get("lateness") or {}).get("p99_ms")}


def overload(servers: "Osprey | dict[str, Osprey]", models: list[BenchModel], *, seconds: float = 60.0,
             factor: float = 2.0, probe_s: float = 5.0, warmup: float = 2.0, binary: str | None = None) -> list[dict]:
    """Per model: capacity probe, then open loop at 1x and ``factor`` x that capacity; one row per
    model and server. Several servers (``{tag: server}``, e.g. two trees of Osprey) are driven
    phase by phase, each phase on one after the other, so that background load hits them alike."""
    if not isinstance(servers, dict):
        servers = {getattr(servers, "name", "osprey"): servers}
    rows = []
    for m in models:
        caps, at1 = {}, {}
        for tag, server in servers.items():
            probe = _json([sys.executable, "-m", "benchmarks.openloop", "--url", server.predict_url(m.name),
                           "--body", str(m.body), "--content-type", m.content_type, "--closed", "32",
                           "--duration", f"{probe_s:g}", "--warmup", "1"], probe_s + 120)
            caps[tag] = probe
            log(f"  {tag:8s} {m.name:12s} capacity (closed loop c=32, {probe_s:g} s): {probe['rps']:.0f}/s, "
                f"{probe['errors']} errors")
        for tag, server in servers.items():
            cap = caps[tag]["rps"]
            at1[tag] = _summary(_open(binary, server.predict_url(m.name), m, cap, seconds, warmup), seconds, warmup)
            r = at1[tag]
            log(f"  {tag:8s} {m.name:12s} open 1x {cap:.0f}/s: goodput {r['goodput_rps']:.0f}/s {r['status']} "
                f"answered in {r['answer_span_s']:.1f} s, p50 {r['p50_ms'] or 0:.1f} ms p99 {r['p99_ms'] or 0:.1f} ms")
        for tag, server in servers.items():
            cap = caps[tag]["rps"]
            atn = _summary(_open(binary, server.predict_url(m.name), m, factor * cap, seconds, warmup), seconds, warmup)
            ratio = atn["goodput_rps"] / cap if cap else 0.0
            log(f"  {tag:8s} {m.name:12s} open {factor:g}x {factor * cap:.0f}/s: goodput {atn['goodput_rps']:.0f}/s "
                f"= {ratio:.0%} of capacity {atn['status']} answered in {atn['answer_span_s']:.1f} s, "
                f"p50 {atn['p50_ms'] or 0:.1f} ms p99 {atn['p99_ms'] or 0:.1f} ms")
            rows.append({"server": tag, "model": m.name, "capacity_rps": round(cap, 1), "capacity_probe": caps[tag],
                         "at_capacity": at1[tag], f"at_{factor:g}x": atn, "factor": factor, "seconds": seconds,
                         "goodput_ratio": round(ratio, 3), "goal": GOAL,
                         "met": ratio >= GOAL and atn["unanswered"] == 0})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default=str(HERE / ".work"))
    ap.add_argument("--models", default="mlp,digits_cnn")
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--factor", type=float, default=2.0)
    ap.add_argument("--config", action="append", default=[], metavar="key=value", help="Osprey setting")
    ap.add_argument("--compare", default=None, metavar="TREE",
                    help="also run the Osprey of this source tree (tag 'before'), phase by phase with this one")
    args = ap.parse_args(argv)
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
        rows = overload(servers, models, seconds=args.seconds, factor=args.factor, binary=str(exe) if exe else None)
    finally:
        for server in servers.values():
            server.stop()
    print(json.dumps({"date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                      "command": "python -m benchmarks.overload " + " ".join(argv or sys.argv[1:]),
                      "config": cfg, "trees": {t: p or str(ROOT) for t, p in trees.items()}, "notes": notes,
                      "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
