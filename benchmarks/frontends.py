"""Front-end processes on the inference port (setting ``frontends``): not a test, a measurement.

    .venv/bin/python -m benchmarks.frontends [--counts 1,2,3] [--rounds 3] [--duration 5]
        [--concurrency 32] [--pin] [--out benchmarks/results/frontends.json]

One Osprey server per front-end count, all serving the benchmark's tiny MLP (``mlp``, batchSize
32 / 5 ms; ``--models mlp,mlp_nb`` adds batching off) and all started at once; only the one being
measured runs (the others' process trees are paused, SIGSTOP). Each round drives every server
in turn with ``hey`` at ``--concurrency`` (1 s warm-up, then ``--duration`` s), so background
load falls on all alike; medians over rounds are reported, with every round's figures.

Besides throughput it reads where the CPU went during each measured run: the server's event-loop
thread (the main thread: what one interpreter's GIL bounds), the server's other threads (model
instances, monitoring), and the front-end processes. The loop's CPU per request is what caps one
server at ``1e6 / us_per_request`` requests per second however many cores the front ends get; on
this 2-core machine the front ends, the server and ``hey`` share two cores, so the throughput
columns say whether a count slows a small machine down, and the loop's microseconds per request
say what the front ends take off the one thread that cannot grow.

``--pin`` (for a host with more cores than the largest count): the server with N front-end
processes in all (``frontends=N``) runs on cores 0..N-1 and ``hey`` on the others, so each
count gets as many cores as processes and the throughput column is the scaling curve issue 15
asks for (goal: at least 0.7 x N of one process's, up to 8).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import psutil

from benchmarks import load
from benchmarks.models import build_models
from benchmarks.systems import Osprey

HERE = Path(__file__).resolve().parent


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _cpu(pid: int) -> dict:
    """CPU seconds so far: the server's main (event-loop) thread, its other threads, its front ends."""
    root = psutil.Process(pid)
    loop_s = other_s = 0.0
    for t in root.threads():
        if t.id == pid:
            loop_s = t.user_time + t.system_time
        else:
            other_s += t.user_time + t.system_time
    fronts = 0.0
    for child in root.children(recursive=False):
        try:
            if "server.frontends.child" in " ".join(child.cmdline()):
                c = child.cpu_times()
                fronts += c.user + c.system
        except psutil.NoSuchProcess:
            pass
    return {"loop_s": loop_s, "other_threads_s": other_s, "frontends_s": fronts}


def _pin(srv: Osprey, n: int) -> None:
    """The server's process tree on cores 0..n-1; this process (and the hey it starts) on the rest."""
    cores = list(range(n))
    for p in [psutil.Process(srv.proc.pid), *psutil.Process(srv.proc.pid).children(recursive=True)]:
        try:
            p.cpu_affinity(cores)
            for t in p.threads():  # threads started before the pin keep their own mask
                os.sched_setaffinity(t.id, cores)
        except (psutil.NoSuchProcess, ProcessLookupError):
            pass
    os.sched_setaffinity(0, list(range(n, os.cpu_count())))


