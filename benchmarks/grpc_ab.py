"""Interleaved A/B of Osprey's gRPC front end: two or more trees, same machine, same run.

    .venv/bin/python -m benchmarks.grpc_ab OLD NEW [--rounds 3] [--seconds 5] [--points rest32,grpc32,grpc1,live1]

Each side is a commit (checked out into ``benchmarks/.work/ab/`` as in ``benchmarks/ab.py``) or
``tree=PATH`` (a working tree as it is, e.g. ``tree=.``); ``NAME@ENV=VALUE`` sets environment
variables for that side's server only (e.g. ``tree=.@OSPREY_X=1``). Every round starts a fresh
server per side, alternating the order (A B, then B A, ...), and runs the points on the tiny
MLP with batching on (``mlp`` from ``benchmarks/models.py``):

- ``rest32``: ``hey -c 32`` on ``/predictions/mlp`` (JSON), the REST number of RESULTS.md;
- ``grpc32``: OIP ModelInfer (FP32 1x16 raw) from ``grpc_c1 --concurrency 32 --channels 2``;
- ``grpc1`` / ``live1``: ModelInfer / ServerLive at concurrency 1 from ``grpc_c1``;
- ``py32``: the Python grpc.aio driver at c=32, 2 processes (what ``benchmarks/run.py`` uses).

Each point is measured after its own warm-up, with the server's CPU time (every thread of its
process group, from /proc) over the measured part: CPU µs per answered call is the number that
holds on a shared machine, where req/s move with the other work. Prints per-point medians (req/s,
p50, server CPU µs/call) with the 1-minute load average at each point, and
writes the raw numbers to ``benchmarks/results/grpc-ab.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from . import grpc_c1, load
from .ab import OspreyAt, checkout
from .models import build_models

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


class Side(OspreyAt):
    def __init__(self, tree: Path, env: dict[str, str], *args, **kwargs):
        super().__init__(tree, *args, **kwargs)
        self.extra_env = env

    def command(self):
        cmd, env, cwd = super().command()
        env.update(self.extra_env)
        return cmd, env, cwd


def parse_side(spec: str, work: Path) -> tuple[str, Path, dict[str, str]]:
    name, *envs = spec.split("@")
    env = dict(e.split("=", 1) for e in envs)
    if name.startswith("tree="):
        tree = Path(name[5:]).resolve()
        label = tree.name
    else:
        label, tree = checkout(name, work)
    if envs:
        label += "@" + ",".join(envs)
    return label, tree, env


def server_cpu_s(pgid: int) -> float:
    """User + system CPU seconds of every process in the server's process group (all threads)."""
    total = 0
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            f = (d / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(f[2]) == pgid:  # fields after the command: state ppid pgrp ... utime(11) stime(12)
            total += int(f[11]) + int(f[12])
    return total / os.sysconf("SC_CLK_TCK")


def point(name: str, server: Side, exe: Path, m, seconds: float) -> dict:
    """One measurement after its own warm-up; server CPU µs per answered call over the measured part."""
    load1 = os.getloadavg()[0]
    pgid = server.proc.pid
    spec = "INPUT0:FP32:1,16"
    if name == "rest32":
        load.hey(server.predict_url(m.name), str(m.body), m.content_type, 32, 1.5, 0)
        cpu0 = server_cpu_s(pgid)
        out = load.hey(server.predict_url(m.name), str(m.body), m.content_type, 32, seconds, 0)
        r = {"rps": out["rps"], "p50": out.get("p50_ms"), "n": out["n"], "errors": out["errors"]}
    elif name == "py32":
        cmd = [sys.executable, str(HERE / "grpc_driver.py"), "--target", server.grpc, "--model", m.name,
               "--input", spec, "-c", "32", "-p", "2", "-d", str(seconds), "--warmup", "2"]
        cpu0 = server_cpu_s(pgid)  # includes the driver's warm-up: read the CPU column loosely here
        out = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True,
                                        timeout=seconds + 120).stdout.strip().splitlines()[-1])
        r = {"rps": out["throughput_rps"], "p50": out["latency_ms"]["p50"], "errors": out["errors"],
             "n": out["requests"]}
    else:
        api = "live" if name == "live1" else "infer"
        if name == "grpc32":
            grpc_c1.run(exe, server.grpc, api, m.name, spec, warmup=20, concurrency=32, channels=2, duration=1.0)
            cpu0 = server_cpu_s(pgid)
            out = grpc_c1.run(exe, server.grpc, api, m.name, spec, warmup=1, concurrency=32, channels=2,
                              duration=seconds)
        else:
            grpc_c1.run(exe, server.grpc, api, m.name, spec, requests=300, warmup=1)
            cpu0 = server_cpu_s(pgid)
            out = grpc_c1.run(exe, server.grpc, api, m.name, spec, requests=int(seconds * 800), warmup=1)
        r = {"rps": out["throughput_rps"], "p50": out["latency_ms"].get("p50"), "errors": out["errors"],
             "n": out["requests"], "client_cpu_us": out["client_cpu_us_per_call"]}
    cpu = server_cpu_s(pgid) - cpu0
    r["server_cpu_us"] = round(cpu * 1e6 / r["n"], 1) if r.get("n") else None
    r["load1"] = round(load1, 2)
    return r


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("sides", nargs="+")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--points", default="rest32,grpc32,grpc1,live1")
    ap.add_argument("--work", default=str(HERE / ".work" / "ab"))
    ap.add_argument("--out", default=str(HERE / "results" / "grpc-ab.json"))
    args = ap.parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    exe = grpc_c1.build()
    if exe is None:
        print("grpc_c1 could not be built (see benchmarks/grpc_c1.py)", file=sys.stderr)
        return 1
    m = build_models(work / "models", with_cnn=False, with_digits=False)["mlp"]
    sides = [parse_side(s, work) for s in args.sides]
    points = args.points.split(",")
    res: dict[str, dict[str, list[dict]]] = {label: {p: [] for p in points} for label, _, _ in sides}
    for r in range(args.rounds):
        order = sides if r % 2 == 0 else sides[::-1]
        for label, tree, env in order:
            server = Side(tree, env, work / f"grpc-{label.replace('/', '_')}-{r}", [m], tag="osprey").start()
            try:
                for p in points:
                    res[label][p].append(point(p, server, exe, m, args.seconds))
                    x = res[label][p][-1]
                    print(f"round {r + 1} {label:28s} {p:7s} {x['rps']:9.1f} req/s p50 {x['p50'] or 0:7.3f} ms"
                          f"  server CPU {x['server_cpu_us']} us/call  load {x['load1']}", flush=True)
            finally:
                server.stop()
    print(f"\n{args.rounds} interleaved rounds, {args.seconds:g} s a point; medians (load average 1 min: min-max)")
    print("| side | " + " | ".join(f"{p} req/s | {p} p50 ms | {p} server CPU µs/call" for p in points) + " |")
    print("|---|" + "---|---|---|" * len(points))
    for label, _, _ in sides:
        cells = []
        for p in points:
            xs = res[label][p]
            cells += [f"{statistics.median(x['rps'] for x in xs):,.0f}",
                      f"{statistics.median(x['p50'] or 0 for x in xs):.3f}",
                      f"{statistics.median(x['server_cpu_us'] or 0 for x in xs):.0f}"]
        print(f"| {label} | " + " | ".join(cells) + " |")
    loads = [x["load1"] for s in res.values() for xs in s.values() for x in xs]
    print(f"load average (1 min) during the run: {min(loads):.2f}-{max(loads):.2f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"sides": [s[0] for s in sides], "seconds": args.seconds, "results": res},
                                         indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
