"""What monitoring costs the request path: the same server with monitoring on and off (issue 11).

    .venv/bin/python -m benchmarks.monitoring_cost [--rounds 4] [--seconds 10] [--starts 1] [--before TREE]
        [--setting KEY=VALUE ...]

Two ``osprey serve`` processes of this tree load the same models, one with monitoring at its
defaults (sample_rate 1.0: every request's features captured, drift windows of 500, the
prediction log for feedback joins), one with ``monitoring=false``. Each round drives each
model with ``hey -c 32`` on both servers back to back (the order alternates between rounds),
so both sides see the same machine noise; the table gives the median throughput of each side
and their ratio, and the server's CPU time per answered request (``process_cpu_seconds_total``
over the run, divided by the answers): the difference is what monitoring costs per request
on whichever thread it runs (instance thread for capture, the monitor's background thread for
binning and windows), which is the cost when the server is CPU bound and a steadier number
than throughput on this shared 2-core machine. The same CPU time is split by thread, read from
``/proc/<pid>/task`` (the server names its threads): ``loop`` (the event loop: the process's
main thread), ``instance`` (``i:MODEL:N``), ``monitor`` (``osprey-monitor``), ``other``, and
``monitor_process``: the monitor's own process with ``--setting monitor_isolation=process``
(a child of the server named ``osprey-monitord``), whose CPU is added to the server's, and
``child_processes``: process instances' children (``instance_isolation=process``), where
capture then runs; the last table adds every process up (what a saturated machine pays).

``--starts N`` runs the rounds on N fresh pairs of servers, one after the other: throughput
moves by several percent between two starts of the same server (measured: ±2% on the MLP, ±5%
on digits_cnn, identical servers), which one pair cannot tell from monitoring's cost.

``--also KEY=VALUE`` adds a side of this tree, monitoring on, with those settings on top of
``--setting``: two ways of monitoring against the same ``off`` in the same rounds.

``--before TREE`` adds a third server in the same rounds, monitoring on, running the code of
another checkout (e.g. ``/work/main`` before a change, with ``benchmarks.ab.OspreyAt``): the
table then has a row per model for each monitored side, each against the same ``off``.

Models: the tiny MLP (TorchScript 16-64-4, batch 32 / 5 ms) and digits_cnn as ``osprey
examples`` builds it (the built-in image_classifier, its reference profile in the archive).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.ab import OspreyAt, key_values  # noqa: E402
from benchmarks.load import hey  # noqa: E402
from benchmarks.models import build_models  # noqa: E402
from benchmarks.systems import Osprey  # noqa: E402

WORK = ROOT / "benchmarks" / ".work" / "monitoring_cost"
ROLES = ("loop", "instance", "monitor", "other", "monitor_process", "child_processes")


def _cpu_seconds(srv: Osprey) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{srv.ports['metrics']}/metrics", timeout=10).read().decode()
    m = re.search(r"^process_cpu_seconds_total ([\d.e+]+)$", text, re.M)
    return float(m.group(1)) if m else float("nan")


def _stat(path: str) -> tuple[str, float] | None:
    """(name, CPU seconds: utime + stime) of a /proc stat file; None when it has ended."""
    try:
        with open(path) as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    return stat[stat.index("(") + 1:stat.rindex(")")], (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _thread_cpu(pid: int) -> dict[str, tuple[str, float]]:
    """Each thread of the server: tid -> (role, CPU seconds) (Linux; empty elsewhere)."""
    out = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        got = _stat(f"/proc/{pid}/task/{tid}/stat")
        if got is None:  # ended meanwhile
            continue
        comm, cpu = got
        role = ("loop" if tid == str(pid) else "instance" if comm.startswith(("i:", "p:"))
                else "monitor" if comm == "osprey-monitor" else "other")
        out[tid] = (role, cpu)
    # the server's descendant processes: a monitor in its own process (monitor_isolation=process,
    # named osprey-monitord: its CPU is monitoring's) and process instances' children
    for child in _descendants(pid):
        got = _stat(f"/proc/{child}/stat")
        if got is not None:
            out[f"process {child}"] = ("monitor_process" if got[0] == "osprey-monitord" else "child_processes", got[1])
    return out


def _descendants(pid: int) -> list[str]:
    out, todo = [], [str(pid)]
    while todo:
        p = todo.pop()
        try:
            for tid in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{tid}/children") as f:
                    kids = f.read().split()
                out += kids
                todo += kids
        except OSError:
            continue
    return out


def _roles(before: dict, after: dict, n: int) -> dict[str, float]:
    """CPU us per request by role between two :func:`_thread_cpu` readings (a thread that ended
    meanwhile is left out, one that started counts whole)."""
    out = {role: 0.0 for role in ROLES}
    for tid, (role, cpu) in after.items():
        out[role] += cpu - before.get(tid, (role, 0.0))[1]
    return {k: round(1e6 * v / n, 2) for k, v in out.items()}


def _monitored(srv: Osprey, model: str) -> int:
    text = urllib.request.urlopen(f"http://127.0.0.1:{srv.ports['metrics']}/metrics", timeout=10).read().decode()
    m = re.search(rf'^osprey_monitored_requests_total{{model="{model}",version="[^"]+"}} ([\d.e+]+)$', text, re.M)
    return int(float(m.group(1))) if m else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--starts", type=int, default=1, help="fresh servers this many times, the rounds on each")
    ap.add_argument("--before", default="", help="another checkout: a third side, monitoring on, its code")
    ap.add_argument("--setting", action="append", default=[], metavar="KEY=VALUE",
                    help="a config.properties setting for every server (e.g. instance_isolation=process); repeatable")
    ap.add_argument("--also", action="append", default=[], metavar="KEY=VALUE",
                    help="a third side: this tree, monitoring on, with these settings on top of --setting "
                         "(e.g. monitor_isolation=thread against --setting monitor_isolation=process); repeatable")
    ap.add_argument("--models", default="mlp,digits_cnn_builtin",
                    help="comma-separated, from benchmarks/models.py (default mlp,digits_cnn_builtin; mlp_nb is the "
                         "batch-1 path)")
    ap.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "monitoring_cost.json"))
    args = ap.parse_args(argv)
    WORK.mkdir(parents=True, exist_ok=True)
    wanted = [n.strip() for n in args.models.split(",") if n.strip()]
    built = build_models(WORK, with_cnn=False, with_digits=any(n.startswith("digits") for n in wanted))
    unknown = [n for n in wanted if n not in built]
    if unknown or not wanted:
        ap.error(f"--models: {', '.join(unknown) or 'none given'}; known: {', '.join(built)}")
    models = [built[n] for n in wanted]

    both, also = key_values(args.setting, "--setting", ap.error), key_values(args.also, "--also", ap.error)
    if "interpreter_cpu" not in both and hasattr(os, "sched_getaffinity") and len(os.sched_getaffinity(0)) > 1:
        # the servers run side by side, and with `auto` each claims a CPU the others have not
        # (server/core/cpus.py): on and off would pin their loops to different CPUs. One named
        # CPU for every side compares monitoring, not CPUs (trees without the setting ignore it).
        both["interpreter_cpu"] = str(max(os.sched_getaffinity(0)))

    def make_sides() -> dict:
        sides = {"on": Osprey(WORK / "on", models, config=dict(both), tag="monitoring-on"),
                 "off": Osprey(WORK / "off", models, config={**both, "monitoring": "false"}, tag="monitoring-off")}
        if args.before:
            sides["before"] = OspreyAt(Path(args.before).resolve(), WORK / "before", models, config=dict(both),
                                       tag="monitoring-before")
        if also:
            sides["also"] = Osprey(WORK / "also", models, config={**both, **also}, tag="monitoring-also")
        return sides
    names = list(make_sides())
    monitored_sides = [s for s in names if s != "off"]
    runs: dict = {m.name: {s: [] for s in names} for m in models}
    monitored = {(m.name, s): 0 for m in models for s in monitored_sides}
    for start in range(args.starts):
        sides = make_sides()
        try:
            for s in sides.values():
                s.start(timeout=300)
            for r in range(args.rounds):
                order = names if r % 2 == 0 else names[::-1]
                for m in models:
                    for side in order:
                        srv = sides[side]
                        if r == 0:  # a warm-up, before the counters are read (its CPU is not the run's)
                            hey(srv.predict_url(m.name), str(m.body), m.content_type, args.concurrency, 1, 0)
                        cpu0, threads0 = _cpu_seconds(srv), _thread_cpu(srv.proc.pid)
                        res = hey(srv.predict_url(m.name), str(m.body), m.content_type, args.concurrency,
                                  args.seconds, warmup_s=0)
                        cpu, threads1 = _cpu_seconds(srv) - cpu0, _thread_cpu(srv.proc.pid)
                        n = max(1, res["n"])
                        res["cpu_us_per_request"] = 1e6 * cpu / n
                        res["threads_us_per_request"] = _roles(threads0, threads1, n)
                        # the monitor's own process (monitor_isolation=process) counts with the server
                        res["cpu_us_per_request"] += res["threads_us_per_request"]["monitor_process"]
                        # every process of the server (process instances' children included)
                        res["all_cpu_us_per_request"] = sum(res["threads_us_per_request"].values())
                        res["start"] = start
                        runs[m.name][side].append(res)
                        t = res["threads_us_per_request"]
                        print(f"start {start + 1} round {r + 1} {m.name:20s} {side:6s} {res['rps']:8.0f} req/s "
                              f"{res['cpu_us_per_request']:6.0f} us CPU/req (" +
                              " ".join(f"{k} {v:.0f}" for k, v in t.items()) + f") errors {res['errors']}",
                              file=sys.stderr)
            for m in models:
                for s in monitored_sides:
                    monitored[(m.name, s)] += _monitored(sides[s], m.name)
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
            roles = sorted({k for x in on + off for k in x.get("threads_us_per_request", {})})
            threads = {k: {"on": round(statistics.median(x["threads_us_per_request"].get(k, 0.0) for x in on), 1),
                           "off": round(statistics.median(x["threads_us_per_request"].get(k, 0.0) for x in off), 1)}
                       for k in roles}
            label = {"on": "this tree", "also": "this tree, " + ", ".join(f"{k}={v}" for k, v in also.items())}.get(
                side, f"before ({args.before})")
            table.append({"model": m.name, "side": label,
                          "threads_us_per_request": threads,
                          "rps_on": round(rps_on), "rps_off": round(rps_off),
                          "ratio": round(rps_on / rps_off, 3), "cpu_us_on": round(cpu_on, 1),
                          "cpu_us_off": round(cpu_off, 1), "cpu_us_monitoring": round(cpu_on - cpu_off, 1),
                          "cpu_share": round((cpu_on - cpu_off) / cpu_off, 3),
                          "all_cpu_us_on": round(statistics.median(x["all_cpu_us_per_request"] for x in on), 1),
                          "all_cpu_us_off": round(statistics.median(x["all_cpu_us_per_request"] for x in off), 1),
                          "rps_on_all": [round(x["rps"]) for x in on], "rps_off_all": [round(x["rps"]) for x in off],
                          "monitored_requests": monitored[(m.name, side)]})
    out = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "command": " ".join(sys.argv), "settings": both,
           "starts": args.starts, "rounds": args.rounds, "seconds": args.seconds, "concurrency": args.concurrency, "models": table}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    print("| model | monitored side | on req/s | off req/s | on/off | CPU us/req on | off | monitoring us/req (share) |")
    print("|---|---|---|---|---|---|---|---|")
    for t in table:
        print(f"| {t['model']} | {t['side']} | {t['rps_on']} | {t['rps_off']} | {t['ratio']:.3f} | {t['cpu_us_on']} | "
              f"{t['cpu_us_off']} | {t['cpu_us_monitoring']} ({100 * t['cpu_share']:.1f}%) |")
    print()
    print("| model | monitored side | " + " | ".join(f"{k} us/req on / off (+)" for k in ROLES) + " |")
    print("|---|---|" + "---|" * len(ROLES))
    for t in table:
        th = t["threads_us_per_request"]
        print(f"| {t['model']} | {t['side']} | " + " | ".join(
            f"{th[k]['on']} / {th[k]['off']} ({th[k]['on'] - th[k]['off']:+.1f})" if k in th else "-"
            for k in ROLES) + " |")
    print()
    print("| model | monitored side | every process's CPU us/req on / off (+, share) |")
    print("|---|---|---|")
    for t in table:
        a, b = t["all_cpu_us_on"], t["all_cpu_us_off"]
        print(f"| {t['model']} | {t['side']} | {a} / {b} ({a - b:+.1f}, {100 * (a - b) / b:.1f}%) |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
