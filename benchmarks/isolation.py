"""Thread vs process instances (``instance_isolation``): not a test, a measurement.

    .venv/bin/python -m benchmarks.isolation [--duration 5] [--out benchmarks/results/isolation.json]

1. The boundary alone, in this process: one request per handoff, handed to a thread
   instance and to a process instance of the same trivial echo handler, in interleaved
   rounds (medians reported);
   the difference of the mean round trips is what crossing to the child costs per request
   (small body, and a 1 MiB body through shared memory). Also each kind's start-up time
   (start() to ready; a process instance's first start includes the forkserver importing torch).
2. The servers: the benchmark's tiny MLP (``mlp``: batchSize 32, ``mlp_nb``: batchSize 1)
   on an Osprey server per kind (both up; each point runs on one, then at once on the other,
   so background load hits both alike), driven by ``hey`` at c=1 and c=32 (``benchmarks.load``)
   and ``openloop --closed 1`` (µs timing at c=1); server start-up to first answer and RSS
   of the process tree, and per instance process.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import psutil

from benchmarks import load
from benchmarks.models import build_models
from benchmarks.systems import Osprey, tree_rss_mb

HERE = Path(__file__).resolve().parent

ECHO = '''
def handle(data, context):
    if data is None:
        return None
    return [bytes(row["body"][:8]) for row in data]
'''


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


async def _roundtrips(inst, body: bytes, n: int) -> float:
    """Mean seconds of one single-request handoff (submit -> on_done on the loop)."""
    from server.core.types import Field, Protocol, new_request

    loop = asyncio.get_running_loop()

    async def one() -> None:
        done = loop.create_future()
        r = new_request(Protocol.REST, "echo", "1", request_id="r", fields={"body": Field(body)})
        inst.submit([[r]], loop, lambda _i, _b, outcomes: done.set_result(outcomes))
        outcomes = await done
        assert not isinstance(outcomes[0][0], Exception), outcomes

    for _ in range(min(50, n)):  # warm-up
        await one()
    t0 = time.perf_counter()
    for _ in range(n):
        await one()
    return (time.perf_counter() - t0) / n


def boundary(work: Path, n: int, rounds: int = 5) -> dict:
    from server.core.archive import open_archive, write_archive
    from server.core.model_config import ModelConfig
    from server.instances.process import ProcessInstance
    from server.instances.thread import ModelInstance

    work.mkdir(parents=True, exist_ok=True)
    (work / "echo_handler.py").write_text(ECHO)
    mar = write_archive(model_name="echo", version="1", handler=str(work / "echo_handler.py"),
                        export_path=str(work), force=True)
    archive = open_archive(Path(mar), work / "open")
    config = ModelConfig(device_type="cpu")
    out: dict = {}

    async def main() -> None:
        insts = {}
        for kind, make in (("thread", ModelInstance), ("process", ProcessInstance), ("process_warm", ProcessInstance)):
            inst = make("echo", "1", archive, config, 0, None)
            t0 = time.perf_counter()
            inst.start()
            await inst.wait_loaded(120)
            out[kind] = {"start_s": time.perf_counter() - t0}
            if kind.startswith("process"):
                mem = psutil.Process(inst.pid).memory_full_info()
                out[kind]["child_rss_mib"], out[kind]["child_pss_mib"] = mem.rss / 2**20, mem.pss / 2**20
            insts[kind] = inst
        insts.pop("process_warm").stop()
        small, big = b"x" * 64, os.urandom(1 << 20)
        samples: dict = {(k, s): [] for k in insts for s in ("small_us", "1mib_us")}
        for _ in range(rounds):  # interleaved, so that background load hits both kinds alike
            for kind, inst in insts.items():
                samples[(kind, "small_us")].append(await _roundtrips(inst, small, n // rounds) * 1e6)
                samples[(kind, "1mib_us")].append(await _roundtrips(inst, big, max(n // rounds // 10, 20)) * 1e6)
        for (kind, what), values in samples.items():
            out[kind][what] = statistics.median(values)
        for inst in insts.values():
            inst.stop()
            while not inst.ended:
                await asyncio.sleep(0.01)
        out["rounds"] = rounds
        out["crossing_small_us"] = out["process"]["small_us"] - out["thread"]["small_us"]
        out["crossing_1mib_us"] = out["process"]["1mib_us"] - out["thread"]["1mib_us"]

    asyncio.run(main())
    archive.cleanup()
    return out


def _c1(srv, m, seconds: float) -> dict:
    r = json.loads(subprocess.run(
        [sys.executable, "-m", "benchmarks.openloop", "--url", srv.predict_url(m.name), "--body", str(m.body),
         "--content-type", m.content_type, "--closed", "1", "--duration", str(seconds), "--warmup", "1"],
        capture_output=True, text=True, timeout=seconds + 120).stdout)
    return {"model": m.name, "tool": "openloop --closed 1", "c": 1, "p50_ms": r.get("p50_ms"),
            "p99_ms": r.get("p99_ms"), "rps": r.get("rps")}


def servers(work: Path, duration: float, c1_seconds: float) -> list[dict]:
    """Both servers up at once; every point runs on the thread server, then at once on the process one."""
    models = build_models(work / "models", with_cnn=False, with_digits=False)
    mlps = [models["mlp"], models["mlp_nb"]]
    srvs = {}
    rows = {}
    try:
        for kind in ("thread", "process"):
            srv = srvs[kind] = Osprey(work / f"osprey-{kind}", mlps, config={"instance_isolation": kind},
                                      tag=f"osprey-{kind}")
            srv.start()
            pid = srv.proc.pid
            children = list(psutil.Process(pid).children(recursive=True))
            info = rows[kind] = {
                "kind": kind, "startup": dict(srv.startup), "rss_tree_mib": tree_rss_mb(pid),
                "rss_server_mib": psutil.Process(pid).memory_info().rss / 2**20,
                "rss_children_mib": sorted(round(p.memory_info().rss / 2**20, 1) for p in children),
                # proportional set size: pages shared copy-on-write with the fork server split among sharers
                "pss_tree_mib": sum(p.memory_full_info().pss for p in (psutil.Process(pid), *children)) / 2**20,
                "pss_children_mib": sorted(round(p.memory_full_info().pss / 2**20, 1) for p in children),
                "load": []}
            _log(f"{kind}: first answer {srv.startup.get('first_answer_s', 0):.2f} s, tree RSS "
                 f"{info['rss_tree_mib']:.0f} MiB (PSS {info['pss_tree_mib']:.0f}), children RSS "
                 f"{info['rss_children_mib']} PSS {info['pss_children_mib']}")
        for m in mlps:
            for kind, srv in srvs.items():
                r = _c1(srv, m, c1_seconds)
                rows[kind]["load"].append(r)
                _log(f"  {kind:8s} {m.name:7s} exact c=1 p50 {r.get('p50_ms') or 0:.3f} ms")
            for c in (1, 32):
                for kind, srv in srvs.items():
                    h = load.hey(srv.predict_url(m.name), str(m.body), m.content_type, c, duration, 1.0)
                    rows[kind]["load"].append({"model": m.name, "tool": "hey", "c": c, "rps": h.get("rps"),
                                               "p50_ms": h.get("p50_ms"), "p99_ms": h.get("p99_ms"),
                                               "errors": h.get("errors")})
                    _log(f"  {kind:8s} {m.name:7s} c={c:<3d} {h.get('rps') or 0:8.1f} req/s p50 "
                         f"{h.get('p50_ms') or 0:.2f} ms p99 {h.get('p99_ms') or 0:.2f} ms errors {h.get('errors')}")
    finally:
        for srv in srvs.values():
            srv.stop()
    return list(rows.values())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=5.0, help="seconds per hey point (after 1 s warm-up)")
    ap.add_argument("--c1-seconds", type=float, default=5.0, help="seconds of openloop --closed 1")
    ap.add_argument("--roundtrips", type=int, default=3000, help="handoffs per kind in the boundary measurement")
    ap.add_argument("--work", default=str(HERE / ".work" / "isolation"))
    ap.add_argument("--out", default=str(HERE / "results" / "isolation.json"))
    args = ap.parse_args(argv)
    work = Path(args.work)
    result = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "command": " ".join([sys.executable, "-m",
              "benchmarks.isolation", *(argv if argv is not None else sys.argv[1:])]),
              "cpus": os.cpu_count(), "loadavg_before": os.getloadavg()}
    result["boundary"] = boundary(work / "boundary", args.roundtrips)
    _log(json.dumps(result["boundary"], indent=1))
    result["servers"] = servers(work, args.duration, args.c1_seconds)
    result["loadavg_after"] = os.getloadavg()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
