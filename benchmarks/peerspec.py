"""What the Python peers are given: each model's files from its archive, and request bodies.

A peer does not read ``.mar`` files, so :func:`archive_spec` unpacks the same archive Osprey and
TorchServe load (its TorchScript file and labels) and reads its ``model-config.yaml``: the
batching (``batchSize``, ``maxBatchDelay``) every peer is configured with, and for digits_cnn
the ``handler:`` preprocessing settings. The request bodies a peer's protocol needs instead of
Osprey's (the Open Inference Protocol's JSON for MLServer, a multipart form for LitServe's and
BentoML's file inputs) are built here from the very bytes Osprey is sent.
"""

from __future__ import annotations

import base64
import json
import zipfile
from pathlib import Path

import numpy as np
import yaml

from .models import BenchModel

__all__ = ["archive_spec", "oip_json", "multipart", "OIP_INPUT"]

OIP_INPUT = "INPUT0"


def archive_spec(m: BenchModel, dest: Path) -> dict:
    """Unpack ``m.archive``'s model file (and labels) into ``dest/NAME``; the model's spec as JSON-able dict."""
    out = dest / m.name
    out.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(m.archive) as zf:
        manifest = json.loads(zf.read("MAR-INF/MANIFEST.json"))["model"]
        names = set(zf.namelist())
        cfg_name = manifest.get("configFile") or "model-config.yaml"
        cfg = yaml.safe_load(zf.read(cfg_name)) if cfg_name in names else {}
        weights = out / Path(manifest["serializedFile"]).name
        weights.write_bytes(zf.read(manifest["serializedFile"]))
        labels = json.loads(zf.read("index_to_name.json")) if "index_to_name.json" in names else {}
    cfg = cfg or {}
    return {"kind": m.kind, "weights": str(weights), "shape": list(m.input_shape),
            "batch_size": int(cfg.get("batchSize", 1)), "delay_ms": float(cfg.get("maxBatchDelay", 100)),
            "labels": labels, "preprocess": cfg.get("handler") or {}}


def oip_json(m: BenchModel, body: bytes) -> dict:
    """The Open Inference Protocol REST request carrying the same input as Osprey's body: mlp's 16
    floats as an FP32 1x16 tensor, the CNN's raw float32 body as FP32 1x3xSxS, the PNG as one
    BYTES element (base64, with the ``content_type: base64`` parameter MLServer decodes)."""
    if m.kind == "mlp":
        row = json.loads(body)
        return {"inputs": [{"name": OIP_INPUT, "datatype": "FP32", "shape": [1, len(row)], "data": row}]}
    if m.kind == "cnn":
        arr = np.frombuffer(body, dtype=np.float32)
        return {"inputs": [{"name": OIP_INPUT, "datatype": "FP32", "shape": [1, *m.input_shape],
                            "data": arr.tolist()}]}
    return {"inputs": [{"name": OIP_INPUT, "datatype": "BYTES", "shape": [1],
                        "parameters": {"content_type": "base64"}, "data": [base64.b64encode(body).decode()]}]}


def multipart(field: str, filename: str, payload: bytes, content_type: str,
              boundary: str = "osprey-bench-boundary") -> tuple[bytes, str]:
    """A multipart/form-data body with one file field; (body, the Content-Type header's value)."""
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"{filename}\"\r\n"
            f"Content-Type: {content_type}\r\n\r\n").encode()
    return head + payload + f"\r\n--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"
