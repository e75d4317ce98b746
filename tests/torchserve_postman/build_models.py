"""Builds the small archives that stand in for the model-zoo archives TorchServe's Postman
collections download (https://torchserve.pytorch.org/mar_files/..., not reachable here).

Each archive is a real TorchServe model archive (MAR-INF/MANIFEST.json as torch-model-archiver
0.12 writes it, a TorchScript model, the handler postman_handler.py): the same file is served
by TorchServe 0.12 (the recorded baseline) and by Osprey. The models are tiny and their
answers are what the collections assert, read from the data files at build time:

- image classifiers (squeezenet1_1, densenet161, resnet-18, ...): a linear layer on the
  image's mean colour with zero weights whose biases are the log of the top-5 probabilities
  the data file expects (the rest of the mass spread over filler classes), so its softmax
  top 5 is exactly the expected answer for any image.
- the MNIST archives: a nearest-centroid classifier (a linear layer) built from the three
  digit images the collections send, labelled with the digit each collection expects.
- detectors, segmenters and text models whose collections check only the status code or a
  label: the classifier above, or a two-label text classifier answering the expected label.

bert_token_classification_no_torchscript is not built: its assertion is the per-token
output of a pretrained BERT (tokenizer and weights from the internet); its tests fail on both
servers here and are listed in the baseline as such.

Usage: python tests/torchserve_postman/build_models.py OUT_DIR
  writes OUT_DIR/mar_files/*.mar (served over loopback HTTP at {{mar_files_url}}, for the
  tests about registering by URL) and the same archives in OUT_DIR/store (registered by file
  name from the model store: the environment's {{mar_path_*}} and the data files' names).
Hand-written zip packing instead of torch-model-archiver: the archiver is an optional extra
and a subprocess per archive (about 1 s each, 25 archives) would dominate the test's time.
"""

from __future__ import annotations

import base64
import io
import json
import math
import shutil
import sys
import zipfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
POSTMAN = HERE / "postman"
HANDLER = HERE / "postman_handler.py"

# archive file name (without .mar) -> task; image classifiers read their expected top 5 from
# the data file row whose url names the archive
CLASSIFIERS = [
    "squeezenet1_1", "squeezenet1_1_scripted", "densenet161", "densenet161_scripted", "alexnet",
    "alexnet_scripted", "resnet-18", "resnet-18_scripted", "vgg16", "vgg16_scripted",
    "resnet-152-batch", "resnet-152-batch_scripted",
]
# only the status code is asserted for these
STATUS_ONLY_IMAGE = ["fastrcnn", "maskrcnn", "fcn_resnet_101", "fcn_resnet_101_scripted",
                     "deeplabv3_resnet_101_eager", "deeplabv3_resnet_101_scripted"]
DIGITS = ["mnist", "mnist_v2", "mnist_scripted_v2"]
TEXT = {"bert_seqc_without_torchscript": ["Accepted", "Not Accepted"], "distill_bert_qa_eager": ["answer"]}


class MeanColourLinear(torch.nn.Module):
    def __init__(self, classes: int):
        super().__init__()
        self.fc = torch.nn.Linear(3, classes)

    def forward(self, x):
        return self.fc(x.mean(dim=(2, 3)))


class FlatLinear(torch.nn.Module):
    def __init__(self, inputs: int, classes: int):
        super().__init__()
        self.fc = torch.nn.Linear(inputs, classes)

    def forward(self, x):
        return self.fc(x.flatten(1))


def _archive_of(url: str, env: dict[str, str]) -> str:
    if url.startswith("{{mar_path_"):
        return env[url[2:-2]][: -len(".mar")]
    return url.rsplit("/", 1)[-1][: -len(".mar")]


def _environment() -> dict[str, str]:
    return {v["key"]: v["value"] for v in json.loads((POSTMAN / "environment.json").read_text())["values"]}


def _expected_by_archive() -> dict[str, object]:
    env = _environment()
    expected = {}
    for name in ("inference_data.json", "increased_timeout_inference.json"):
        for row in json.loads((POSTMAN / name).read_text()):
            if "expected" in row:
                expected.setdefault(_archive_of(row["url"], env), row["expected"])
    return expected


def _classifier(top5: dict[str, float]) -> tuple[torch.nn.Module, list[str]]:
    labels = list(top5)
    probs = [float(p) for p in top5.values()]
    rest = max(0.0, 1.0 - sum(probs))
    fillers = 0 if rest == 0 else max(1, math.ceil(rest / (min(probs) / 2)))
    labels += [f"other_{i}" for i in range(fillers)]
    probs += [rest / fillers] * fillers if fillers else []
    model = MeanColourLinear(len(labels))
    with torch.no_grad():
        model.fc.weight.zero_()
        model.fc.bias.copy_(torch.log(torch.tensor(probs, dtype=torch.float64)).float())
    return model, labels


