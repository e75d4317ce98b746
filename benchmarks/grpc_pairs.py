"""Many short interleaved gRPC measurements of several Osprey trees kept running side by side.

    .venv/bin/python -m benchmarks.grpc_pairs SIDE SIDE... [--rounds 12] [--points live1,grpc1,grpc32]

Sides as in ``benchmarks/grpc_ab.py`` (a commit, or ``tree=PATH``, each with optional ``@ENV=V``).
Unlike grpc_ab (a fresh server per side and round, seconds-long points), every server is started
once and the points are short (1,500 calls at c=1, 2 s at c=32), the sides' order rotating each
round: on a machine shared with other work, many paired short samples say more than a few long
ones. Prints, per side and point, the median p50, req/s and server CPU µs per call over the
rounds, and writes the raw numbers to ``benchmarks/results/grpc-pairs.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path

from . import grpc_c1
from .grpc_ab import HERE, Side, parse_side, server_cpu_s
from .models import build_models


def measure(name: str, server: Side, exe: Path) -> dict:
    api = "live" if name == "live1" else "infer"
    load1 = os.getloadavg()[0]
    cpu0 = server_cpu_s(server.proc.pid)
    if name == "grpc32":
        out = grpc_c1.run(exe, server.grpc, api, "mlp", "INPUT0:FP32:1,16", warmup=5, concurrency=32, channels=2,
                          duration=2.0)
    else:
        out = grpc_c1.run(exe, server.grpc, api, "mlp", "INPUT0:FP32:1,16", requests=1500, warmup=100)
    cpu = server_cpu_s(server.proc.pid) - cpu0
    return {"p50": out["latency_ms"].get("p50"), "rps": out["throughput_rps"], "errors": out["errors"],
            "server_cpu_us": round(cpu * 1e6 / max(1, out["requests"]), 1), "load1": round(load1, 2)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("sides", nargs="+")
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--points", default="live1,grpc1,grpc32")
    ap.add_argument("--work", default=str(HERE / ".work" / "ab"))
    ap.add_argument("--out", default=str(HERE / "results" / "grpc-pairs.json"))
    args = ap.parse_args(argv)
    work = Path(args.work)
    exe = grpc_c1.build()
    m = build_models(work / "models", with_cnn=False, with_digits=False)["mlp"]
    sides = [parse_side(s, work) for s in args.sides]
    points = args.points.split(",")
    servers = {}
    try:
        for label, tree, env in sides:
            servers[label] = Side(tree, env, work / f"pairs-{len(servers)}", [m], tag="osprey").start()
        res = {label: {p: [] for p in points} for label, _, _ in sides}
        labels = [s[0] for s in sides]
        for r in range(args.rounds):
            k = r % len(labels)
            order = labels[k:] + labels[:k]
            if (r // len(labels)) % 2:
                order = order[::-1]
            for p in points:
                for label in order:
                    x = measure(p, servers[label], exe)
                    res[label][p].append(x)
            print(f"round {r + 1}: " + "; ".join(f"{lb} " + " ".join(
                f"{p} {res[lb][p][-1]['p50']:.3f}ms/{res[lb][p][-1]['rps']:.0f}/s/{res[lb][p][-1]['server_cpu_us']:.0f}us"
                for p in points) for lb in labels) + f"  load {os.getloadavg()[0]:.2f}", flush=True)
    finally:
        for s in servers.values():
            s.stop()
    print(f"\n{args.rounds} rotating rounds; medians: p50 ms / req/s / server CPU µs per call")
    print("| side | " + " | ".join(points) + " |")
    print("|---|" + "---|" * len(points))
    for label in labels:
        cells = []
        for p in points:
            xs = res[label][p]
            cells.append(f"{statistics.median(x['p50'] for x in xs):.3f} / "
                         f"{statistics.median(x['rps'] for x in xs):,.0f} / "
                         f"{statistics.median(x['server_cpu_us'] for x in xs):.0f}")
        print(f"| {label} | " + " | ".join(cells) + " |")
    loads = [x["load1"] for s in res.values() for xs in s.values() for x in xs]
    print(f"load average (1 min): {min(loads):.2f}-{max(loads):.2f}")
    Path(args.out).write_text(json.dumps({"sides": labels, "results": res}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
