"""The benchmark's models, their handlers, archives and request bodies.

Every server under test loads the *same* archive file (same TorchScript weights, same
handler, same model-config.yaml). Models:

- ``mlp``: TorchScript MLP 16-64-4 behind a module-level ``handle`` (overhead-bound);
  JSON body ``[16 floats]``, JSON answer ``[4 floats]``. Archived twice: ``mlp`` with
  batchSize 32 / maxBatchDelay 5 ms, ``mlp_nb`` with batchSize 1 (batching off).
- ``cnn``: a ResNet-18-sized CNN (BasicBlock [2, 2, 2, 2], 11.7 M parameters, random
  weights) written with plain ``torch.nn``; raw float32 body of shape 3xSxS
  (``application/octet-stream``), JSON answer ``{"class": k}``. batchSize 32, 5 ms.
- ``digits_cnn``: the model ``osprey examples`` trains (when that command exists), fed a
  PNG digit: ``digits_cnn_builtin`` is its archive as built (Osprey's built-in
  ``image_classifier``, Osprey only), ``digits_cnn`` the same files with a Pillow handler
  file that TorchServe runs as well.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

__all__ = ["BenchModel", "build_models", "MLP_HANDLER", "CNN_HANDLER", "make_resnet18", "BATCH_CONFIG"]

ROOT = Path(__file__).resolve().parent.parent

# The model-config.yaml both servers read: one instance, batches of up to 32, 5 ms delay.
BATCH_CONFIG = {"minWorkers": 1, "maxWorkers": 1, "batchSize": 32, "maxBatchDelay": 5, "responseTimeout": 120}
NOBATCH_CONFIG = {"minWorkers": 1, "maxWorkers": 1, "batchSize": 1, "maxBatchDelay": 5, "responseTimeout": 120}

# The tests' MLP handler (TorchServe calls handle(None, context) once to initialize): one copy.
from tests.models import MLP_HANDLER  # noqa: E402

CNN_HANDLER = '''
import os
import numpy as np
import torch

model = None
SIDE = {side}

def handle(data, context):
    global model
    if data is None:
        model = torch.jit.load(os.path.join(context.system_properties["model_dir"], "cnn.pt"))
        return None
    rows = [np.frombuffer(row.get("body") or row.get("data"), dtype=np.float32) for row in data]
    x = torch.from_numpy(np.stack(rows)).reshape(len(rows), 3, SIDE, SIDE)
    with torch.inference_mode():
        classes = model(x).argmax(1).tolist()
    return [{{"class": c}} for c in classes]
'''


@dataclass
class BenchModel:
    """One model as the benchmark drives it."""

    name: str                      # model name on every server
    archive: Path                  # the .mar every server loads
    body: Path                     # request body file
    content_type: str
    kind: str                      # mlp | cnn | digits
    weights: Path | None = None    # TorchScript file for the raw ceiling / FastAPI
    input_shape: tuple[int, ...] = ()  # one sample's tensor shape (ceiling)
    batching: bool = True
    note: str = ""
    extra: dict = field(default_factory=dict)

    def as_json(self) -> dict:
        return {"name": self.name, "archive": str(self.archive), "body": str(self.body),
                "content_type": self.content_type, "kind": self.kind, "batching": self.batching,
                "weights": str(self.weights) if self.weights else None, "input_shape": list(self.input_shape),
                "body_bytes": self.body.stat().st_size, "note": self.note}


# --- a ResNet-18-sized CNN with plain torch.nn ---------------------------------------
def make_resnet18(num_classes: int = 1000):
    import torch
    from torch import nn

    class BasicBlock(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int):
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.relu = nn.ReLU(inplace=True)
            self.down = None
            if stride != 1 or cin != cout:
                self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

        def forward(self, x):
            identity = x if self.down is None else self.down(x)
            out = self.relu(self.bn1(self.conv1(x)))
            out = self.bn2(self.conv2(out))
            return self.relu(out + identity)

    class ResNet18(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64),
                                      nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1))
            blocks, cin = [], 64
            for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
                blocks += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
                cin = cout
            self.blocks = nn.Sequential(*blocks)
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(512, num_classes)

        def forward(self, x):
            return self.fc(torch.flatten(self.pool(self.blocks(self.stem(x))), 1))

    torch.manual_seed(0)
    return ResNet18().eval()


def _write_config(work: Path, config: dict) -> Path:
    path = work / "model-config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _archive(store: Path, work: Path, name: str, handler_src: str, weights: Path, config: dict) -> Path:
    from server.core.archive import write_archive

    work.mkdir(parents=True, exist_ok=True)
    handler = work / f"{name}_handler.py"
    handler.write_text(handler_src)
    return write_archive(model_name=name, version="1.0", handler=str(handler), serialized_file=str(weights),
                         config_file=str(_write_config(work, config)), export_path=str(store), force=True)


def _build_mlp(store: Path, work: Path) -> list[BenchModel]:
    import torch

    weights = work / "mlp.pt"
    if not weights.exists():
        torch.manual_seed(0)
        m = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4)).eval()
        torch.jit.script(m).save(str(weights))
    body = work / "mlp.json"
    body.write_text(json.dumps([round(0.1 * i, 2) for i in range(16)]))
    out = []
    for name, cfg, batching in (("mlp", BATCH_CONFIG, True), ("mlp_nb", NOBATCH_CONFIG, False)):
        mar = _archive(store, work / name, name, MLP_HANDLER, weights, cfg)
        out.append(BenchModel(name, mar, body, "application/json", "mlp", weights, (16,), batching,
                              "TorchScript MLP 16-64-4, JSON in/out" + ("" if batching else ", batchSize 1")))
    return out


def _build_cnn(store: Path, work: Path, side: int) -> BenchModel:
    import numpy as np
    import torch

    weights = work / f"cnn{side}.pt"
    if not weights.exists():
        model = make_resnet18()
        with torch.inference_mode():
            traced = torch.jit.trace(model, torch.zeros(1, 3, side, side))
        traced = torch.jit.freeze(traced) if hasattr(torch.jit, "freeze") else traced
        traced.save(str(weights))
    body = work / f"cnn{side}.f32"
    body.write_bytes(np.random.default_rng(0).standard_normal((3, side, side), dtype=np.float32).tobytes())
    cnn_pt = work / "cnn" / "cnn.pt"
    cnn_pt.parent.mkdir(parents=True, exist_ok=True)
    cnn_pt.write_bytes(weights.read_bytes())
    mar = _archive(store, work / "cnn", "cnn", CNN_HANDLER.format(side=side), cnn_pt, BATCH_CONFIG)
    return BenchModel("cnn", mar, body, "application/octet-stream", "cnn", weights, (3, side, side), True,
                      f"ResNet-18-sized CNN (11.7 M params, random weights), float32 3x{side}x{side} raw body")


# The same preprocessing as Osprey's built-in image_classifier (model-config.yaml ``handler:``
# section), written with Pillow + numpy so that TorchServe runs it too: TorchServe's own
# image_classifier imports torchvision, which cannot be installed beside torch 2.13 here.
DIGITS_HANDLER = '''
import io, json, os
import numpy as np
import torch
from PIL import Image

model = labels = cfg = None

def handle(data, context):
    global model, labels, cfg
    if data is None:
        d = context.system_properties["model_dir"]
        model = torch.jit.load(os.path.join(d, context.manifest["model"]["serializedFile"])).eval()
        with open(os.path.join(d, "index_to_name.json")) as fh:
            labels = json.load(fh)
        cfg = (getattr(context, "model_yaml_config", None) or {}).get("handler", {})
        return None
    h, w = cfg.get("resize", [8, 8])
    resample = getattr(Image.Resampling, str(cfg.get("resample", "box")).upper())
    mean = np.asarray(cfg.get("mean", [0.0]), dtype=np.float32).reshape(-1, 1, 1)
    std = np.asarray(cfg.get("std", [1.0]), dtype=np.float32).reshape(-1, 1, 1)
    xs = []
    for row in data:
        img = Image.open(io.BytesIO(row.get("data") or row.get("body"))).convert(cfg.get("mode", "L")).resize((w, h), resample)
        arr = np.asarray(img, dtype=np.float32)
        arr = (arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)) / float(cfg.get("scale", 255.0))
        xs.append((arr - mean) / std)
    with torch.inference_mode():
        probs = torch.softmax(model(torch.from_numpy(np.stack(xs))), dim=1)
    k = int(cfg.get("topk", 5))
    top_p, top_i = probs.topk(k, dim=1)
    return [{labels.get(str(i), str(i)): p for p, i in zip(ps, ids)} for ps, ids in zip(top_p.tolist(), top_i.tolist())]
'''


def _digit_png(work: Path) -> Path:
    """A PNG of one held-out digit from scikit-learn's bundled data set (an 8x8 image, scaled)."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    img = (digits.images[-1] * (255.0 / 16.0)).astype("uint8")
    path = work / "digit.png"
    Image.fromarray(img, mode="L").resize((28, 28)).save(path)
    (work / "digit.label").write_text(str(int(digits.target[-1])))
    return path


