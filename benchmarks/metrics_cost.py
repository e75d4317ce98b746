"""What the request metrics cost, by CPU accounting rather than by throughput (issue 5).

Throughput A/B runs of two servers on a shared 2-core machine swing by +-15% between rounds,
far more than the effect, so this measures the two sides of the ratio separately:

1. the CPU time the metrics take per request: ``ServingMetrics.observe`` (once per request)
   and ``observe_batch`` (once per batch of ``--batch``) on real request objects, timed over
   many calls in this process;
2. the CPU time the server takes per request: a real ``osprey serve`` (metrics on) driven by
   ``hey -c 32``, its ``process_cpu_seconds_total`` delta over the requests it answered.

The cost is (1) / (2): the share of the server's CPU that metrics take, which is the share
of throughput they cost when the server is CPU bound.

    .venv/bin/python -m benchmarks.metrics_cost [--seconds 8]
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from monitoring.metrics import ServingMetrics  # noqa: E402
from server.core.types import InferenceRequest, InferenceResponse, Ticket  # noqa: E402
from tests.conftest import OspreyProcess  # noqa: E402
from tests.models import mlp_archive  # noqa: E402


def metrics_cpu_per_request(batch: int, n: int = 200_000) -> float:
    m = ServingMetrics()
    mv = SimpleNamespace(name="mlp", version="1.0", config=SimpleNamespace(batch_size=batch), instances=[],
                         handler="h.py")
    reqs = []
    for i in range(batch):
        r = Ticket(InferenceRequest(model="mlp", version=None, request_id=str(i)))
        t = r.timings
        t.received, t.dispatched, t.started, t.finished = 1.0, 1.001, 1.001, 1.002
        t.stages = {"preprocess": 0.0001, "inference": 0.0005, "postprocess": 0.0001}
        reqs.append(r)
    out = InferenceResponse(body=b"[]")
    t0 = time.process_time()
    for i in range(n // batch):
        for r in reqs:
            m.observe(mv, r, out)
        m.observe_batch(mv, reqs)
    return (time.process_time() - t0) / ((n // batch) * batch)


def server_cpu_per_request(seconds: float) -> tuple[float, float]:
    root = Path(tempfile.mkdtemp(prefix="osprey-metrics-cost-"))
    store = root / "store"
    store.mkdir()
    mlp_archive(store, config={"batchSize": 32, "maxBatchDelay": 5})
    (root / "w").mkdir()
    proc = OspreyProcess(root / "w", store, ["mlp=mlp.mar"]).wait_ready()
    body = root / "body.json"
    body.write_text(json.dumps([float(i) for i in range(16)]))

    def scrape() -> tuple[float, float]:
        text = httpx.get(f"{proc.metrics}/metrics").text
        cpu = float(re.search(r"^process_cpu_seconds_total ([0-9.e+]+)$", text, re.M).group(1))
        reqs = sum(float(v) for v in re.findall(r'^osprey_requests_total\{[^}]*model="mlp"[^}]*\} ([0-9.e+]+)$', text, re.M))
        return cpu, reqs

    try:
        url = f"{proc.inference}/predictions/mlp"
        subprocess.run(["hey", "-z", "2s", "-c", "32", "-m", "POST", "-T", "application/json", "-D", str(body), url],
                       capture_output=True, check=True)  # warm-up
        cpu0, n0 = scrape()
        out = subprocess.run(["hey", "-z", f"{seconds}s", "-c", "32", "-m", "POST", "-T", "application/json", "-D",
                              str(body), url], capture_output=True, text=True, check=True).stdout
        cpu1, n1 = scrape()
    finally:
        proc.stop()
    rps = float(re.search(r"Requests/sec:\s+([0-9.]+)", out).group(1))
    return (cpu1 - cpu0) / (n1 - n0), rps


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=8)
    ap.add_argument("--batch", type=int, default=32)
    args = ap.parse_args()
    per_metrics = metrics_cpu_per_request(args.batch)
    per_server, rps = server_cpu_per_request(args.seconds)
    share = per_metrics / per_server
    print(f"metrics: {per_metrics * 1e6:.2f} us CPU per request (observe + observe_batch at batch {args.batch}); "
          f"server: {per_server * 1e6:.1f} us CPU per request at {rps:.0f} req/s (tiny MLP, hey -c 32); "
          f"metrics share of the server's CPU: {share * 100:.2f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
