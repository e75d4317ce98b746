"""Archives for the Open Inference Protocol and gRPC tests (built locally, no downloads)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import yaml

from server.core.archive import write_archive

from .models import make_mlp

__all__ = ["tensor_mlp_archive", "ops_archive", "make_ops", "echo_archive", "ECHO_HANDLER",
           "stream_archive", "ids_archive", "MLP_CONFIG", "OPS_CONFIG"]

MLP_CONFIG = {
    "batchSize": 8, "maxBatchDelay": 5,
    "inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [-1, 16]}],
    "outputs": [{"name": "OUTPUT0", "datatype": "FP32", "shape": [-1, 4]}],
}

OPS_CONFIG = {
    "batchSize": 4, "maxBatchDelay": 5,
    "inputs": [{"name": "A", "datatype": "FP32", "shape": [-1, 3]},
               {"name": "B", "datatype": "INT64", "shape": [-1, 3]},
               {"name": "C", "datatype": "FP16", "shape": [-1, 3]}],
    "outputs": [{"name": "A2", "datatype": "FP32", "shape": [-1, 3]},
                {"name": "B2", "datatype": "INT64", "shape": [-1, 3]},
                {"name": "C2", "datatype": "FP16", "shape": [-1, 3]}],
}

# A TorchServe-style handler that only knows bytes: upper-cases each request's body.
ECHO_HANDLER = '''
def handle(data, context):
    if data is None:
        return None
    out = []
    for row in data:
        body = row.get("body")
        if isinstance(body, str):
            body = body.encode()
        out.append(bytes(body).upper())
    return out
'''

# Sends three intermediate responses through TorchServe's own helper, then a final one.
STREAM_HANDLER = '''
from ts.handler_utils.utils import send_intermediate_predict_response

def handle(data, context):
    if data is None:
        return None
    for i in range(3):
        send_intermediate_predict_response([f"part{i}:{bytes(row['body']).decode()}" for row in data],
                                           context.request_ids, "Intermediate Prediction success", 200, context)
    return [f"done:{bytes(row['body']).decode()}" for row in data]
'''

# Appends each batch's request ids to ids.log (one JSON list per line); sleeps on request.
IDS_HANDLER = '''
import json, os, time

class Ids:
    def initialize(self, context):
        self.log = os.path.join(context.system_properties["model_dir"], "ids.log")

    def handle(self, data, context):
        bodies = []
        for row in data:
            body = row.get("body")
            if isinstance(body, (bytes, bytearray)):
                body = json.loads(bytes(body))
            bodies.append(body)
        with open(self.log, "a") as fh:
            fh.write(json.dumps([b.get("id") for b in bodies]) + "\\n")
        for b in bodies:
            if b.get("gate"):
                from tests.gates import hold
                hold(b["gate"])
            time.sleep(b.get("sleep", 0))
        return [{"id": b.get("id"), "batch": len(data)} for b in bodies]
'''


def _yaml(work: Path, config: dict | None) -> str | None:
    if not config:
        return None
    path = work / "model-config.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def _work(store: Path, name: str) -> Path:
    work = store.parent / f"build-{name}"
    work.mkdir(parents=True, exist_ok=True)
    return work


def tensor_mlp_archive(store: Path, name: str = "tmlp", config: dict | None = None, version: str = "1.0") -> Path:
    """The tiny MLP behind the built-in ``tensor`` handler, tensors declared in the config."""
    work = _work(store, name)
    make_mlp(work / "mlp.pt")
    return write_archive(model_name=name, version=version, handler="tensor", serialized_file=str(work / "mlp.pt"),
                         config_file=_yaml(work, config or MLP_CONFIG), export_path=str(store), force=True)


def make_ops(path: Path) -> Path:
    """A TorchScript model of three inputs (FP32, INT64, FP16) and three outputs."""
    import torch

    class Ops(torch.nn.Module):
        def forward(self, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor):
            return a * 2.0 + 1.0, b * 3 - 1, (c.float() * 0.5).to(torch.float16)

    torch.jit.script(Ops()).save(str(path))
    return path


def ops_archive(store: Path, name: str = "ops") -> Path:
    work = _work(store, name)
    make_ops(work / "ops.pt")
    return write_archive(model_name=name, handler="tensor", serialized_file=str(work / "ops.pt"),
                         config_file=_yaml(work, OPS_CONFIG), export_path=str(store), force=True)


def _handler(store: Path, name: str, source: str, config: dict | None) -> Path:
    work = _work(store, name)
    (work / f"{name}_handler.py").write_text(textwrap.dedent(source))
    return write_archive(model_name=name, handler=str(work / f"{name}_handler.py"),
                         config_file=_yaml(work, config), export_path=str(store), force=True)


def echo_archive(store: Path, name: str = "echo", config: dict | None = None) -> Path:
    return _handler(store, name, ECHO_HANDLER, config)


def stream_archive(store: Path, name: str = "streamer") -> Path:
    return _handler(store, name, STREAM_HANDLER, None)


def ids_archive(store: Path, name: str = "ids", config: dict | None = None) -> Path:
    return _handler(store, name, IDS_HANDLER, config)