def run(work: Path, counts: list[int], models: list[str], rounds: int, duration: float, concurrency: int,
        pin: bool = False) -> dict:
    built = build_models(work / "models", with_cnn=False, with_digits=False)
    chosen = [built[m] for m in models]
    srvs: dict[int, Osprey] = {}
    rows: list[dict] = []
    try:
        for n in counts:
            srv = srvs[n] = Osprey(work / f"osprey-{n}", chosen, config={"frontends": n}, tag=f"osprey-frontends-{n}")
            srv.start()
            srv.pause()
            _log(f"frontends={n}: started ({srv.startup.get('first_answer_s', 0):.2f} s to first answer)")
        for r in range(rounds):
            for m in chosen:
                for n, srv in srvs.items():
                    srv.resume()
                    if pin:
                        _pin(srv, n)
                    url = srv.predict_url(m.name)
                    load.hey(url, str(m.body), m.content_type, concurrency, 1.0, 0)  # warm-up
                    before = _cpu(srv.proc.pid)
                    h = load.hey(url, str(m.body), m.content_type, concurrency, duration, 0)
                    after = _cpu(srv.proc.pid)
                    srv.pause()
                    ok = h.get("ok") or 0
                    spent = {k: after[k] - before[k] for k in before}
                    row = {"round": r + 1, "model": m.name, "frontends": n, "rps": h.get("rps"),
                           "p50_ms": h.get("p50_ms"), "p99_ms": h.get("p99_ms"), "errors": h.get("errors"),
                           "answers": ok, **{k: round(v, 3) for k, v in spent.items()},
                           "loop_us_per_request": round(spent["loop_s"] / ok * 1e6, 2) if ok else None,
                           "frontends_us_per_request": round(spent["frontends_s"] / ok * 1e6, 2) if ok else None}
                    rows.append(row)
                    _log(f"round {r + 1} {m.name:7s} frontends={n}: {row['rps'] or 0:8.1f} req/s p50 "
                         f"{row['p50_ms'] or 0:.2f} ms p99 {row['p99_ms'] or 0:.2f} ms errors {row['errors']}; "
                         f"loop {row['loop_us_per_request']} us/req, front ends {row['frontends_us_per_request']} us/req")
    finally:
        if pin:
            os.sched_setaffinity(0, list(range(os.cpu_count())))
        for srv in srvs.values():
            srv.resume()
            srv.stop()
    summary = []
    for m in chosen:
        base = None
        for n in counts:
            mine = [x for x in rows if x["model"] == m.name and x["frontends"] == n and x["rps"]
                    and x["loop_us_per_request"] is not None]
            if not mine:
                continue
            rps = statistics.median(x["rps"] for x in mine)
            loop_us = statistics.median(x["loop_us_per_request"] for x in mine)
            base = base or {"rps": rps, "loop_us": loop_us}
            summary.append({"model": m.name, "frontends": n, "rps_median": round(rps, 1),
                            "vs_one": round(rps / base["rps"], 3),
                            "loop_us_per_request_median": loop_us,
                            "loop_bound_req_s": round(1e6 / loop_us) if loop_us else None,
                            "errors": sum(x["errors"] or 0 for x in mine)})
    return {"rows": rows, "summary": summary}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--counts", default="1,2,3", help="front-end counts to compare (comma-separated; 1 = none)")
    ap.add_argument("--models", default="mlp", help="benchmark models (mlp, mlp_nb)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=float, default=5.0, help="seconds per measured hey run")
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--pin", action="store_true", help="frontends=N on cores 0..N-1, hey on the others "
                    "(a host with more cores than the largest count)")
    ap.add_argument("--work", default=str(HERE / ".work" / "frontends"))
    ap.add_argument("--out", default=str(HERE / "results" / "frontends.json"))
    args = ap.parse_args(argv)
    counts = [int(c) for c in args.counts.split(",") if c.strip()]
    if args.pin and max(counts) >= (os.cpu_count() or 1):
        ap.error(f"--pin needs more cores than the largest count ({max(counts)}); this host has {os.cpu_count()}")
    result = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
              "command": " ".join([sys.executable, "-m", "benchmarks.frontends",
                                   *(argv if argv is not None else sys.argv[1:])]),
              "cpus": os.cpu_count(), "loadavg_before": os.getloadavg()}
    result.update(run(Path(args.work), counts, [m.strip() for m in args.models.split(",")], args.rounds,
                      args.duration, args.concurrency, args.pin))
    result["pinned"] = args.pin
    result["loadavg_after"] = os.getloadavg()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    for s in result["summary"]:
        print(f"{s['model']:7s} frontends={s['frontends']}: {s['rps_median']:8.1f} req/s ({s['vs_one']:.2f}x one), "
              f"loop {s['loop_us_per_request_median']} us/req -> loop-bound {s['loop_bound_req_s']} req/s, "
              f"errors {s['errors']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
