"""The hand-written alternative: a plain FastAPI + uvicorn app calling the model per request.

What many teams write instead of a model server: one ``async def`` endpoint that parses the
body and runs the forward pass right on the event loop, one request at a time, no batching.
Same TorchScript files and the same request bodies as the servers under test.

    python -m benchmarks.fastapi_app --port 8000 --models '{"mlp": {"weights": "mlp.pt", "kind": "mlp"}}'
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch
import uvicorn
from fastapi import FastAPI, HTTPException, Request

__all__ = ["make_app"]


def make_app(spec: dict) -> FastAPI:
    app = FastAPI()
    models = {name: (torch.jit.load(s["weights"]).eval(), s["kind"], tuple(s.get("shape") or ())) for name, s in spec.items()}

    @app.post("/predictions/{name}")
    async def predict(name: str, request: Request):
        if name not in models:
            raise HTTPException(404, f"model {name} not found")
        model, kind, shape = models[name]
        if kind == "mlp":
            x = torch.tensor([await request.json()], dtype=torch.float32)
            with torch.inference_mode():
                return model(x)[0].tolist()
        x = torch.from_numpy(np.frombuffer(await request.body(), dtype=np.float32)).reshape(1, *shape)
        with torch.inference_mode():
            return {"class": int(model(x).argmax(1)[0])}

    return app


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--models", required=True, help="JSON: name -> {weights, kind, shape}")
    args = p.parse_args()
    uvicorn.run(make_app(json.loads(args.models)), host="127.0.0.1", port=args.port, log_level="warning",
                access_log=False)


if __name__ == "__main__":
    main()
