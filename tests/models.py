"""Small models and archives the tests build for themselves (no downloads)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import yaml

from server.core.archive import write_archive

__all__ = ["make_mlp", "mlp_archive", "handler_archive", "MLP_HANDLER", "RECORDING_HANDLER", "METRICS_HANDLER"]

# A module-level handle that loads the TorchScript MLP on initialization (TorchServe calls
# handle(None, context) once) and answers one output row per request.
MLP_HANDLER = '''
import os
import torch

model = None

def handle(data, context):
    global model
    if data is None:
        model = torch.jit.load(os.path.join(context.system_properties["model_dir"], "mlp.pt"))
        return None
    x = torch.tensor([row["body"] for row in data], dtype=torch.float32)
    with torch.inference_mode():
        return model(x).tolist()
'''

# Records every batch size it sees in batches.log and echoes each request's "id"; honours "sleep",
# "fail", "status" and "gate" (tests/gates.py).
RECORDING_HANDLER = '''
import json, os, time

class Recorder:
    def initialize(self, context):
        self.log = os.path.join(context.system_properties["model_dir"], "batches.log")

    def handle(self, data, context):
        with open(self.log, "a") as fh:
            fh.write(json.dumps(len(data)) + "\\n")
        out = []
        for i, row in enumerate(data):
            body = row.get("body")
            if isinstance(body, (bytes, bytearray)):  # TorchServe's gRPC: bytes, no content type
                try:
                    body = json.loads(body)
                except ValueError:
                    pass
            if isinstance(body, dict) and body.get("fail"):
                raise ValueError("asked to fail")
            if isinstance(body, dict) and body.get("gate"):
                from tests.gates import hold
                hold(body["gate"])
            if isinstance(body, dict) and body.get("sleep"):
                time.sleep(body["sleep"])
            if isinstance(body, dict) and body.get("status"):
                context.set_response_status(body["status"], "chosen by the handler", i)
            out.append({"id": body.get("id") if isinstance(body, dict) else body,
                        "request_id": context.get_request_id(i), "batch": len(data)})
        return out
'''


# Writes to stdout and to a logger, and reports custom metrics through TorchServe's
# context.metrics API (declared in tests/fixtures/torchserve_metrics/custom.yaml, except
# "Undeclared"); a body {"fail": true} makes it raise. The same archive is served by real
# TorchServe in tests/fixtures/torchserve_metrics/record.py.
METRICS_HANDLER = '''
import logging
from ts.metrics.dimension import Dimension
from ts.metrics.metric_type_enum import MetricTypes

log = logging.getLogger("tsm_handler")

def handle(data, context):
    if data is None:
        return None
    print("tsm handler got a batch of", len(data), flush=True)
    log.info("tsm handler logged a batch of %d", len(data))
    m = context.metrics
    # dimensions in the order custom.yaml declares them: TorchServe labels values by position
    dims = [Dimension("ModelName", context.model_name), Dimension("Level", "Model"), Dimension("Kind", "demo")]
    m.add_counter("InferenceCount", len(data), None, dims)
    m.add_time("PreprocessTime", 1.5, None, "ms")
    m.add_size("PayloadSize", 0.25, None, "MB")
    m.add_percent("Confidence", 87.5, None, [], MetricTypes.HISTOGRAM)
    m.add_metric("Undeclared", 3, "count", None, [], MetricTypes.GAUGE)
    for row in data:
        body = row.get("body")
        if isinstance(body, dict) and body.get("fail"):
            raise ValueError("asked to fail")
    return [{"ok": True} for _ in data]
'''


def make_mlp(path: Path, seed: int = 0) -> Path:
    import torch

    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4))
    torch.jit.script(model).save(str(path))
    return path


def _config(work: Path, config: dict | None) -> str | None:
    if not config:
        return None
    path = work / "model-config.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def mlp_archive(store: Path, name: str = "mlp", *, config: dict | None = None, version: str = "1.0",
                fmt: str = "default") -> Path:
    work = store.parent / f"build-{name}-{version}"
    work.mkdir(parents=True, exist_ok=True)
    make_mlp(work / "mlp.pt")
    (work / "mlp_handler.py").write_text(MLP_HANDLER)
    return write_archive(model_name=name, version=version, handler=str(work / "mlp_handler.py"),
                         serialized_file=str(work / "mlp.pt"), config_file=_config(work, config),
                         export_path=str(store), archive_format=fmt, force=True)


def handler_archive(store: Path, name: str, source: str, *, config: dict | None = None,
                    version: str = "1.0", extra: dict[str, bytes] | None = None) -> Path:
    work = store.parent / f"build-{name}-{version}"
    work.mkdir(parents=True, exist_ok=True)
    (work / f"{name}_handler.py").write_text(textwrap.dedent(source))
    extras = []
    for fname, data in (extra or {}).items():
        (work / fname).write_bytes(data)
        extras.append(str(work / fname))
    return write_archive(model_name=name, version=version, handler=str(work / f"{name}_handler.py"),
                         config_file=_config(work, config), extra_files=extras,
                         export_path=str(store), force=True)
