"""Osprey's OIP gRPC against MLServer's, the same tiny MLP, interleaved, with the C++ client.

    .venv/bin/python -m benchmarks.mlserver_grpc [--rounds 2] [--seconds 4] [--concurrency 1,8,32,128]

MLServer (Seldon's OIP server, ``pip install mlserver``) runs in its own virtual environment,
``benchmarks/.work/venv-mlserver`` (``python -m venv`` + ``pip install mlserver==1.7.1 "uvloop<0.22"``:
its grpcio/protobuf pins differ from Osprey's, and with uvloop 0.22+ MLServer 1.7.1's worker
processes die at start, ``asyncio.get_event_loop()`` in ``parallel/worker.py``). It serves the tiny MLP of ``benchmarks/models.py``
(16-64-4, the same weights, exported from the TorchScript file) through a small custom runtime
(``MLP`` below: NumPy forward pass, so its model time is below Osprey's TorchScript call) with
MLServer's defaults (one parallel worker process, adaptive batching off). Osprey serves ``mlp``
(batching on). Both are driven by ``benchmarks/grpc_c1`` (ModelInfer, FP32 1x16 raw input):
at c=1 sequential calls, above it ``--concurrency C --channels 2``. Every round starts both
servers fresh, in alternating order; prints median req/s, p50 and server CPU µs per call.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
VENV = HERE / ".work" / "venv-mlserver"

RUNTIME = '''
import numpy as np
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse


class MLP(MLModel):
    async def load(self) -> bool:
        w = np.load(self.settings.parameters.uri)
        self.w1, self.b1, self.w2, self.b2 = (w[k] for k in ("w1", "b1", "w2", "b2"))
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        x = NumpyCodec.decode_input(payload.inputs[0]).reshape(-1, 16)
        y = np.maximum(x @ self.w1.T + self.b1, 0) @ self.w2.T + self.b2
        return InferenceResponse(model_name=self.name,
                                 outputs=[NumpyCodec.encode_output("OUTPUT0", y.astype(np.float32))])
'''


def model_dir(work: Path, torchscript: Path) -> Path:
    """The MLServer model folder: runtime module, settings, and the MLP's weights as .npz."""
    import numpy as np
    import torch

    d = work / "mlserver" / "mlp"  # MLServer wants the folder named as the model
    d.mkdir(parents=True, exist_ok=True)
    sd = torch.jit.load(str(torchscript)).state_dict()
    np.savez(d / "mlp.npz", w1=sd["0.weight"].numpy(), b1=sd["0.bias"].numpy(), w2=sd["2.weight"].numpy(),
             b2=sd["2.bias"].numpy())
    (d / "mlserver_mlp.py").write_text(RUNTIME)
    (d / "model-settings.json").write_text(json.dumps({
        "name": "mlp", "implementation": "mlserver_mlp.MLP", "parameters": {"uri": str(d / "mlp.npz")}}))
    return d


