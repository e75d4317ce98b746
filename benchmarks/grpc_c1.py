"""Build and run benchmarks/grpc_c1.cc, a synchronous C++ gRPC client for concurrency-1 latency.

Why it exists: the goal "gRPC at concurrency 1: server overhead (p50 minus the model's own
time) under 0.5 ms" needs the client's own cost to be small beside the server's. The Python
grpc.aio driver (benchmarks/grpc_driver.py) spends about as long per call as the server
does, so its p50 is roughly half client. The C++ client costs tens of microseconds a call.

``build(work_dir)`` generates the Open Inference Protocol's C++ code from
protos/grpc_service.proto with protoc + grpc_cpp_plugin and compiles the client with
``g++ -O2`` and ``pkg-config grpc++ protobuf`` (Debian: libgrpc++-dev protobuf-compiler-grpc
libprotobuf-dev pkg-config). Where any of that is missing it logs why and returns None: the
benchmark runs without it. ``run(...)`` runs the binary and returns its JSON as a dict.
``floor(...)`` runs the same client against the binary's own minimal C++ server
(``--serve``): the client + transport floor to set beside the numbers against Osprey.

    python -m benchmarks.grpc_c1 --target 127.0.0.1:7070 --api live --requests 3000
    python -m benchmarks.grpc_c1 --target 127.0.0.1:7070 --api infer --model mlp \
        --input INPUT0:FP32:1,16 --requests 3000
    python -m benchmarks.grpc_c1 --floor --api infer --requests 3000
    # closed loop, 32 threads over 2 connections, 5 s
    python -m benchmarks.grpc_c1 --target 127.0.0.1:7070 --api infer --model mlp --concurrency 32 \
        --channels 2 --duration 5 --warmup 50
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

__all__ = ["build", "command", "run", "floor"]

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SOURCE = HERE / "grpc_c1.cc"
PROTO = ROOT / "protos" / "grpc_service.proto"
DEFAULT_WORK = HERE / ".work" / "grpc_c1"

log = logging.getLogger("benchmarks.grpc_c1")


def _missing_tools() -> list[str]:
    return [t for t in ("protoc", "grpc_cpp_plugin", "g++", "pkg-config") if shutil.which(t) is None]


def build(work_dir: Path | str = DEFAULT_WORK) -> Path | None:
    """Compile the client into ``work_dir`` (reused while newer than its sources); None if it can't."""
    work = Path(work_dir)
    exe = work / "grpc_c1"
    if exe.exists() and exe.stat().st_mtime >= max(SOURCE.stat().st_mtime, PROTO.stat().st_mtime):
        return exe
    missing = _missing_tools()
    if missing:
        log.warning("grpc_c1 not built: %s not found (apt-get install libgrpc++-dev protobuf-compiler-grpc "
                    "libprotobuf-dev pkg-config)", ", ".join(missing))
        return None
    flags = subprocess.run(["pkg-config", "--cflags", "--libs", "grpc++", "protobuf"], capture_output=True, text=True)
    if flags.returncode != 0:
        log.warning("grpc_c1 not built: pkg-config grpc++ protobuf failed: %s", flags.stderr.strip()[-300:])
        return None
    work.mkdir(parents=True, exist_ok=True)
    gen = work / "gen"
    gen.mkdir(exist_ok=True)
    steps = [
        ["protoc", f"-I{PROTO.parent}", f"--cpp_out={gen}", f"--grpc_out={gen}",
         f"--plugin=protoc-gen-grpc={shutil.which('grpc_cpp_plugin')}", str(PROTO)],
        ["g++", "-O2", "-std=c++17", f"-I{gen}", "-o", str(exe) + ".tmp", str(SOURCE),
         str(gen / "grpc_service.pb.cc"), str(gen / "grpc_service.grpc.pb.cc"), *flags.stdout.split()],
    ]
    for cmd in steps:
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            log.warning("grpc_c1 not built: `%s` failed (%d): %s", " ".join(cmd[:2]), proc.returncode,
                        proc.stderr.strip()[-600:])
            return None
    Path(str(exe) + ".tmp").replace(exe)
    return exe


def command(binary: Path | str, target: str, api: str = "live", model: str = "", input_spec: str = "INPUT0:FP32:1,16",
            requests: int = 1000, warmup: int = 100, *, concurrency: int = 1, channels: int = 1,
            duration: float = 0.0) -> list[str]:
    """The client's command line for :func:`run`'s arguments."""
    cmd = [str(binary), "--target", target, "--api", api, "--requests", str(requests), "--warmup", str(warmup)]
    if api == "infer":
        cmd += ["--model", model, "--input", input_spec]
    if concurrency > 1:
        cmd += ["--concurrency", str(concurrency), "--channels", str(channels), "--duration", str(duration)]
    return cmd


def run(binary: Path | str, target: str, api: str = "live", model: str = "", input_spec: str = "INPUT0:FP32:1,16",
        requests: int = 1000, warmup: int = 100, timeout: float | None = None, *, concurrency: int = 1,
        channels: int = 1, duration: float = 0.0) -> dict:
    """Run the client once; its JSON line as a dict. Raises RuntimeError when it fails. With
    ``concurrency`` > 1 it is a closed loop of that many threads over ``channels`` connections for
    ``duration`` seconds (``warmup`` calls per thread first); ``requests`` is then unused."""
    cmd = command(binary, target, api, model, input_spec, requests, warmup, concurrency=concurrency,
                  channels=channels, duration=duration)
    if timeout is None:  # 100 ms a call is far beyond any c=1 latency here
        timeout = 60 + (duration + 0.1 * warmup if concurrency > 1 else 0.1 * (requests + warmup))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0 or not proc.stdout.strip():
        raise RuntimeError(f"grpc_c1 {api} failed ({proc.returncode}): {proc.stderr.strip()[-500:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def floor(binary: Path | str, api: str = "live", input_spec: str = "INPUT0:FP32:1,16", requests: int = 1000,
          warmup: int = 100) -> dict:
    """``run`` against the binary's own minimal C++ server on a free loopback port."""
    srv = subprocess.Popen([str(binary), "--serve", "127.0.0.1:0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True)
    try:
        line = srv.stdout.readline()
        if not line:
            raise RuntimeError(f"grpc_c1 --serve did not start: {srv.stderr.read()[-500:]}")
        port = json.loads(line)["port"]
        result = run(binary, f"127.0.0.1:{port}", api, "floor", input_spec, requests, warmup)
    finally:
        srv.kill()
        srv.communicate()
    result["floor_server"] = "grpc_c1 --serve (C++ sync server)"
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", default="127.0.0.1:7070")
    ap.add_argument("--api", choices=["live", "infer"], default="live")
    ap.add_argument("--model", default="")
    ap.add_argument("--input", default="INPUT0:FP32:1,16", help="NAME:DTYPE:d0,d1,...")
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--concurrency", type=int, default=1)
    ap.add_argument("--channels", type=int, default=1)
    ap.add_argument("--duration", type=float, default=0.0, help="seconds (with --concurrency > 1)")
    ap.add_argument("--work-dir", default=str(DEFAULT_WORK))
    ap.add_argument("--floor", action="store_true", help="measure against the binary's own C++ server instead")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    exe = build(args.work_dir)
    if exe is None:
        return 1
    if args.floor:
        print(json.dumps(floor(exe, args.api, args.input, args.requests, args.warmup)))
    else:
        print(json.dumps(run(exe, args.target, args.api, args.model, args.input, args.requests, args.warmup,
                             concurrency=args.concurrency, channels=args.channels, duration=args.duration)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
