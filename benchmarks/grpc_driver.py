"""A small closed-loop gRPC load driver (grpc.aio, several processes) for Osprey.

Each of ``--concurrency`` clients sends a request, waits for the answer and sends the next,
for ``--duration`` seconds (or ``--requests`` in all), after ``--warmup`` seconds not
counted. Clients are spread over ``--processes`` processes, each with its own event loop
and channel. Prints one JSON object: requests, errors, throughput and latency percentiles.

    # Open Inference Protocol ModelInfer, one FP32 input of shape 1x16 (raw_input_contents)
    python benchmarks/grpc_driver.py --target 127.0.0.1:7070 --model mlp --input INPUT0:FP32:1,16 -c 1 -d 10
    # The transport floor: ServerLive through the same channel and server
    python benchmarks/grpc_driver.py --api live -c 1 -d 10
    # TorchServe Predictions with a body
    python benchmarks/grpc_driver.py --api torchserve --model echo --body '{"x": 1}' -c 8 -p 2
    # The same model called directly in this process (TorchScript file), for the overhead
    python benchmarks/grpc_driver.py --direct path/to/mlp.pt --input INPUT0:FP32:1,16 -d 5
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

__all__ = ["main", "summarize"]

_NP = {"FP32": np.float32, "FP16": np.float16, "FP64": np.float64, "INT64": np.int64, "INT32": np.int32,
       "UINT8": np.uint8, "BOOL": np.bool_}


def _parse_input(spec: str) -> tuple[str, str, list[int]]:
    name, dt, shape = spec.split(":")
    return name, dt.upper(), [int(d) for d in shape.split(",")]


def _request(args):
    """(stub method name, request message) for the chosen API."""
    if args.api == "torchserve":
        from server.protocols.grpc.generated import inference_pb2 as pb

        return "Predictions", pb.PredictionsRequest(model_name=args.model, input={"body": args.body.encode()})
    from server.protocols.grpc.generated import grpc_service_pb2 as pb

    if args.api == "live":
        return "ServerLive", pb.ServerLiveRequest()
    req = pb.ModelInferRequest(model_name=args.model)
    rng = np.random.default_rng(0)
    for spec in args.input:
        name, dt, shape = _parse_input(spec)
        req.inputs.add(name=name, datatype=dt, shape=shape)
        req.raw_input_contents.append(rng.standard_normal(shape).astype(_NP[dt]).tobytes())
    return "ModelInfer", req


async def _client(call, req, metadata, stop_at: float, count_from: float, budget: list, lat: list, errors: list):
    import grpc

    while True:
        now = time.perf_counter()
        if now >= stop_at or (budget and budget[0] <= 0):
            return
        if budget:
            budget[0] -= 1
        try:
            await call(req, metadata=metadata)
        except grpc.aio.AioRpcError as exc:
            if now >= count_from:
                errors.append(exc.code().name)
            continue
        end = time.perf_counter()
        if now >= count_from:
            lat.append(end - now)


async def _run_process(args, clients: int, requests: int | None, out) -> None:
    import grpc

    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    method, req = _request(args)
    metadata = (("authorization", f"Bearer {args.token}"),) if args.token else None
    async with grpc.aio.insecure_channel(args.target) as channel:
        if args.api == "torchserve":
            from server.protocols.grpc.generated import inference_pb2_grpc as pb_grpc

            stub = pb_grpc.InferenceAPIsServiceStub(channel)
        else:
            from server.protocols.grpc.generated import grpc_service_pb2_grpc as pb_grpc

            stub = pb_grpc.GRPCInferenceServiceStub(channel)
        call = getattr(stub, method)
        await call(req, metadata=metadata)  # connect and check once
        start = time.perf_counter()
        count_from = start + args.warmup
        stop_at = count_from + (args.duration if requests is None else 1e9)
        budget = [requests] if requests is not None else []
        lat: list[float] = []
        errors: list[str] = []
        await asyncio.gather(*(_client(call, req, metadata, stop_at, count_from, budget, lat, errors)
                               for _ in range(clients)))
        out.put((np.asarray(lat, dtype=np.float64).tobytes(), errors, time.perf_counter() - count_from))


def _process_main(args, clients, requests, out) -> None:
    asyncio.run(_run_process(args, clients, requests, out))


def summarize(latencies: np.ndarray, errors: list[str], seconds: float, **extra) -> dict:
    lat_ms = latencies * 1000.0
    pct = (lambda q: round(float(np.percentile(lat_ms, q)), 3)) if lat_ms.size else (lambda q: None)
    return {**extra, "requests": int(lat_ms.size), "errors": len(errors),
            "error_codes": sorted(set(errors)), "seconds": round(seconds, 3),
            "throughput_rps": round(lat_ms.size / seconds, 1) if seconds > 0 else None,
            "latency_ms": {"mean": round(float(lat_ms.mean()), 3) if lat_ms.size else None,
                           "p50": pct(50), "p90": pct(90), "p99": pct(99),
                           "max": round(float(lat_ms.max()), 3) if lat_ms.size else None}}


def _direct(args) -> dict:
    """Call the TorchScript model in this process, one request at a time (no server)."""
    import torch

    model = torch.jit.load(args.direct).eval()
    xs = []
    rng = np.random.default_rng(0)
    for spec in args.input:
        _, dt, shape = _parse_input(spec)
        xs.append(rng.standard_normal(shape).astype(_NP[dt]))
    lat = []
    start = time.perf_counter()
    count_from, stop_at = start + args.warmup, start + args.warmup + args.duration
    while True:
        t0 = time.perf_counter()
        if t0 >= stop_at:
            break
        with torch.inference_mode():
            model(*(torch.from_numpy(x) for x in xs))
        if t0 >= count_from:
            lat.append(time.perf_counter() - t0)
    return summarize(np.asarray(lat), [], stop_at - count_from, mode="direct", model=args.direct)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--target", default="127.0.0.1:7070")
    p.add_argument("--api", choices=("oip", "torchserve", "live"), default="oip",
                   help="live: ServerLive, the transport floor (no model, no data plane)")
    p.add_argument("--model", default="mlp")
    p.add_argument("--input", action="append", help="NAME:DATATYPE:d1,d2 (repeat for several inputs)")
    p.add_argument("--body", default="", help="torchserve: the body input")
    p.add_argument("-c", "--concurrency", type=int, default=1)
    p.add_argument("-p", "--processes", type=int, default=1)
    p.add_argument("-d", "--duration", type=float, default=10.0)
    p.add_argument("-n", "--requests", type=int, default=None, help="stop after this many requests instead")
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--token", default=os.environ.get("OSPREY_TOKEN", ""))
    p.add_argument("--direct", help="a TorchScript file to call in-process instead of a server")
    args = p.parse_args(argv)
    args.input = args.input or ["INPUT0:FP32:1,16"]
    if args.direct:
        print(json.dumps(_direct(args)))
        return 0
    procs = max(1, min(args.processes, args.concurrency))
    share = [args.concurrency // procs + (i < args.concurrency % procs) for i in range(procs)]
    req_share = None if args.requests is None else [args.requests // procs + (i < args.requests % procs) for i in range(procs)]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    workers = [ctx.Process(target=_process_main, args=(args, share[i], req_share[i] if req_share else None, out))
               for i in range(procs)]
    for w in workers:
        w.start()
    results = [out.get() for _ in workers]
    for w in workers:
        w.join()
    lat = np.concatenate([np.frombuffer(r[0], dtype=np.float64) for r in results])
    errors = [e for r in results for e in r[1]]
    seconds = max(r[2] for r in results)
    print(json.dumps(summarize(lat, errors, seconds, mode=f"grpc-{args.api}", model=args.model,
                               concurrency=args.concurrency, processes=procs)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
