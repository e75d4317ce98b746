"""Build the local stand-ins for what TorchServe's pytest modules download or keep in Git LFS.

Nothing here reaches the network. Written next to the copied sources (and ignored by Git):

- examples/image_classifier/mnist/mnist_cnn.pt and examples/stateful/model_cnn.pt: state dicts
  of the examples' own ``Net`` (mnist.py / stateful/model.py) from a fixed seed, instead of the
  trained weights kept in Git LFS (the tests check serving, never which digit is predicted).
- examples/image_classifier/kitten.jpg and test/pytest/test_data/kitten.jpg: a 224x224 JPEG
  drawn here instead of the photograph.
- standins/tiny_classifier.pt + index_to_name.json: a small CNN (standins/tiny_classifier.py)
  that stands in for squeezenet1_1, densenet161, resnet-18, ... (ts_scripts/marsgen.py).

Run by test/pytest/conftest.py when the modules are collected; cheap (well under a second) and
skipped when the files exist.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STANDINS = ROOT / "standins"
LABELS = ["tabby", "tiger_cat", "Egyptian_cat", "lynx", "Persian_cat", "tiger", "cougar", "lion", "jaguar",
          "leopard"]


def _net_weights(model_py: Path, out: Path, seed: int) -> None:
    import importlib.util

    import torch

    if out.exists():
        return
    spec = importlib.util.spec_from_file_location(f"standin_{model_py.stem}", model_py)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cls = getattr(module, "Net", None) or getattr(module, "TinyClassifier")
    torch.manual_seed(seed)
    torch.save(cls().state_dict(), out)


def _kitten(out: Path) -> None:
    from PIL import Image

    if out.exists():
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", (224, 224))
    image.putdata([((x * 7 + y) % 256, (y * 3) % 256, (x * y) % 256) for y in range(224) for x in range(224)])
    image.save(out, "JPEG", quality=90)


def build() -> None:
    _net_weights(ROOT / "examples/image_classifier/mnist/mnist.py",
                 ROOT / "examples/image_classifier/mnist/mnist_cnn.pt", seed=0)
    _net_weights(ROOT / "examples/stateful/model.py", ROOT / "examples/stateful/model_cnn.pt", seed=1)
    _net_weights(STANDINS / "tiny_classifier.py", STANDINS / "tiny_classifier.pt", seed=2)
    labels = STANDINS / "index_to_name.json"
    if not labels.exists():
        labels.write_text(json.dumps({str(i): name for i, name in enumerate(LABELS)}))
    _kitten(ROOT / "examples/image_classifier/kitten.jpg")
    _kitten(ROOT / "test/pytest/test_data/kitten.jpg")


if __name__ == "__main__":
    build()
    sys.exit(0)


def grpc_modules() -> str:
    """inference_pb2(_grpc) and management_pb2(_grpc) generated from TorchServe's protos (proto/),
    as TorchServe's CI does before the tests; returns the folder to put on sys.path."""
    out = ROOT / "grpc_generated"
    if (out / "management_pb2_grpc.py").exists():
        return str(out)
    out.mkdir(parents=True, exist_ok=True)
    import google.rpc.status_pb2 as status
    import grpc_tools
    from grpc_tools import protoc

    includes = [ROOT / "proto", Path(grpc_tools.__file__).parent / "_proto", Path(status.__file__).parent.parent.parent]
    for proto in ("inference.proto", "management.proto"):
        args = ["protoc", *(f"-I{p}" for p in includes), f"--python_out={out}", f"--grpc_python_out={out}",
                str(ROOT / "proto" / proto)]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {proto}")
    return str(out)
