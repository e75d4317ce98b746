"""LitServe 0.2 serving the benchmark's models (run in the peer's own venv).

One ``LitAPI`` per model at ``/predictions/NAME``, all in one ``LitServer`` with LitServe's
defaults otherwise (one inference worker process per API, as many API server processes as
inference workers). Batching: ``max_batch_size`` = batchSize and ``batch_timeout`` =
maxBatchDelay; batchSize 1 (mlp_nb) is LitServe's unbatched loop. LitServe reads a request
body as JSON or as a form, nothing else: mlp gets the same JSON body as Osprey, the CNN's raw
float32 body and the digit PNG arrive as the one file of a multipart form (field ``file``).

    python litserve_peer.py --port 8000 --spec spec.json
"""

from __future__ import annotations

import argparse

import litserve as ls

from common import Model, load_spec


class PeerAPI(ls.LitAPI):
    def __init__(self, name: str, spec: dict):
        size = int(spec.get("batch_size") or 1)
        super().__init__(max_batch_size=size, batch_timeout=float(spec.get("delay_ms") or 0) / 1000 if size > 1 else 0.0,
                         api_path=f"/predictions/{name}")
        self.name, self.model_spec = name, spec  # not self.spec: LitAPI's own (its API spec)

    def setup(self, device):
        self.m = Model(self.name, self.model_spec)

    def decode_request(self, request):
        if self.m.kind == "mlp":
            return request            # the JSON body, parsed by LitServe
        return request["file"].file.read()

    def predict(self, x):
        return self.m.run([x])[0]

    def encode_response(self, output):
        return output


class BatchedAPI(PeerAPI):
    """max_batch_size > 1: LitServe collects up to that many decoded requests (or waits batch_timeout)."""

    def batch(self, inputs):
        return list(inputs)

    def predict(self, x):
        return self.m.run(x)

    def unbatch(self, output):
        return output


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--spec", required=True, help="JSON (or a file of it): name -> model spec")
    args = p.parse_args()
    apis = [(BatchedAPI if int(spec.get("batch_size") or 1) > 1 else PeerAPI)(name, spec)
            for name, spec in load_spec(args.spec).items()]
    server = ls.LitServer(apis, accelerator="cpu", workers_per_device=1, timeout=120)
    server.run(host="127.0.0.1", port=args.port, log_level="warning", generate_client_file=False)


if __name__ == "__main__":
    main()
