"""BentoML 1.4 serving the benchmark's models (run in the peer's own venv by ``bentoml serve``).

One service (one worker process, BentoML's default of one thread for sync APIs) with one API
per model at ``/predictions/NAME``, built from the spec named by ``BENCH_PEER_SPEC``. Models
batched in their archive use BentoML's adaptive batching (``batchable=True``,
``max_batch_size`` = batchSize); ``mlp_nb`` is a plain API. BentoML has no batch-delay
setting: its dispatcher chooses how long to wait from the latencies it observes, and
``max_latency_ms`` is a deadline past which requests are refused (left at BentoML's 60 s).
Inputs: mlp and the CNN a JSON tensor with the batch dimension first (``[[16 floats]]``,
``[[[[...]]]]``: a batchable API batches along it); digits the PNG as the file of a multipart
form (field ``images``), which BentoML opens with Pillow.

    BENCH_PEER_SPEC=spec.json bentoml serve bentoml_peer:BenchPeer --port 8000
"""

from __future__ import annotations

import os

import bentoml
import numpy as np
from PIL.Image import Image

from common import Model, load_spec

SPEC = load_spec(os.environ["BENCH_PEER_SPEC"])


def _api(name: str, spec: dict):
    size = int(spec.get("batch_size") or 1)
    opts = dict(route=f"/predictions/{name}", name=name)
    if size > 1:
        opts.update(batchable=True, max_batch_size=size, max_latency_ms=60000)

    if spec["kind"] == "digits":
        def endpoint(self, images: list[Image]) -> list[dict]:
            return self.models[name].run(images)
    elif spec["kind"] == "mlp":
        def endpoint(self, x: np.ndarray, /) -> np.ndarray:
            return np.asarray(self.models[name].run(x.tolist()), dtype=np.float32)
    else:
        def endpoint(self, x: np.ndarray, /) -> list[dict]:
            return self.models[name].run([row.astype(np.float32).tobytes() for row in x])
    endpoint.__name__ = name
    return bentoml.api(**opts)(endpoint)


def _init(self) -> None:
    self.models = {name: Model(name, spec) for name, spec in SPEC.items()}


# no access log: Osprey (and every other server here) runs without one
BenchPeer = bentoml.service(workers=1, traffic={"timeout": 120}, logging={"access": {"enabled": False}})(
    type("BenchPeer", (), {"__init__": _init, **{name: _api(name, spec) for name, spec in SPEC.items()}}))
