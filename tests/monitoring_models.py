"""Small monitored models and the helpers the monitoring end-to-end tests share.

``classifier_archive`` packages a TorchScript MLP (16 inputs, softmax over 3 classes) behind
the built-in ``tensor`` handler, so one model answers REST ``/predictions`` (a JSON list),
REST v2 and gRPC OIP tensors and TorchServe gRPC (a JSON body). Its archive holds a
``training.json`` with held-out accuracy 0.95: the baseline live quality is judged against.
``wait_monitoring`` polls ``GET /monitoring`` until a condition holds (state, never sleeps).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import numpy as np
import yaml

from server.core.archive import write_archive

__all__ = ["FEATURES", "CLASSES", "MONITORING", "classifier_archive", "regressor_archive", "rows",
           "wait_monitoring", "metric_lines"]

FEATURES = 16
CLASSES = 3
# small windows keep the tests fast: a baseline of 100 requests, windows of 50, two projected
# components of the penultimate activations, quality judged over windows of 40 labels
MONITORING = {"window": 50, "baseline_requests": 100, "components": 2, "min_labels": 40, "quality_window": 40}


def _mlp(path: Path, outputs: int, softmax: bool, seed: int = 0) -> Path:
    import torch

    torch.manual_seed(seed)
    layers = [torch.nn.Linear(FEATURES, 32), torch.nn.ReLU(), torch.nn.Linear(32, outputs)]
    if softmax:
        layers.append(torch.nn.Softmax(dim=1))
    torch.jit.script(torch.nn.Sequential(*layers)).save(str(path))
    return path


# TorchServe-style: gRPC and raw bodies arrive as bytes, the handler decodes them (JSON rows).
JSON_HANDLER = '''
import json
import os

import torch
from handlers.base import BaseHandler


class JsonRows(BaseHandler):
    def initialize(self, context):
        self.model = torch.jit.load(os.path.join(context.system_properties["model_dir"], "mlp.pt"))
        self.initialized = True

    def preprocess(self, data):
        bodies = [r["body"] for r in data]
        return torch.tensor([json.loads(bytes(b)) if isinstance(b, (bytes, bytearray)) else b for b in bodies],
                            dtype=torch.float32)

    def inference(self, x):
        with torch.inference_mode():
            return self.model(x)

    def postprocess(self, y):
        return y.tolist()
'''


def _archive(store: Path, name: str, outputs: int, softmax: bool, monitoring: dict | None,
             extra_config: dict | None, training: dict | None, handler: str = "tensor", version: str = "1.0") -> Path:
    work = store.parent / f"build-{name}"
    work.mkdir(parents=True, exist_ok=True)
    _mlp(work / "mlp.pt", outputs, softmax)
    config = {"batchSize": 8, "maxBatchDelay": 5, "deviceType": "cpu",
              "inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [-1, FEATURES]}],
              "outputs": [{"name": "OUTPUT0", "datatype": "FP32", "shape": [-1, outputs]}]}
    if monitoring is not None:
        config["monitoring"] = monitoring
    config.update(extra_config or {})
    (work / "model-config.yaml").write_text(yaml.safe_dump(config))
    extras = []
    if training is not None:
        (work / "training.json").write_text(json.dumps(training))
        extras.append(str(work / "training.json"))
    if handler != "tensor":
        (work / f"{name}_handler.py").write_text(handler)
        handler = str(work / f"{name}_handler.py")
    return write_archive(model_name=name, version=version, handler=handler, serialized_file=str(work / "mlp.pt"),
                         config_file=str(work / "model-config.yaml"), extra_files=extras,
                         export_path=str(store), force=True)


def classifier_archive(store: Path, name: str, *, monitoring: dict | None = None, json_handler: bool = False,
                       version: str = "1.0", **extra_config) -> Path:
    """The classifier behind the ``tensor`` handler, or (``json_handler``) behind a custom
    TorchServe-style handler that decodes JSON bytes (what TorchServe gRPC sends)."""
    return _archive(store, name, CLASSES, True, MONITORING if monitoring is None else monitoring, extra_config,
                    {"heldout_metrics": {"accuracy": 0.95}}, JSON_HANDLER if json_handler else "tensor", version)


def regressor_archive(store: Path, name: str, **extra_config) -> Path:
    return _archive(store, name, 1, False, MONITORING, extra_config, None)


def rows(n: int, seed: int, shift: float = 0.0) -> np.ndarray:
    """``n`` request rows: standard normal (in distribution), or moved by ``shift`` sd."""
    return (np.random.default_rng(seed).normal(size=(n, FEATURES)) + shift).astype(np.float32)


def wait_monitoring(base: str, model: str, predicate, timeout: float = 30.0, headers: dict | None = None,
                    version: str = "", what: str = "") -> dict:
    """GET /monitoring/{model}[/{version}] until ``predicate(json)`` holds; the JSON."""
    url = f"{base}/monitoring/{model}" + (f"/{version}" if version else "")
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        r = httpx.get(url, headers=headers, timeout=10)
        if r.status_code == 200:
            last = r.json()
            if predicate(last):
                return last
        else:
            last = (r.status_code, r.text)
        time.sleep(0.05)
    raise AssertionError(f"{url} never satisfied the condition {what} within {timeout} s; last answer: "
                         f"{json.dumps(last)[:3000]}")


def metric_lines(metrics_base: str, name: str, model: str) -> dict[str, float]:
    """The samples of metric ``name`` for ``model`` on /metrics: {label set: value}."""
    text = httpx.get(f"{metrics_base}/metrics", timeout=10).text
    out = {}
    for line in text.splitlines():
        if line.startswith(name + "{") and f'model="{model}"' in line:
            labels, value = line.rsplit(" ", 1)
            out[labels[len(name):]] = float(value)
    return out
