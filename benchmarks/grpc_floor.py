"""The floor under issue 15's gRPC goal: what Python's gRPC library costs with no server behind it.

    .venv/bin/python -m benchmarks.grpc_floor [--rounds 3] [--seconds 5] [--threads 8]

Goal 2 of issue 15 asks OIP ModelInfer at c=32 for 80% of REST's throughput on the tiny MLP.
This runs, in the same rounds and with the same clients, the servers that bound the answer:

- ``osprey``: Osprey serving the tiny MLP (``mlp``, batching on); points ``rest32`` (hey c=32 on
  ``/predictions/mlp``) and ``grpc32`` (ModelInfer FP32 1x16 raw from ``grpc_c1 --concurrency 32
  --channels 2``) and ``grpc1`` (the same call at concurrency 1: its p50 against the 0.5 ms
  budget), as ``benchmarks/grpc_ab.py`` measures them;
- ``aio-noop``: a grpc.aio server (Osprey's gRPC transport, on uvloop as Osprey runs it) whose
  ModelInfer answers a constant output with the request's id: no model, no batcher, no Osprey;
- ``sync-noop``: the same handler in grpcio's synchronous server (a thread pool of ``--threads``);
  both no-op servers are measured on ``grpc32`` and ``grpc1``;
- ``http-noop``: ``benchmarks/asgi_constant.py`` (bare uvicorn answering a constant) under hey c=32.

Each round starts every server fresh, in alternating order; each point has its own warm-up, and
the server's CPU time (every process in its group, from /proc) over the measured part gives CPU
µs per answered call. Prints medians and writes ``benchmarks/results/grpc-floor.json``.
If ``aio-noop``'s ModelInfer cannot reach 80% of Osprey's REST, no change to Osprey's adapter on
grpc.aio can meet the goal on this machine: the library's own per-call work is the limit.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

from . import grpc_c1
from .ab import OspreyAt
from .grpc_ab import point
from .models import build_models
from .procs import stop_group
from .systems import free_port

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


# --- the no-op servers (run as `python -m benchmarks.grpc_floor --serve KIND --port N`) -------------

def _servicer(asynchronous: bool):
    import numpy as np

    from server.protocols.grpc.generated import grpc_service_pb2 as pb
    from server.protocols.grpc.generated import grpc_service_pb2_grpc as pb_grpc

    raw = np.array([[0.25, 0.75]], dtype=np.float32).tobytes()

    def infer(request):  # what any adapter must do at least: read the request, build the answer
        out = pb.ModelInferResponse(model_name=request.model_name, id=request.id)
        o = out.outputs.add()
        o.name, o.datatype = "OUTPUT0", "FP32"
        o.shape.extend((1, 2))
        out.raw_output_contents.append(raw)
        return out

    if asynchronous:
        class Servicer(pb_grpc.GRPCInferenceServiceServicer):
            async def ServerLive(self, request, context):
                return pb.ServerLiveResponse(live=True)

            async def ModelInfer(self, request, context):
                return infer(request)
    else:
        class Servicer(pb_grpc.GRPCInferenceServiceServicer):  # type: ignore[no-redef]
            def ServerLive(self, request, context):
                return pb.ServerLiveResponse(live=True)

            def ModelInfer(self, request, context):
                return infer(request)
    return Servicer(), pb_grpc.add_GRPCInferenceServiceServicer_to_server


def serve(kind: str, port: int, threads: int) -> None:
    import grpc

    if kind == "aio":
        import uvloop

        async def run() -> None:
            server = grpc.aio.server()
            servicer, add = _servicer(True)
            add(servicer, server)
            server.add_insecure_port(f"127.0.0.1:{port}")
            await server.start()
            print("ready", flush=True)
            await server.wait_for_termination()
        uvloop.run(run())
    else:
        from concurrent import futures

        server = grpc.server(futures.ThreadPoolExecutor(threads))
        servicer, add = _servicer(False)
        add(servicer, server)
        server.add_insecure_port(f"127.0.0.1:{port}")
        server.start()
        print("ready", flush=True)
        server.wait_for_termination()


# --- the harness -------------------------------------------------------------------------------------

class Floor:
    """A no-op server in its own process group, with what ``grpc_ab.point`` reads."""

    def __init__(self, kind: str, threads: int):
        self.kind, self.threads, self.port = kind, threads, free_port()
        self.grpc = f"127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def predict_url(self, model: str) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def start(self) -> "Floor":
        if self.kind == "http":
            cmd = [sys.executable, "-m", "benchmarks.asgi_constant", "--port", str(self.port)]
        else:
            cmd = [sys.executable, "-m", "benchmarks.grpc_floor", "--serve", self.kind, "--port", str(self.port),
                   "--threads", str(self.threads)]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, start_new_session=True, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return self
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{self.kind} no-op server did not start: {self.proc.stderr.read()[-2000:]!r}")
                time.sleep(0.05)

    def stop(self) -> None:
        stop_group(self.proc, 10)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--threads", type=int, default=8, help="the sync server's thread pool (default 8)")
    ap.add_argument("--serve", choices=("aio", "sync"), help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--work", default=str(HERE / ".work" / "grpc_floor"))
    ap.add_argument("--out", default=str(HERE / "results" / "grpc-floor.json"))
    args = ap.parse_args(argv)
    if args.serve:
        serve(args.serve, args.port, args.threads)
        return 0
    if args.rounds < 1 or args.seconds <= 0 or args.threads < 1:
        ap.error("--rounds and --threads must be at least 1, --seconds positive")
    exe = grpc_c1.build()
    if exe is None:
        print("grpc_c1 could not be built (see benchmarks/grpc_c1.py)", file=sys.stderr)
        return 1
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    m = build_models(work / "models", with_cnn=False, with_digits=False)["mlp"]
    sides = {"osprey": ("rest32", "grpc32", "grpc1"), "aio-noop": ("grpc32", "grpc1"), "sync-noop": ("grpc32", "grpc1"),
             "http-noop": ("rest32",)}
    res: dict[str, dict[str, list[dict]]] = {s: {p: [] for p in ps} for s, ps in sides.items()}
    for r in range(args.rounds):
        order = list(sides) if r % 2 == 0 else list(sides)[::-1]
        for side in order:
            if side == "osprey":
                server = OspreyAt(ROOT, work / f"osprey-{r}", [m], tag="osprey").start()
            else:
                server = Floor(side.split("-")[0], args.threads).start()
            try:
                for p in sides[side]:
                    x = point(p, server, exe, m, args.seconds)
                    res[side][p].append(x)
                    print(f"round {r + 1} {side:10s} {p:7s} {x['rps']:9.1f} req/s p50 {x['p50'] or 0:7.3f} ms"
                          f"  server CPU {x['server_cpu_us']} us/call  load {x['load1']}", flush=True)
            finally:
                server.stop()
    med = {s: {p: {k: statistics.median(x[k] or 0 for x in xs) for k in ("rps", "p50", "server_cpu_us")}
               for p, xs in ps.items()} for s, ps in res.items()}
    rest = med["osprey"]["rest32"]["rps"]
    print(f"\n{args.rounds} interleaved rounds, {args.seconds:g} s a point; medians")
    print("| server | point | req/s | vs Osprey REST (mlp) | p50 ms | server CPU µs/call |")
    print("|---|---|---|---|---|---|")
    for s, ps in med.items():
        for p, v in ps.items():
            print(f"| {s} | {p} | {v['rps']:,.0f} | {v['rps'] / rest:.0%} | {v['p50']:.2f} | {v['server_cpu_us']:.0f} |")
    loads = [x["load1"] for ps in res.values() for xs in ps.values() for x in xs]
    print(f"load average (1 min) during the run: {min(loads):.2f}-{max(loads):.2f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"seconds": args.seconds, "rounds": args.rounds, "threads": args.threads,
                                          "medians": med, "results": res}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
