"""What monitoring costs the request path: the same server with monitoring on and off (issue 11).

    .venv/bin/python -m benchmarks.monitoring_cost [--rounds 4] [--seconds 10] [--before TREE]

Two ``osprey serve`` processes of this tree load the same models, one with monitoring at its
defaults (sample_rate 1.0: every request's features captured, drift windows of 500, the
prediction log for feedback joins), one with ``monitoring=false``. Each round drives each
model with ``hey -c 32`` on both servers back to back (the order alternates between rounds),
so both sides see the same machine noise; the table gives the median throughput of each side
and their ratio, and the server's CPU time per answered request (``process_cpu_seconds_total``
over the run, divided by the answers): the difference is what monitoring costs per request
on whichever thread it runs (instance thread for capture, the monitor's background thread for
binning and windows), which is the cost when the server is CPU bound and a steadier number
than throughput on this shared 2-core machine.

``--before TREE`` adds a third server in the same rounds, monitoring on, running the code of
another checkout (e.g. ``/work/main`` before a change, with ``benchmarks.ab.OspreyAt``): the
table then has a row per model for each monitored side, each against the same ``off``.

Models: the tiny MLP (TorchScript 16-64-4, batch 32 / 5 ms) and digits_cnn as ``osprey
examples`` builds it (the built-in image_classifier, its reference profile in the archive).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.ab import OspreyAt  # noqa: E402
from benchmarks.load import hey  # noqa: E402
from benchmarks.models import build_models  # noqa: E402
from benchmarks.systems import Osprey  # noqa: E402

WORK = ROOT / "benchmarks" / ".work" / "monitoring_cost"


def _cpu_seconds(srv: Osprey) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{srv.ports['metrics']}/metrics", timeout=10).read().decode()
    m = re.search(r"^process_cpu_seconds_total ([\d.e+]+)$", text, re.M)
    return float(m.group(1)) if m else float("nan")


def _monitored(srv: Osprey, model: str) -> int:
    text = urllib.request.urlopen(f"http://127.0.0.1:{srv.ports['metrics']}/metrics", timeout=10).read().decode()
    m = re.search(rf'^osprey_monitored_requests_total{{model="{model}",version="[^"]+"}} ([\d.e+]+)$', text, re.M)
    return int(float(m.group(1))) if m else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--before", default="", help="another checkout: a third side, monitoring on, its code")
    ap.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "monitoring_cost.json"))
    args = ap.parse_args(argv)
    WORK.mkdir(parents=True, exist_ok=True)
    built = build_models(WORK, with_cnn=False, with_digits=True)
    models = [built["mlp"], built["digits_cnn_builtin"]]
    sides = {"on": Osprey(WORK / "on", models, tag="monitoring-on"),
             "off": Osprey(WORK / "off", models, config={"monitoring": "false"}, tag="monitoring-off")}
    if args.before:
        sides["before"] = OspreyAt(Path(args.before).resolve(), WORK / "before", models, tag="monitoring-before")
    monitored_sides = [s for s in sides if s != "off"]
    runs: dict = {m.name: {s: [] for s in sides} for m in models}
    try:
        for s in sides.values():
            s.start(timeout=300)
        names = list(sides)
        for r in range(args.rounds):
            order = names if r % 2 == 0 else names[::-1]
            for m in models:
                for side in order:
                    srv = sides[side]
                    cpu0 = _cpu_seconds(srv)
                    res = hey(srv.predict_url(m.name), str(m.body), m.content_type, args.concurrency,
                              args.seconds, warmup_s=1 if r == 0 else 0)
                    cpu = _cpu_seconds(srv) - cpu0
                    res["cpu_us_per_request"] = 1e6 * cpu / max(1, res["n"])
                    runs[m.name][side].append(res)
                    print(f"round {r + 1} {m.name:20s} {side:6s} {res['rps']:8.0f} req/s "
                          f"{res['cpu_us_per_request']:6.0f} us CPU/req errors {res['errors']}", file=sys.stderr)
        monitored = {(m.name, s): _monitored(sides[s], m.name) for m in models for s in monitored_sides}
    finally:
        for s in sides.values():
            s.stop()
    table = []
    for m in models:
        off = runs[m.name]["off"]
        rps_off = statistics.median(x["rps"] for x in off)
        cpu_off = statistics.median(x["cpu_us_per_request"] for x in off)
        for side in monitored_sides:
            on = runs[m.name][side]
            rps_on = statistics.median(x["rps"] for x in on)
            cpu_on = statistics.median(x["cpu_us_per_request"] for x in on)
            table.append({"model": m.name, "side": "this tree" if side == "on" else f"before ({args.before})",
                          "rps_on": round(rps_on), "rps_off": round(rps_off),
                          "ratio": round(rps_on / rps_off, 3), "cpu_us_on": round(cpu_on, 1),
                          "cpu_us_off": round(cpu_off, 1), "cpu_us_monitoring": round(cpu_on - cpu_off, 1),
                          "cpu_share": round((cpu_on - cpu_off) / cpu_off, 3),
                          "rps_on_all": [round(x["rps"]) for x in on], "rps_off_all": [round(x["rps"]) for x in off],
                          "monitored_requests": monitored[(m.name, side)]})
    out = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "command": " ".join(sys.argv),
           "rounds": args.rounds, "seconds": args.seconds, "concurrency": args.concurrency, "models": table}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    print("| model | monitored side | on req/s | off req/s | on/off | CPU us/req on | off | monitoring us/req (share) |")
    print("|---|---|---|---|---|---|---|---|")
    for t in table:
        print(f"| {t['model']} | {t['side']} | {t['rps_on']} | {t['rps_off']} | {t['ratio']:.3f} | {t['cpu_us_on']} | "
              f"{t['cpu_us_off']} | {t['cpu_us_monitoring']} ({100 * t['cpu_share']:.1f}%) |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