def _digit_examples() -> list[tuple[torch.Tensor, int]]:
    """The digits the collections send, each with the digit its data file expects."""
    import postman_handler  # the handler's own preprocessing, so the centroids match it

    ex = []
    png = (HERE / "examples/image_classifier/mnist/test_data/0.png").read_bytes()
    row = next(r for r in json.loads((POSTMAN / "inference_data.json").read_text()) if r["model_name"] == "mnist")
    ex.append((postman_handler._digit_input(png), int(row["expected"])))
    v1 = json.loads((HERE / "kubernetes/kserve/kf_request_json/v1/mnist.json").read_text())["instances"][0]["data"]
    kf = json.loads((POSTMAN / "kf_inference_data.json").read_text())[0]["expected"]["predictions"][0]
    ex.append((postman_handler._digit_input(base64.b64decode(v1)), int(kf)))
    v2 = json.loads((HERE / "kubernetes/kserve/kf_request_json/v2/mnist/mnist_v2_tensor.json").read_text())["inputs"][0]
    kfv2 = json.loads((POSTMAN / "kfv2_inference_data.json").read_text())[0]["expected"]["outputs"][0]["data"][0]
    ex.append((postman_handler._digit_input(v2["data"]), int(kfv2)))
    return ex


def _digits() -> tuple[torch.nn.Module, list[str]]:
    model = FlatLinear(28 * 28, 10)
    with torch.no_grad():
        model.fc.weight.zero_()
        model.fc.bias.fill_(-1e4)  # digits no example shows are never predicted
        for x, label in _digit_examples():
            c = x.flatten()
            model.fc.weight[label] = c
            model.fc.bias[label] = -0.5 * float(c @ c)
    return model, [str(i) for i in range(10)]


def _text(labels: list[str], answer: str) -> tuple[torch.nn.Module, list[str]]:
    model = FlatLinear(1, len(labels))
    with torch.no_grad():
        model.fc.weight.zero_()
        model.fc.bias.fill_(-1.0)
        model.fc.bias[labels.index(answer)] = 1.0
    return model, labels


def _pack(path: Path, name: str, task: str, model: torch.nn.Module, labels: list[str]) -> None:
    buf = io.BytesIO()
    torch.jit.save(torch.jit.script(model.eval()), buf)
    manifest = {
        "createdOn": "01/01/2025 00:00:00",
        "runtime": "python",
        "model": {"modelName": name, "serializedFile": "model.pt", "handler": HANDLER.name, "modelVersion": "1.0"},
        "archiverVersion": "0.12.0",
    }
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("MAR-INF/MANIFEST.json", json.dumps(manifest, indent=2))
        z.writestr("model.pt", buf.getvalue())
        z.writestr(HANDLER.name, HANDLER.read_text())
        z.writestr("postman_model.json", json.dumps({"task": task, "labels": labels}))


# densenet_wf.war as pytorch/serve's own densenet workflow spec describes it
# (frontend/server/src/test/resources/densenet_workflow.yaml), its model the densenet161
# stand-in from the model store; the pre- and post-processing nodes pass the data through.
WORKFLOW_SPEC = """models:
    min-workers: 1
    max-workers: 2
    batch-size: 3
    max-batch-delay: 5000

    densenet:
      url: densenet161.mar

dag:
  pre_processing: [densenet]
  densenet: [post_processing]
"""
WORKFLOW_HANDLER = """def pre_processing(data, context):
    return data


def post_processing(data, context):
    return data
"""


def _pack_workflow(path: Path) -> None:
    manifest = {"createdOn": "01/01/2025 00:00:00", "archiverVersion": "0.2.15",
                "workflow": {"workflowName": "densenet", "specFile": "densenet_workflow.yaml",
                             "handler": "densenet_workflow_handler.py"}}
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("WAR-INF/MANIFEST.json", json.dumps(manifest, indent=2))
        z.writestr("densenet_workflow.yaml", WORKFLOW_SPEC)
        z.writestr("densenet_workflow_handler.py", WORKFLOW_HANDLER)


def build(out: Path) -> Path:
    """Builds every archive into out/mar_files and copies them into out/store."""
    sys.path.insert(0, str(HERE))
    try:
        expected = _expected_by_archive()
        mar_files = out / "mar_files"
        mar_files.mkdir(parents=True, exist_ok=True)
        for name in CLASSIFIERS:
            _pack(mar_files / f"{name}.mar", name, "classify", *_classifier(expected[name]))
        for name in STATUS_ONLY_IMAGE:
            top5 = {"person": 0.9, "bicycle": 0.04, "car": 0.03, "dog": 0.02, "horse": 0.01}
            _pack(mar_files / f"{name}.mar", name, "classify", *_classifier(top5))
        digits = _digits()
        for name in DIGITS:
            _pack(mar_files / f"{name}.mar", name, "digit", *digits)
        for name, labels in TEXT.items():
            _pack(mar_files / f"{name}.mar", name, "text_label", *_text(labels, expected.get(name, labels[0])))
    finally:
        sys.path.remove(str(HERE))
    war_files = out / "war_files"
    war_files.mkdir(exist_ok=True)
    _pack_workflow(war_files / "densenet_wf.war")
    store = out / "store"
    store.mkdir(exist_ok=True)
    for path in [*mar_files.glob("*.mar"), war_files / "densenet_wf.war"]:
        shutil.copy(path, store / path.name)  # the store is also the workflow store
    return out


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__.rsplit("Usage: ", 1)[1].split("\n")[0])
    print(build(Path(sys.argv[1])))