def _build_digits(store: Path, work: Path, log: list[str]) -> list[BenchModel]:
    """``osprey examples --only digits_cnn``, served as built (Osprey's built-in handler) and
    repackaged with a portable handler file (same weights, config and labels) for both servers."""
    import zipfile

    if not (ROOT / "examples" / "build.py").exists():
        log.append("digits_cnn skipped: `osprey examples` is not available yet (examples/build.py missing)")
        return []
    out = work / "examples"
    mar = out / "digits_cnn.mar"
    if not mar.exists():
        cmd = [sys.executable, "-m", "server.cli", "examples", "--out", str(out), "--only", "digits_cnn"]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
        if proc.returncode != 0 or not mar.exists():
            log.append(f"digits_cnn skipped: `{' '.join(cmd[2:])}` failed ({proc.returncode}): "
                       f"{(proc.stderr or proc.stdout)[-400:]}")
            return []
    samples = sorted(out.glob("**/*.png"))
    body = samples[0] if samples else _digit_png(work)
    builtin = store / "digits_cnn_builtin.mar"
    builtin.write_bytes(mar.read_bytes())
    # repackage: every file of the example archive but its manifest, plus the portable handler
    src = work / "digits_src"
    src.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(mar) as zf:
        manifest = json.loads(zf.read("MAR-INF/MANIFEST.json"))["model"]
        for name in zf.namelist():
            if not name.startswith("MAR-INF/") and not name.endswith("/"):
                (src / name).parent.mkdir(parents=True, exist_ok=True)
                (src / name).write_bytes(zf.read(name))
    handler = src / "digits_handler.py"
    handler.write_text(DIGITS_HANDLER)
    from server.core.archive import write_archive

    extras = [str(p) for p in sorted(src.iterdir()) if p.name not in (manifest["serializedFile"], handler.name,
                                                                      manifest.get("configFile", ""))]
    portable = write_archive(model_name="digits_cnn", version=manifest.get("modelVersion", "1.0"),
                             handler=str(handler), serialized_file=str(src / manifest["serializedFile"]),
                             config_file=str(src / manifest["configFile"]) if manifest.get("configFile") else None,
                             extra_files=extras, export_path=str(store), force=True)
    return [BenchModel("digits_cnn", portable, body, "image/png", "digits", None, (), True,
                       f"`osprey examples` digits CNN (same weights, model-config.yaml and labels) with a Pillow "
                       f"handler file both servers run; PNG body {body.name}"),
            BenchModel("digits_cnn_builtin", builtin, body, "image/png", "digits", None, (), True,
                       "the `osprey examples` archive as built (Osprey's built-in image_classifier; "
                       "TorchServe's built-in one needs torchvision)", extra={"osprey_only": True,
                                                                             "concurrency": [1, 32]})]


def build_models(work: Path, *, cnn_side: int = 224, with_cnn: bool = True, with_digits: bool = True,
                 log: list[str] | None = None) -> dict[str, BenchModel]:
    """Build every model's archive into ``work/store``; return them by name."""
    log = log if log is not None else []
    store = work / "store"
    store.mkdir(parents=True, exist_ok=True)
    build = work / "build"
    build.mkdir(parents=True, exist_ok=True)
    models = {m.name: m for m in _build_mlp(store, build)}
    if with_cnn:
        models["cnn"] = _build_cnn(store, build, cnn_side)
    if with_digits:
        for m in _build_digits(store, build, log):
            models[m.name] = m
    return models