class MLServer:
    def __init__(self, folder: Path, work: Path):
        from .systems import free_port

        self.folder, self.work = folder, work
        self.ports = {k: free_port() for k in ("http", "grpc", "metrics")}
        self.grpc = f"127.0.0.1:{self.ports['grpc']}"
        self.proc: subprocess.Popen | None = None

    def start(self, exe: Path, timeout: float = 180) -> "MLServer":
        from . import grpc_c1

        (self.folder / "settings.json").write_text(json.dumps({
            "host": "127.0.0.1", "http_port": self.ports["http"], "grpc_port": self.ports["grpc"],
            "metrics_port": self.ports["metrics"], "debug": False}))
        self.work.mkdir(parents=True, exist_ok=True)
        log = open(self.work / "mlserver.log", "wb")
        env = dict(os.environ, PATH=f"{VENV / 'bin'}:{os.environ.get('PATH', '')}")
        env.pop("PYTHONPATH", None)
        self.proc = subprocess.Popen([str(VENV / "bin" / "mlserver"), "start", str(self.folder)], cwd=self.folder,
                                     env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlserver exited {self.proc.returncode}; log {self.work / 'mlserver.log'}")
            try:
                grpc_c1.run(exe, self.grpc, "infer", "mlp", requests=1, warmup=1, timeout=20)
                return self
            except Exception:
                time.sleep(1)
        raise RuntimeError(f"mlserver not answering after {timeout} s; log {self.work / 'mlserver.log'}")

    def stop(self) -> None:
        from .procs import stop_group

        stop_group(self.proc, 30)


def measure(exe: Path, target: str, pgid: int, c: int, seconds: float) -> dict:
    from . import grpc_c1
    from .grpc_ab import server_cpu_s

    load1 = os.getloadavg()[0]
    if c == 1:
        grpc_c1.run(exe, target, "infer", "mlp", requests=300, warmup=1)
        cpu0 = server_cpu_s(pgid)
        out = grpc_c1.run(exe, target, "infer", "mlp", requests=int(seconds * 500), warmup=1)
    else:
        grpc_c1.run(exe, target, "infer", "mlp", warmup=10, concurrency=c, channels=2, duration=1.0)
        cpu0 = server_cpu_s(pgid)
        out = grpc_c1.run(exe, target, "infer", "mlp", warmup=1, concurrency=c, channels=2, duration=seconds)
    cpu = server_cpu_s(pgid) - cpu0
    return {"rps": out["throughput_rps"], "p50": out["latency_ms"].get("p50"), "errors": out["errors"],
            "server_cpu_us": round(cpu * 1e6 / max(1, out["requests"]), 1), "load1": round(load1, 2)}


def main(argv: list[str] | None = None) -> int:
    from . import grpc_c1
    from .ab import OspreyAt
    from .models import build_models

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--concurrency", default="1,8,32,128")
    ap.add_argument("--osprey-tree", default=str(HERE.parent))
    ap.add_argument("--work", default=str(HERE / ".work" / "ab"))
    ap.add_argument("--out", default=str(HERE / "results" / "grpc-mlserver.json"))
    args = ap.parse_args(argv)
    if not (VENV / "bin" / "mlserver").exists():
        print(f"MLServer is not installed in {VENV} (python -m venv {VENV} && {VENV}/bin/pip install "
              "mlserver==1.7.1 'uvloop<0.22')", file=sys.stderr)
        return 1
    work = Path(args.work)
    exe = grpc_c1.build()
    m = build_models(work / "models", with_cnn=False, with_digits=False)["mlp"]
    folder = model_dir(work, work / "models" / "build" / "mlp.pt")
    levels = [int(c) for c in args.concurrency.split(",")]
    res: dict[str, dict[str, list]] = {s: {str(c): [] for c in levels} for s in ("osprey", "mlserver")}
    for r in range(args.rounds):
        for side in (("osprey", "mlserver") if r % 2 == 0 else ("mlserver", "osprey")):
            if side == "osprey":
                srv = OspreyAt(Path(args.osprey_tree), work / f"vs-mls-osprey-{r}", [m], tag="osprey").start()
            else:
                srv = MLServer(folder, work / f"vs-mls-mlserver-{r}").start(exe)
            try:
                for c in levels:
                    x = measure(exe, srv.grpc, srv.proc.pid, c, args.seconds)
                    res[side][str(c)].append(x)
                    print(f"round {r + 1} {side:8s} c={c:<4d} {x['rps']:8.1f} req/s p50 {x['p50'] or 0:8.3f} ms "
                          f"server CPU {x['server_cpu_us']} us/call errors {x['errors']} load {x['load1']}",
                          flush=True)
            finally:
                srv.stop()
    print(f"\n{args.rounds} interleaved rounds; medians: req/s / p50 ms / server CPU µs per call")
    print("| c | Osprey gRPC | MLServer gRPC | Osprey/MLServer req/s |")
    print("|---|---|---|---|")
    for c in levels:
        cells, rps = [], []
        for side in ("osprey", "mlserver"):
            xs = res[side][str(c)]
            rps.append(statistics.median(x["rps"] for x in xs))
            cells.append(f"{rps[-1]:,.0f} / {statistics.median(x['p50'] or 0 for x in xs):.3f} / "
                         f"{statistics.median(x['server_cpu_us'] for x in xs):.0f}")
        print(f"| {c} | {cells[0]} | {cells[1]} | {rps[0] / rps[1]:.2f}x |")
    loads = [x["load1"] for s in res.values() for xs in s.values() for x in xs]
    print(f"load average (1 min): {min(loads):.2f}-{max(loads):.2f}")
    Path(args.out).write_text(json.dumps({"results": res, "seconds": args.seconds}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
