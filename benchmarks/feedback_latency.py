"""How long a feedback call takes while the model serves steady traffic (issue 11, feedback joins).

A client labels a request the moment its answer arrives, and another sends a label for an id
the server never answered (a typo, or one older than ``feedback_ttl``). Both while other
clients keep the model busy. The server starts once per side (this tree, and with
``--before TREE`` another checkout's code on the same archive), then for ``--calls`` rounds:
one request, its label at once (timed; joined or not), one label for an unknown id (timed).
A first such round, and a GET /monitoring after it, are timed apart: the monitor's first
quality computation after the first label imports scikit-learn (seconds on a slow machine,
once per monitor process), and the calls that wait for that pass pay it.

    .venv/bin/python -m benchmarks.feedback_latency [--calls 20] [--traffic 4] [--before /path/to/old/tree] \
        [--setting instance_isolation=process]

The model is digits_cnn as ``osprey examples`` builds it (a classifier with retraining on:
a joined label is also kept as a training row), thread instances, the monitor in its own
process (the defaults). Prints one JSON line per side (with the monitor process's memory, CPU
and whether scikit-learn or scipy.stats is mapped into it after the first round) and a table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path

import httpx
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.ab import OspreyAt, key_values  # noqa: E402
from benchmarks.models import build_models  # noqa: E402
from benchmarks.systems import Osprey  # noqa: E402

WORK = ROOT / "benchmarks" / ".work" / "feedback_latency"
MODEL = "digits_cnn_builtin"


def _top(answer: dict) -> str:
    return max(answer, key=answer.get)


def _monitor_process(srv: Osprey, served: int) -> dict | None:
    """The monitor process's memory, CPU and whether scikit-learn or scipy.stats is mapped in."""
    procs = [p for p in psutil.Process(srv.proc.pid).children(recursive=True) if p.name() == "osprey-monitord"]
    if not procs:
        return None
    p = procs[0]
    mapped = sorted({lib for m in p.memory_maps() for lib in ("sklearn", "scipy/stats", "scipy/spatial")
                     if f"/{lib}/" in m.path})
    return {"rss_mb": round(p.memory_info().rss / 2**20, 1), "cpu_s": round(sum(p.cpu_times()[:2]), 2),
            "mapped": mapped, "requests_served_by_then": served}


def measure(srv: Osprey, body: bytes, content_type: str, calls: int, traffic: int) -> dict:
    url = f"{srv.inference}/predictions/{MODEL}"
    stop = threading.Event()
    served = []

    def load() -> None:
        with httpx.Client(timeout=60) as c:
            while not stop.is_set():
                served.append(c.post(url, content=body, headers={"content-type": content_type}).status_code)

    threads = [threading.Thread(target=load, daemon=True) for _ in range(traffic)]
    for t in threads:
        t.start()
    known, unknown, joined, unmatched = [], [], 0, 0
    try:
        with httpx.Client(timeout=120) as c:
            while len(served) < 100:  # the traffic is flowing (and the baseline filling)
                time.sleep(0.05)
            for k in range(-1, calls):  # round -1: the first labels (timed apart, see the module doc)
                if k == 0:
                    t0 = time.perf_counter()  # (its quality computation: done by then)
                    assert c.get(f"{srv.inference}/monitoring/{MODEL}").status_code == 200
                    first = (known.pop(), unknown.pop(), time.perf_counter() - t0)
                    after_first = _monitor_process(srv, len(served))
                    joined = unmatched = 0
                r = c.post(url, content=body, headers={"content-type": content_type})
                label = {"request_id": r.headers["x-request-id"], "label": _top(r.json())}
                t0 = time.perf_counter()
                got = c.post(f"{srv.inference}/feedback/{MODEL}", json=label).json()
                known.append(time.perf_counter() - t0)
                joined += got.get("accepted", 0)
                t0 = time.perf_counter()
                got = c.post(f"{srv.inference}/feedback/{MODEL}", json={"request_id": f"never-{k}", "label": "1"}).json()
                unknown.append(time.perf_counter() - t0)
                unmatched += got.get("unmatched", 0)
    finally:
        stop.set()
        for t in threads:
            t.join()
    ms = lambda xs, f: round(1e3 * f(xs), 1)  # noqa: E731
    return {"calls": calls, "traffic_clients": traffic, "requests_served": len(served),
            "monitor_process_after_first_round": after_first,
            "first_label_ms": round(1e3 * first[0], 1), "first_unknown_id_ms": round(1e3 * first[1], 1),
            "first_status_ms": round(1e3 * first[2], 1),
            "errors": sum(s != 200 for s in served),
            "label_after_answer_ms_p50": ms(known, statistics.median), "label_after_answer_ms_max": ms(known, max),
            "joined": joined, "unknown_id_ms_p50": ms(unknown, statistics.median),
            "unknown_id_ms_max": ms(unknown, max), "unknown_counted_unmatched": unmatched,
            "label_after_answer_ms": [round(1e3 * x, 1) for x in known], "unknown_id_ms": [round(1e3 * x, 1) for x in unknown]}


def _monitor_cell(m: dict | None) -> str:
    return "-" if m is None else f"{m['rss_mb']}, {m['cpu_s']}, {'+'.join(m['mapped']) or 'neither'}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--traffic", type=int, default=4, help="client threads keeping the model busy")
    ap.add_argument("--before", default="", help="another checkout: measured too, its code on the same archive")
    ap.add_argument("--setting", action="append", default=[], metavar="KEY=VALUE",
                    help="a config.properties setting for both sides (e.g. instance_isolation=process); repeatable")
    ap.add_argument("--json", default="")
    args = ap.parse_args(argv)
    settings = key_values(args.setting, "--setting", ap.error)
    WORK.mkdir(parents=True, exist_ok=True)
    m = build_models(WORK, with_cnn=False, with_digits=True)[MODEL]
    body = Path(m.body).read_bytes()
    sides = {"this tree": Osprey(WORK / "now", [m], config=dict(settings), tag="feedback-now")}
    if args.before:
        sides = {"before": OspreyAt(Path(args.before).resolve(), WORK / "before", [m], config=dict(settings),
                                    tag="feedback-before"), **sides}
    rows = {}
    for name, srv in sides.items():
        srv.start(timeout=300)
        try:
            rows[name] = measure(srv, body, m.content_type, args.calls, args.traffic)
        finally:
            srv.stop()
        print(json.dumps({"side": name, **rows[name]}), flush=True)
    print("\n| side | label right after its answer: ms p50 / max (joined) | unknown id: ms p50 / max (unmatched) "
          "| first round: label / unknown id / status, ms | monitor process after it: MB, CPU s, mapped "
          "| requests served meanwhile |\n|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['label_after_answer_ms_p50']} / {r['label_after_answer_ms_max']} ({r['joined']} of "
              f"{r['calls']}) | {r['unknown_id_ms_p50']} / {r['unknown_id_ms_max']} ({r['unknown_counted_unmatched']} "
              f"of {r['calls']}) | {r['first_label_ms']} / {r['first_unknown_id_ms']} / {r['first_status_ms']} | "
              f"{_monitor_cell(r['monitor_process_after_first_round'])} | {r['requests_served']} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                                               "settings": settings, "sides": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
