"""Ray Serve 2.60 serving the benchmark's models (run in the peer's own venv).

One local Ray node (no dashboard), Serve's HTTP proxy on the given loopback port, one
application per model at ``/predictions/NAME`` taking the same request bodies as Osprey (the
raw body through Starlette's ``Request``). Models batched in their archive (batchSize > 1) go
through ``@serve.batch(max_batch_size=batchSize, batch_wait_timeout_s=maxBatchDelay)``; the
others (``mlp_nb``) call the model per request. One replica per model, and
``max_ongoing_requests`` raised from Ray's default of 5 to the benchmark's queue size (1000):
at 5 a replica could never form a batch larger than 5.

    python rayserve_peer.py --port 8000 --spec spec.json --tmp /tmp/rayb
"""

from __future__ import annotations

import argparse
import os
import signal
import threading

import ray
from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse

from common import Model, load_spec

MAX_ONGOING = 1000
# no access log (Ray's default writes a line per request): Osprey and the others run without one
LOGGING = {"enable_access_log": False, "log_level": "WARNING"}


def application(name: str, spec: dict):
    opts = dict(name=name, num_replicas=1, max_ongoing_requests=MAX_ONGOING, ray_actor_options={"num_cpus": 0},
                logging_config=LOGGING)
    size, wait = int(spec.get("batch_size") or 1), float(spec.get("delay_ms") or 0) / 1000

    if size > 1:
        @serve.deployment(**opts)
        class Batched:
            def __init__(self):
                self.m = Model(name, spec)

            @serve.batch(max_batch_size=size, batch_wait_timeout_s=wait)
            async def run(self, rows: list) -> list:
                return self.m.run(rows)

            async def __call__(self, request: Request):
                return JSONResponse(await self.run(self.m.parse(await request.body())))

        return Batched.bind()

    @serve.deployment(**opts)
    class Single:
        def __init__(self):
            self.m = Model(name, spec)

        async def __call__(self, request: Request):
            return JSONResponse(self.m.run([self.m.parse(await request.body())])[0])

    return Single.bind()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--spec", required=True, help="JSON (or a file of it): name -> model spec")
    p.add_argument("--tmp", required=True, help="Ray's temp dir (short: it holds unix sockets)")
    args = p.parse_args()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, _temp_dir=args.tmp, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": args.port}, logging_config=LOGGING)
    for name, spec in load_spec(args.spec).items():
        serve.run(application(name, spec), name=name, route_prefix=f"/predictions/{name}", blocking=False)
    print("ready", flush=True)
    stop.wait()
    serve.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    main()
