"""Monitoring capture (issue 11, points 2 and 3): per batch, in the instance's thread, the
features of each built-in family, prediction features inferred for handlers with no hook,
the penultimate activations, sampling, a broken hook, and reference runs for profiles.

Small real torch models, packaged as archives and loaded with the runner an instance uses.
"""

from __future__ import annotations

import io
import json
import logging
import pickle
import re
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from server.core.archive import open_archive, write_archive
from server.core.capture import Observation
from server.core.errors import OspreyError
from server.core.model_config import parse_model_config
from server.core.types import Field, InferenceRequest, InferenceResponse, Ticket
from server.instances.capture import run_reference
from server.instances.runner import load_runner

NETS = '''
import torch
from torch import nn


class TabularNet(nn.Module):
    def __init__(self, features=3, hidden=8, out=2):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(features, hidden), nn.ReLU(), nn.Linear(hidden, out))

    def forward(self, x):
        return self.net(x)


class RegressionNet(TabularNet):
    def __init__(self):
        super().__init__(3, 8, 1)


class TinyCNN(nn.Module):
    def __init__(self, channels=1, classes=3):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(channels, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2))
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(16, 6), nn.ReLU(), nn.Linear(6, classes))

    def forward(self, x):
        return self.classifier(self.features(x))


class RgbCNN(TinyCNN):
    def __init__(self):
        super().__init__(3, 3)


class BagOfWords(nn.Module):
    def __init__(self, vocab=8, dim=5, classes=2):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim, padding_idx=0)
        self.head = nn.Linear(dim, classes)

    def forward(self, input_ids, lengths):
        mask = (torch.arange(input_ids.shape[1])[None, :] < lengths[:, None]).float()
        pooled = (self.embed(input_ids) * mask[..., None]).sum(1) / lengths[:, None].float()
        return self.head(pooled)


class Encoder(nn.Module):
    def __init__(self, vocab=8, dim=4):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, input_ids, attention_mask):
        return self.proj(self.embed(input_ids))


class AutoEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = nn.Linear(4, 2)
        self.dec = nn.Linear(2, 4)

    def forward(self, x):
        return self.dec(torch.relu(self.enc(x)))


class Generator(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 16)

    def forward(self, z):
        return torch.sigmoid(self.fc(z)).reshape(len(z), 4, 4)


class CondGenerator(nn.Module):
    def __init__(self):
        super().__init__()
        self.label = nn.Embedding(5, 2)
        self.fc = nn.Linear(3 + 2, 16)

    def forward(self, z, cls):
        return torch.sigmoid(self.fc(torch.cat([z, self.label(cls)], dim=1))).reshape(len(z), 4, 4)
'''


_NETS: dict = {}


def _nets():
    """NETS as a module read from a file (TorchScript needs the source)."""
    if not _NETS:
        import importlib.util
        import tempfile

        path = Path(tempfile.mkdtemp(prefix="capture-nets-")) / "capture_test_nets.py"
        path.write_text(NETS)
        spec = importlib.util.spec_from_file_location("capture_test_nets", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _NETS.update(vars(module))
    return _NETS


def build(tmp: Path, name: str, handler: str, net: str | None = None, *, config: dict | None = None,
          files: dict[str, str | bytes] | None = None, scripted: bool = False, seed: int = 0):
    """An unpacked archive: ``handler`` (a built-in name or handler source), the model class
    ``net`` of NETS with seeded weights (eager state_dict, or TorchScript), extra files."""
    work = tmp / f"build-{name}"
    work.mkdir(parents=True, exist_ok=True)
    serialized = model_file = None
    if net is not None:
        torch.manual_seed(seed)
        model = _nets()[net]().eval()
        if scripted:
            serialized = work / "model.pt"
            torch.jit.script(model).save(str(serialized))
        else:  # the model file: the one public nn.Module class is the model
            text = NETS
            for other in re.findall(r"^class (\w+)\(", NETS, re.M):
                if other != net:
                    text = re.sub(rf"\b{other}\b", f"_{other}", text)
            model_file = work / f"{name}_net.py"
            model_file.write_text(text)
            serialized = work / "model.pt"
            torch.save(model.state_dict(), serialized)
    extras = []
    for fname, data in (files or {}).items():
        p = work / fname
        p.write_bytes(data) if isinstance(data, bytes) else p.write_text(data)
        extras.append(str(p))
    if handler.endswith(".py"):
        (work / handler).write_text(textwrap.dedent(files_handler[handler]))
        handler = str(work / handler)
    cfg = None
    if config:
        cfg = work / "model-config.yaml"
        cfg.write_text(yaml.safe_dump(config))
    path = write_archive(model_name=name, handler=handler, serialized_file=str(serialized) if serialized else None,
                         model_file=str(model_file) if model_file else None, extra_files=extras,
                         config_file=str(cfg) if cfg else None, export_path=str(tmp / "store"),
                         archive_format="no-archive", force=True)
    return open_archive(path)


files_handler: dict[str, str] = {}


def runner_for(archive, observed: list | None, **monitoring):
    raw = dict(archive.config)
    if monitoring:
        raw["monitoring"] = {**raw.get("monitoring", {}), **monitoring}
    config = parse_model_config(raw)
    return load_runner(archive.name, archive.version, str(archive.model_dir), archive.handler, archive.manifest,
                       config, None, None, None if observed is None else observed.append)


def ticket(rid: str, body) -> Ticket:
    if isinstance(body, bytes):
        f = Field(body, "application/octet-stream")
    elif isinstance(body, str):
        f = Field(body.encode(), "text/plain")
    else:
        f = Field(json.dumps(body).encode(), "application/json")
    return Ticket(InferenceRequest("m", None, rid, fields={"body": f}))


def run(runner, bodies: list, prefix: str = "r") -> list:
    outcomes = runner.run([ticket(f"{prefix}{i}", b) for i, b in enumerate(bodies)])
    runner.flush()
    return outcomes


def answers(outcomes: list) -> list:
    return [json.loads(o.body) if isinstance(o, InferenceResponse) else o.message for o in outcomes]


# --- tabular --------------------------------------------------------------------------
FEATURES = {"features": ["age", "bmi", "bp"], "mean": [50.0, 25.0, 90.0], "scale": [10.0, 5.0, 15.0],
            "task": "classification"}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return tmp_path_factory.mktemp("capture")


@pytest.fixture(scope="module")
def tabular(store):
    return build(store, "tab", "tabular", "TabularNet",
                 files={"features.json": json.dumps(FEATURES), "index_to_name.json": json.dumps(["benign", "malignant"])})


def test_tabular_features_in_natural_units_predictions_and_embedding(tabular):
    observed: list[Observation] = []
    runner = runner_for(tabular, observed)
    plain = runner_for(tabular, None)
    recs = [{"age": 61, "bmi": 30.5, "bp": 101}, [{"age": 40, "bmi": 22.0, "bp": 80}, [35, 19.5, 120]],
            {"age": 50, "bmi": "heavy", "bp": 90}, {"age": 70, "bmi": 28.0, "bp": 95}]
    got = run(runner, recs)
    assert answers(got) == answers(run(plain, recs))  # capture changes no answer
    assert isinstance(got[2], OspreyError) and got[2].status == 400
    assert len(observed) == 1
    obs = observed[0]
    assert obs.model == "tab" and obs.task == "classification" and obs.error is None
    # one row per record the model saw; a request of two records gives two rows with its id
    assert obs.request_ids == ["r0", "r1", "r1", "r3"]
    assert list(obs.features) == ["age", "bmi", "bp"]
    np.testing.assert_allclose(obs.features["age"], [61, 40, 35, 70], rtol=1e-5)
    np.testing.assert_allclose(obs.features["bmi"], [30.5, 22.0, 19.5, 28.0], rtol=1e-5)
    assert obs.features["bp"].dtype == np.float64 and obs.features["bp"].shape == (4,)
    assert obs.classes == ("benign", "malignant")
    assert obs.outputs.dtype == np.float32 and obs.outputs.shape == (4, 2)
    flat = [got[0].body, *[json.dumps(a).encode() for a in json.loads(got[1].body)], got[3].body]
    for row, body in zip(obs.outputs, flat):
        answer = json.loads(body)
        assert abs(row[1] - answer["malignant"]) < 1e-6
    assert set(obs.predictions) == {"predicted_class", "confidence", "entropy"}
    assert obs.categorical == frozenset({"predicted_class"})
    assert list(obs.predictions["predicted_class"]) == [("malignant" if r[1] > r[0] else "benign") for r in obs.outputs]
    np.testing.assert_allclose(obs.predictions["confidence"], obs.outputs.max(1), rtol=1e-6)
    p = obs.outputs.astype(np.float64)
    np.testing.assert_allclose(obs.predictions["entropy"], -(p * np.log(p)).sum(1), rtol=1e-5)
    # the penultimate activations: the input of the last Linear (after the ReLU), raw
    model = runner.service.target.model
    x = torch.tensor([[61, 30.5, 101], [40, 22.0, 80], [35, 19.5, 120], [70, 28.0, 95]], dtype=torch.float32)
    x = (x - torch.tensor(FEATURES["mean"])) / torch.tensor(FEATURES["scale"])
    with torch.no_grad():
        hidden = model.net[1](model.net[0](x)).numpy()
    assert obs.embedding.dtype == np.float32 and obs.embedding.shape == (4, 8)
    np.testing.assert_allclose(obs.embedding, hidden, atol=1e-5)


def test_tabular_regression_predicts_in_target_units(store):
    spec = {**FEATURES, "task": "regression", "target": {"name": "progression", "mean": 150.0, "scale": 70.0}}
    archive = build(store, "reg", "tabular", "RegressionNet", files={"features.json": json.dumps(spec)})
    observed: list[Observation] = []
    runner = runner_for(archive, observed)
    got = answers(run(runner, [{"age": 61, "bmi": 30.5, "bp": 101}, {"age": 40, "bmi": 22.0, "bp": 80}]))
    obs = observed[0]
    assert obs.task == "regression" and obs.classes is None
    assert list(obs.predictions) == ["prediction"]
    np.testing.assert_allclose(obs.predictions["prediction"], [g["progression"] for g in got], rtol=1e-5)
    assert obs.outputs.shape == (2,)
    assert obs.categorical == frozenset()


# --- images ---------------------------------------------------------------------------
def png(pixels: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_image_statistics_of_the_preprocessed_tensor_and_penultimate_embedding(store):
    cfg = {"handler": {"mode": "L", "resize": [8, 8], "scale": 255.0, "mean": [0.5], "std": [0.25], "topk": 3}}
    archive = build(store, "img", "image_classifier", "TinyCNN", config=cfg,
                    files={"index_to_name.json": json.dumps({"0": "a", "1": "b", "2": "c"})})
    observed: list[Observation] = []
    runner = runner_for(archive, observed)
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 256, (8, 8)) for _ in range(5)]
    got = run(runner, [png(i) for i in images])
    assert all(isinstance(o, InferenceResponse) for o in got)
    obs = observed[0]
    assert obs.task == "classification" and obs.classes == ("a", "b", "c")
    assert set(obs.features) == {"mean", "contrast"}  # one channel: no per-channel means
    x = (np.stack(images) / 255.0 - 0.5) / 0.25
    np.testing.assert_allclose(obs.features["mean"], x.reshape(5, -1).mean(1), atol=1e-5)
    np.testing.assert_allclose(obs.features["contrast"], x.reshape(5, -1).std(1), atol=1e-5)
    assert obs.embedding.shape == (5, 6)  # the input of the classifier's last Linear
    for o, row in zip(got, obs.outputs):
        answer = json.loads(o.body)
        top = max(answer, key=answer.get)
        assert abs(answer[top] - row.max()) < 1e-6


def test_rgb_images_give_per_channel_means(store):
    cfg = {"handler": {"mode": "RGB", "resize": [8, 8], "scale": 255.0}}
    archive = build(store, "rgb", "image_classifier", "RgbCNN", config=cfg)
    observed: list[Observation] = []
    runner = runner_for(archive, observed)
    img = np.zeros((8, 8, 3))
    img[..., 0], img[..., 1], img[..., 2] = 255, 51, 0
    run(runner, [png(img)])
    f = observed[0].features
    np.testing.assert_allclose([f["channel_mean[0]"][0], f["channel_mean[1]"][0], f["channel_mean[2]"][0]],
                               [1.0, 0.2, 0.0], atol=1e-6)
    assert observed[0].classes is None and len(observed[0].outputs[0]) == 3


def test_a_torchscript_model_still_gives_features_and_predictions(store):
    cfg = {"handler": {"mode": "L", "resize": [8, 8]}}
    archive = build(store, "img_ts", "image_classifier", "TinyCNN", config=cfg, scripted=True)
    observed: list[Observation] = []
    runner = runner_for(archive, observed)
    run(runner, [png(np.full((8, 8), 128)), png(np.full((8, 8), 10))])
    obs = observed[0]
    assert obs.error is None and set(obs.predictions) == {"predicted_class", "confidence", "entropy"}
    assert obs.features["mean"][0] > obs.features["mean"][1]
    # no hooks in TorchScript: the input of the graph's last linear layer, from a tapped copy of the graph
    model = runner.service.target.model
    x = torch.tensor(np.stack([np.full((1, 8, 8), 128 / 255), np.full((1, 8, 8), 10 / 255)]), dtype=torch.float32)
    eager = _nets()["TinyCNN"]()
    eager.load_state_dict({k: v for k, v in model.state_dict().items()})
    with torch.no_grad():
        hidden = eager.classifier[:3](eager.features(x)).numpy()
    assert obs.embedding.shape == (2, 6)
    np.testing.assert_allclose(obs.embedding, hidden, atol=1e-5)
    # unsampled batches run the model's own forward, and the answers are the same either way
    plain = runner_for(archive, None)
    same = [png(np.full((8, 8), 77))]
    assert answers(run(runner, same)) == answers(run(plain, same))


# --- text -----------------------------------------------------------------------------
VOCAB = "[PAD]\n[UNK]\nthe\nball\ngoal\nvote\nparty\nscored\n"


def test_text_length_unknown_rate_and_embedding(store):
    archive = build(store, "txt", "text_classifier", "BagOfWords", files={"vocab.txt": VOCAB},
                    config={"handler": {"model_inputs": ["input_ids", "lengths"]}})
    observed: list[Observation] = []
    runner = runner_for(archive, observed)
    got = run(runner, ["the ball", "the striker scored a goal", ["vote party", "zzz"]])
    assert all(isinstance(o, InferenceResponse) for o in got)
    obs = observed[0]
    assert obs.request_ids == ["r0", "r1", "r2", "r2"]
    np.testing.assert_array_equal(obs.features["length"], [2, 5, 2, 1])
    np.testing.assert_allclose(obs.features["unknown_rate"], [0.0, 2 / 5, 0.0, 1.0])
    assert obs.embedding.shape == (4, 5) and obs.task == "classification"


def test_text_embedding_gives_the_sentence_embedding(store):
    archive = build(store, "emb", "text_embedding", "Encoder", files={"vocab.txt": VOCAB},
                    config={"handler": {"model_inputs": ["input_ids", "attention_mask"]}})
    observed: list[Observation] = []
    runner = runner_for(archive, observed)
    got = run(runner, ["the ball", ["goal", "the vote party"]])
    obs = observed[0]
    assert obs.task == "embedding" and obs.predictions == {} and obs.outputs is None
    vectors = [json.loads(got[0].body)["embedding"], *json.loads(got[1].body)["embeddings"]]
    np.testing.assert_allclose(obs.embedding, np.asarray(vectors, dtype=np.float32), atol=1e-6)
    np.testing.assert_array_equal(obs.features["length"], [2, 1, 3])



def test_texts_padded_to_different_lengths_in_two_batches_are_built_batch_by_batch(store):
    """Pending batches whose tensors cannot be joined (padding differs per batch) are built one
    by one, not merged: the minilm example's profile failed on exactly that."""
    archive = build(store, "emb2", "text_embedding", "Encoder", files={"vocab.txt": VOCAB},
                    config={"handler": {"model_inputs": ["input_ids", "attention_mask"]}})
    observed: list[Observation] = []
    runner = runner_for(archive, observed)
    runner.run([ticket("a0", "the ball")])  # no flush between: both batches pending
    runner.run([ticket("b0", "the vote party the goal scored"), ticket("b1", "goal")])
    runner.flush()
    assert [o.error for o in observed] == [None] * len(observed)
    assert [i for o in observed for i in o.request_ids] == ["a0", "b0", "b1"]
    np.testing.assert_array_equal(np.concatenate([o.features["length"] for o in observed]), [2, 6, 1])

# --- autoencoder, generator, tensor ---------------------------------------------------
def test_anomaly_reconstruction_error(store):
    archive = build(store, "ae", "anomaly", "AutoEncoder",
                    config={"handler": {"threshold": 0.5, "input_shape": [4], "scale": 2.0}})
    observed: list[Observation] = []
    runner = runner_for(archive, observed)
    got = answers(run(runner, [[1, 2, 3, 4], [[0, 0, 0, 0], [8, 8, 8, 8]]]))
    obs = observed[0]
    assert obs.task == "autoencoder"
    errors = [got[0]["reconstruction_error"], *[g["reconstruction_error"] for g in got[1]]]
    np.testing.assert_allclose(obs.predictions["reconstruction_error"], errors, rtol=1e-5)
    np.testing.assert_allclose(obs.outputs, errors, rtol=1e-5)
    np.testing.assert_allclose(obs.features["mean"], [1.25, 0.0, 4.0], rtol=1e-6)  # model units (/ scale)
    assert set(obs.features) == {"mean", "contrast"}


def test_generator_features_and_no_predictions(store):
    archive = build(store, "gen", "generator", "Generator", config={"handler": {"latent_dim": 3}})
    observed: list[Observation] = []
    runner = runner_for(archive, observed)
    run(runner, [{"seed": 1, "num_samples": 2, "format": "json"}, {"latent": [[1.0, 1.0, 1.0]]}])
    obs = observed[0]
    assert obs.task is None and obs.predictions == {} and obs.outputs is None
    assert obs.request_ids == ["r0", "r0", "r1"]
    assert obs.features["latent_norm"][2] == pytest.approx(1.0)
    assert obs.embedding is None


def test_conditional_generator_outputs_the_asked_classes_for_feedback(store):
    archive = build(store, "cgen", "generator", "CondGenerator",
                    config={"handler": {"latent_dim": 3, "num_classes": 5}})
    observed: list[Observation] = []
    runner = runner_for(archive, observed)
    out = run(runner, [{"seed": 1, "num_samples": 2, "class": [4, 0], "format": "json"}, {"seed": 2, "class": 3}])
    assert out[1].headers["x-osprey-class"] == "3" and out[1].content_type == "image/png"
    obs = observed[0]
    assert obs.task == "generator" and obs.predictions == {}
    np.testing.assert_array_equal(obs.outputs, np.eye(5, dtype=np.float32)[[4, 0, 3]])
    assert list(obs.features["class"]) == ["4", "0", "3"] and obs.request_ids == ["r0", "r0", "r1"]


TENSOR_CFG = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 3]}],
              "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 1]}]}


def test_tensor_handler_regression_inferred_from_its_outputs(store):
    archive = build(store, "tens", "tensor", "RegressionNet", config=TENSOR_CFG)
    observed: list[Observation] = []
    runner = runner_for(archive, observed)
    got = answers(run(runner, [[1, 2, 3], [0, 0, 1]]))
    obs = observed[0]
    assert obs.task == "regression" and list(obs.predictions) == ["prediction"]
    np.testing.assert_allclose(obs.predictions["prediction"], [g[0] for g in got], rtol=1e-6)
    assert obs.features == {} and obs.embedding.shape == (2, 8)


def test_tensor_handler_with_several_outputs_gives_one_prediction_each(store):
    archive = build(store, "tens4", "tensor", "TabularNet", config={**TENSOR_CFG, "outputs": []})
    observed: list[Observation] = []
    run(runner_for(archive, observed), [[1, 2, 3]])
    assert set(observed[0].predictions) == {"prediction[0]", "prediction[1]"}


# --- handlers with no hook --------------------------------------------------------------
files_handler["ts_style.py"] = '''
    import json, os
    import torch


    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body = torch.nn.Sequential(torch.nn.Linear(2, 5), torch.nn.Tanh())
            self.out = torch.nn.Linear(5, 3)

        def forward(self, x):
            return self.out(self.body(x))


    class Classifier:
        """TorchServe-style: preprocess, self.inference, postprocess; a mapping; no monitoring hook."""

        def initialize(self, context):
            torch.manual_seed(0)
            self.model = Net().eval()
            self.mapping = {"0": ["n0", "cat"], "1": ["n1", "dog"], "2": ["n2", "bird"]}

        def inference(self, x):
            with torch.no_grad():
                return self.model(x)

        def handle(self, data, context):
            x = torch.tensor([row["body"] for row in data], dtype=torch.float32)
            probs = torch.softmax(self.inference(x), 1)
            return [{self.mapping[str(i)][1]: float(p[i]) for i in range(3)} for p in probs]
'''

files_handler["module_probs.py"] = '''
    def handle(data, context):
        if data is None:
            return None
        out = []
        for row in data:
            a = float(row["body"]["a"])
            out.append({"7": a, "10": 1 - a} if a < 0.9 else {"7": a, "3": 1 - a})
        return out
'''

files_handler["module_values.py"] = '''
    def handle(data, context):
        if data is None:
            return None
        return [[float(row["body"]), 2.0 * float(row["body"])] for row in data]
'''

files_handler["module_bytes.py"] = '''
    def handle(data, context):
        if data is None:
            return None
        return [b"png" for row in data]
'''


def test_the_benchmarks_module_handler_with_a_torchscript_mlp(store):
    """tests/models.py's MLP_HANDLER (the benchmark's tiny MLP): a module-level handle over a
    TorchScript model, answering lists of 4 numbers: regression values, and the hidden layer
    from the tapped graph."""
    from tests.models import mlp_archive

    archive = open_archive(mlp_archive(store / "mlp-store"), store / "mlp-work")
    observed: list[Observation] = []
    runner = runner_for(archive, observed)
    x = np.random.default_rng(0).standard_normal((3, 16)).tolist()
    got = answers(run(runner, x))
    obs = observed[0]
    assert obs.task == "regression" and sorted(obs.predictions) == [f"prediction[{i}]" for i in range(4)]
    np.testing.assert_allclose(obs.outputs, got, rtol=1e-6)
    model = runner.service.target.model
    with torch.no_grad():
        hidden = torch.relu(torch.nn.functional.linear(torch.tensor(x, dtype=torch.float32),
                                                       model.state_dict()["0.weight"], model.state_dict()["0.bias"]))
    np.testing.assert_allclose(obs.embedding, hidden.numpy(), atol=1e-5)


def test_torchserve_style_handler_without_hooks_gets_prediction_features(store):
    archive = build(store, "ts_style", "ts_style.py")
    observed: list[Observation] = []
    runner = runner_for(archive, observed)
    got = answers(run(runner, [[0.1, 0.2], [1.0, -1.0], [3.0, 0.5]]))
    obs = observed[0]
    assert obs.task == "classification" and obs.classes == ("cat", "dog", "bird")
    assert list(obs.predictions["predicted_class"]) == [max(g, key=g.get) for g in got]
    np.testing.assert_allclose(obs.outputs[:, 1], [g["dog"] for g in got], rtol=1e-5)  # softmax of the logits
    assert obs.embedding.shape == (3, 5)  # found: the input of the last Linear
    assert obs.features == {}


def test_module_handler_answering_label_probabilities(store):
    archive = build(store, "mod_probs", "module_probs.py")
    observed: list[Observation] = []
    run(runner_for(archive, observed), [{"a": 0.2}, {"a": 0.95}])
    obs = observed[0]
    assert obs.task == "classification" and obs.classes == ("3", "7", "10")  # numeric order
    np.testing.assert_allclose(obs.outputs, [[0, 0.2, 0.8], [0.05, 0.95, 0]], atol=1e-6)
    assert list(obs.predictions["predicted_class"]) == ["10", "7"]
    assert obs.embedding is None


def test_module_handler_answering_numbers_is_regression_and_bytes_say_nothing(store):
    observed: list[Observation] = []
    run(runner_for(build(store, "mod_values", "module_values.py"), observed), [1.5, 2.0])
    obs = observed[0]
    assert obs.task == "regression"
    np.testing.assert_allclose(obs.predictions["prediction[1]"], [3.0, 4.0])
    observed.clear()
    out = run(runner_for(build(store, "mod_bytes", "module_bytes.py"), observed), ["x"])
    assert out[0].body == b"png" and observed == []  # nothing usable: no observation at all


# --- failures, sampling, switches -------------------------------------------------------
files_handler["broken_hook.py"] = '''
    import torch


    class Broken:
        monitor_task = "regression"

        def initialize(self, context):
            torch.manual_seed(0)
            self.model = torch.nn.Linear(2, 1)

        def inference(self, x):
            with torch.no_grad():
                return self.model(x)

        def monitor_features(self, inputs, outputs):
            raise RuntimeError("hook bug")

        def handle(self, data, context):
            x = torch.tensor([row["body"] for row in data], dtype=torch.float32)
            return self.inference(x)[:, 0].tolist()
'''


def test_a_broken_hook_is_logged_once_and_observed_as_an_error_answers_unaffected(store, caplog):
    archive = build(store, "broken", "broken_hook.py")
    observed: list[Observation] = []
    runner = runner_for(archive, observed)
    plain = runner_for(archive, None)
    with caplog.at_level(logging.WARNING, logger="osprey.monitoring"):
        first = run(runner, [[1, 2], [3, 4]])
        second = run(runner, [[5, 6]], prefix="s")
        run(runner_for(archive, observed), [[7, 8]], prefix="t")  # another instance of the version
    assert answers(first) == answers(run(plain, [[1, 2], [3, 4]]))
    assert all(isinstance(o, InferenceResponse) for o in first + second)
    assert [o.error is not None for o in observed] == [True, True, True]
    assert "RuntimeError: hook bug" in observed[0].error
    assert observed[0].request_ids == ["r0", "r1"] and observed[1].request_ids == ["s0"]
    assert observed[0].features == {} and observed[0].model == "broken"
    warnings = [r for r in caplog.records if "monitoring hook failed" in r.getMessage()]
    assert len(warnings) == 1


def test_observe_raising_never_fails_a_request(tabular):
    def observe(obs):
        raise RuntimeError("monitor down")

    config = parse_model_config(tabular.config)
    runner = load_runner("tab", "1.0", str(tabular.model_dir), tabular.handler, tabular.manifest, config, None,
                         None, observe)
    got = run(runner, [{"age": 61, "bmi": 30.5, "bp": 101}] * 3)
    assert all(isinstance(o, InferenceResponse) for o in got)


def test_sampling_keeps_about_the_sample_rate_of_requests(tabular):
    observed: list[Observation] = []
    runner = runner_for(tabular, observed, sample_rate=0.25)
    rec = {"age": 61, "bmi": 30.5, "bp": 101}
    for b in range(100):
        run(runner, [rec] * 8, prefix=f"b{b}-")
    rows = sum(len(o) for o in observed)
    assert 0.17 * 800 < rows < 0.33 * 800
    assert len(observed) < 100  # a batch with none sampled hands nothing over
    for o in observed:
        assert len(o.request_ids) == len(o.features["age"]) == len(o.outputs) == len(o.embedding)


def test_monitoring_disabled_or_no_observer_installs_nothing(tabular):
    off = runner_for(tabular, [], enabled=False)
    assert off.capture is None
    assert not hasattr(off.service.target.inference, "__wrapped__")
    assert runner_for(tabular, None).capture is None
    assert runner_for(tabular, [], sample_rate=0.0).capture is None


def test_instance_factory_passes_observe_unless_the_server_turns_monitoring_off(monkeypatch):
    import server.instances as inst
    from server.settings import Settings

    seen = {}

    def fake_thread_factory(sink=None, observe=None, envelope=""):
        seen["thread"] = observe
        return lambda *a: None

    def fake_process_factory(sink=None, threads=0, observe=None, envelope="", forward_output=False, link=None):
        seen["process"] = observe
        seen["link"] = link
        return lambda *a: None

    monkeypatch.setattr(inst, "thread_factory", fake_thread_factory)
    monkeypatch.setattr(inst, "process_factory", fake_process_factory)
    marker = object()
    inst.instance_factory(Settings(), None, marker)
    assert seen == {"thread": marker, "process": marker, "link": None}
    # a monitor process's socket reaches process instances (their children send there) ...
    inst.instance_factory(Settings(), None, marker, monitor_link=("/tmp/m.sock", b"key"))
    assert seen == {"thread": marker, "process": marker, "link": ("/tmp/m.sock", b"key")}
    # ... unless monitoring is off
    inst.instance_factory(Settings(monitoring=False), None, marker, monitor_link=("/tmp/m.sock", b"key"))
    assert seen == {"thread": None, "process": None, "link": None}


def test_penultimate_layer_by_name_and_a_wrong_name_falls_back(tabular):
    observed: list[Observation] = []
    runner = runner_for(tabular, observed, layer="net.0")  # before the ReLU: negatives kept
    run(runner, [{"age": 61, "bmi": 30.5, "bp": 101}, {"age": 20, "bmi": 15.0, "bp": 60}])
    model = runner.service.target.model
    x = (torch.tensor([[61, 30.5, 101], [20, 15.0, 60]]) - torch.tensor(FEATURES["mean"])) / torch.tensor(FEATURES["scale"])
    with torch.no_grad():
        np.testing.assert_allclose(observed[0].embedding, model.net[0](x).numpy(), atol=1e-5)
    assert (observed[0].embedding < 0).any()

    observed.clear()
    runner = runner_for(tabular, observed, layer="no.such")
    run(runner, [{"age": 61, "bmi": 30.5, "bp": 101}])
    run(runner, [{"age": 61, "bmi": 30.5, "bp": 101}])
    errors = [o for o in observed if o.error]
    assert len(errors) == 1 and "no.such" in errors[0].error  # said once: the monitor shows it degraded
    good = [o for o in observed if not o.error]
    assert len(good) == 2 and good[0].embedding.shape == (1, 8)  # found instead


def test_monitoring_features_filter_keeps_only_the_named_inputs(tabular):
    observed: list[Observation] = []
    run(runner_for(tabular, observed, features=["bmi"]), [{"age": 61, "bmi": 30.5, "bp": 101}])
    assert list(observed[0].features) == ["bmi"] and observed[0].predictions


def test_observations_pickle_small(tabular):
    observed: list[Observation] = []
    run(runner_for(tabular, observed), [{"age": 61, "bmi": 30.5, "bp": 101}] * 32)
    data = pickle.dumps(observed[0])
    # 32 rows: 3 features + 2 numeric predictions (float64), classes (str), 8-wide embedding and 2 outputs (float32)
    assert len(data) < 6000, len(data)
    back = pickle.loads(data)
    np.testing.assert_array_equal(back.embedding, observed[0].embedding)


# --- reference runs for profiles ----------------------------------------------------------
def test_run_reference_returns_observations_and_names_the_rows_refused(tabular):
    bodies = [{"age": 61, "bmi": 30.5, "bp": 101}] * 5 + [{"age": 1, "bmi": 2}] + [{"age": 40, "bmi": 22.0, "bp": 80}]
    names = [f"ref.jsonl:{i + 1}" for i in range(len(bodies))]
    config = parse_model_config({**tabular.config, "batchSize": 4, "monitoring": {"sample_rate": 0.01}})
    got = run_reference(tabular, bodies, config=config, names=names)
    assert got.rows == 6
    assert [(e.index, e.name) for e in got.errors] == [(5, "ref.jsonl:6")]
    assert "missing feature 'bp'" in str(got.errors[0])
    assert str(got.errors[0]).startswith("ref.jsonl:6: ")
    assert len(got.observations) == 1  # two batches of 4, every row sampled: one observation of both
    assert got.observations[0].request_ids == [n for n in names if n != "ref.jsonl:6"]


def test_run_reference_takes_image_bytes_and_tensors(store):
    archive = build(store, "img_ref", "image_classifier", "TinyCNN", config={"handler": {"mode": "L", "resize": [8, 8]}})
    got = run_reference(archive, [png(np.full((8, 8), 200)), b"not an image"])
    assert got.rows == 1 and got.errors[0].name == "row 1" and "not an image" in got.errors[0].message
    tens = build(store, "tens_ref", "tensor", "RegressionNet", config=TENSOR_CFG)
    got = run_reference(tens, [{"x": np.ones((2, 3), dtype=np.float32)}])
    assert got.rows == 1 and len(got.observations[0]) == 2


def test_run_reference_hands_back_a_failing_hook_as_an_error_observation(store):
    got = run_reference(build(store, "broken_ref", "broken_hook.py"), [[1, 2], [3, 4]])
    assert got.rows == 2 and got.errors == []
    assert len(got.observations) == 1  # batchSize 1, both batches built at once: one error for both
    assert "hook bug" in got.observations[0].error
    assert got.observations[0].request_ids == ["row 0", "row 1"]


def test_a_bf16_model_gives_float_features_and_float32_embeddings(store):
    archive = build(store, "tab_bf16", "tabular", "TabularNet", config={"precision": "bf16"},
                    files={"features.json": json.dumps(FEATURES)})
    observed: list[Observation] = []
    run(runner_for(archive, observed), [{"age": 61, "bmi": 30.5, "bp": 101}])
    obs = observed[0]
    assert obs.features["age"].dtype == np.float64 and abs(obs.features["age"][0] - 61) < 0.5  # bf16 input
    assert obs.embedding.dtype == np.float32 and obs.outputs.dtype == np.float32
    assert abs(obs.outputs.sum() - 1) < 1e-3


# --- amortized capture: references per batch, one observation for many -------------------
def test_several_batches_give_one_observation_with_all_their_rows(tabular):
    """Batches only keep references; a flush builds ONE observation of all of them, the same
    rows and values as one observation per batch would have."""
    recs = [{"age": 61 + i, "bmi": 30.5 - i, "bp": 101 + 2 * i} for i in range(7)]
    batches = [recs[:3], recs[3:4], recs[4:]]
    each: list[Observation] = []
    one_each = runner_for(tabular, each)
    for k, b in enumerate(batches):
        run(one_each, b, prefix=f"b{k}-")  # flushed after every batch: one observation each
    assert len(each) == 3
    observed: list[Observation] = []
    runner = runner_for(tabular, observed)
    for k, b in enumerate(batches):
        runner.run([ticket(f"b{k}-{i}", r) for i, r in enumerate(b)])
        runner.flush(force=False)  # what an instance does after a handoff: nothing is due yet
    assert observed == [] and runner.capture.wait() is not None and not runner.capture.due()
    runner.flush()  # idle (or stopping): everything pending, at once
    assert len(observed) == 1 and runner.capture.wait() is None
    obs = observed[0]
    assert obs.request_ids == [i for o in each for i in o.request_ids] == \
        [f"b{k}-{i}" for k, b in enumerate(batches) for i in range(len(b))]
    for name in each[0].features:
        np.testing.assert_allclose(obs.features[name], np.concatenate([o.features[name] for o in each]), rtol=1e-6)
    for name in each[0].predictions:
        want = np.concatenate([o.predictions[name] for o in each])
        if want.dtype == object:
            assert list(obs.predictions[name]) == list(want)
        else:
            np.testing.assert_allclose(obs.predictions[name], want, rtol=1e-5)
    np.testing.assert_allclose(obs.outputs, np.concatenate([o.outputs for o in each]), rtol=1e-5)
    np.testing.assert_allclose(obs.embedding, np.concatenate([o.embedding for o in each]), rtol=1e-5)
    assert obs.categorical == each[0].categorical and obs.classes == each[0].classes
    assert obs.time == max(o.time for o in observed)


def test_a_flush_is_due_at_max_rows_and_after_max_delay(tabular, monkeypatch):
    from server.instances import capture as cap

    observed: list[Observation] = []
    runner = runner_for(tabular, observed)
    rec = {"age": 61, "bmi": 30.5, "bp": 101}
    per = 32
    for k in range(cap.MAX_ROWS // per):
        assert observed == []
        runner.run([ticket(f"b{k}-{i}", rec) for i in range(per)])
        runner.flush(force=False)
    assert len(observed) == 1 and len(observed[0]) == cap.MAX_ROWS  # due by rows: built after the last
    runner.run([ticket("late", rec)])
    runner.flush(force=False)
    assert len(observed) == 1 and 0 < runner.capture.wait() <= cap.MAX_DELAY_S
    clock = time.monotonic() + cap.MAX_DELAY_S + 0.01
    monkeypatch.setattr(cap.time, "monotonic", lambda: clock)
    assert runner.capture.due() and runner.capture.wait() == 0.0
    runner.flush(force=False)  # due by age
    assert len(observed) == 2 and observed[1].request_ids == ["late"]


files_handler["static_buffer.py"] = '''
    import torch


    class StaticBuffer:
        """Writes every batch into the same preallocated tensors (as CUDA graphs do)."""
        monitor_task = "regression"
        monitor_layer = False

        def initialize(self, context):
            self.x = torch.zeros(4, 2)
            self.y = torch.zeros(4, 1)

        def inference(self, x):
            self.y[: len(x)] = x.sum(dim=1, keepdim=True)
            return self.y[: len(x)]

        def monitor_features(self, inputs, outputs):
            return {"s": inputs.sum(dim=1)}

        def handle(self, data, context):
            x = self.x[: len(data)]
            x.copy_(torch.tensor([row["body"] for row in data], dtype=torch.float32))
            return self.inference(x)[:, 0].tolist()
'''


def test_a_handler_reusing_its_tensors_in_place_is_copied_from_then_on(store, caplog):
    observed: list[Observation] = []
    runner = runner_for(build(store, "static", "static_buffer.py"), observed)
    with caplog.at_level(logging.WARNING, logger="osprey.monitoring"):
        for k in range(4):
            runner.run([ticket(f"b{k}", [k, 1])])
            runner.flush(force=False)
    assert runner.capture._rows == 3  # pending: what was dropped is not counted
    runner.flush()
    # the first batch was overwritten by the second before anything was built: dropped; the
    # others are copied as they end, and built together
    assert [o.request_ids for o in observed] == [["b1", "b2", "b3"]]
    assert observed[0].features["s"].tolist() == [2.0, 3.0, 4.0]
    assert observed[0].predictions["prediction"].tolist() == [2.0, 3.0, 4.0]
    assert sum("reuses its tensors in place" in r.getMessage() for r in caplog.records) == 1


def test_a_handler_reusing_its_tensors_within_one_handoff_keeps_only_what_was_not_overwritten(store, caplog):
    """A handoff's batches are captured together (one arming): a buffer reused from one batch
    to the next is found when the handoff ends; only its last batch still holds its own
    values, and every later batch is copied."""
    observed: list[Observation] = []
    runner = runner_for(build(store, "static", "static_buffer.py"), observed)
    with caplog.at_level(logging.WARNING, logger="osprey.monitoring"):
        first = runner.run_handoff([[ticket(f"a{k}", [k, 1])] for k in range(4)])
        second = runner.run_handoff([[ticket(f"b{k}", [k, 10])] for k in range(3)])
    assert [o[0].body for o in first + second] == [b"1.0", b"2.0", b"3.0", b"4.0", b"10.0", b"11.0", b"12.0"]
    runner.flush()
    assert [o.request_ids for o in observed] == [["a3", "b0", "b1", "b2"]]
    assert observed[0].features["s"].tolist() == [4.0, 10.0, 11.0, 12.0]
    assert sum("reuses its tensors in place" in r.getMessage() for r in caplog.records) == 1


files_handler["picky.py"] = '''
    import torch


    class Picky:
        """Sums each row; a batch holding "boom" fails as a whole, after its inference ran."""
        monitor_task = "regression"
        monitor_layer = False

        def initialize(self, context):
            pass

        def inference(self, x):
            return x.sum(dim=1, keepdim=True)

        def monitor_features(self, inputs, outputs):
            return {"s": inputs.sum(dim=1)}

        def handle(self, data, context):
            rows = [row["body"] for row in data]
            out = self.inference(torch.tensor([[0.0, 0.0] if r == "boom" else r for r in rows]))
            if "boom" in rows:
                raise ValueError("boom")
            return out[:, 0].tolist()
'''


def test_a_handoff_is_captured_once_and_keeps_only_the_batches_that_answered(store):
    """One arming for a whole handoff: the batches that answered are observed, in order, with
    their own rows; a batch whose handler failed as a whole is not, but its requests re-run one
    by one are, those that answered; and a request the handler refused is not."""
    observed: list[Observation] = []
    runner = runner_for(build(store, "picky", "picky.py"), observed)
    batches = [[ticket("h0-0", [1, 1]), ticket("h0-1", [1, 2])],
               [ticket("h1-0", [2, 1]), ticket("h1-boom", "boom"), ticket("h1-2", [2, 2])],
               [ticket("h2-0", [3, 1]), ticket("h2-bad", "oops")]]
    outcomes = runner.run_handoff(batches)
    assert [o.status if isinstance(o, InferenceResponse) else "refused" for b in outcomes for o in b] == \
        [200, 200, 200, "refused", 200, 200, "refused"]
    assert runner.capture.tap.armed is False
    runner.flush()
    assert len(observed) == 1
    assert observed[0].request_ids == ["h0-0", "h0-1", "h1-0", "h1-2", "h2-0"]
    assert observed[0].features["s"].tolist() == [2.0, 3.0, 3.0, 4.0, 4.0]
    assert observed[0].predictions["prediction"].tolist() == [2.0, 3.0, 3.0, 4.0, 4.0]


files_handler["describing.py"] = '''
    import torch


    class Describing:
        """Sums each row; a describe (TorchServe's "describe: True" header) runs the model too."""
        monitor_task = "regression"
        monitor_layer = False

        def initialize(self, context):
            self.context = None

        def inference(self, x):
            return x.sum(dim=1, keepdim=True)

        def monitor_features(self, inputs, outputs):
            return {"s": inputs.sum(dim=1)}

        def handle(self, data, context):
            if context.get_request_header(0, "describe") == "True":
                self.inference(torch.tensor([[100.0, 100.0]]))
                return [{"about": "sums"}]
            out = self.inference(torch.tensor([row["body"] for row in data], dtype=torch.float32))
            return out[:, 0].tolist()
'''


def test_a_describe_inside_a_handoff_is_not_observed(store):
    from server.core.types import Protocol

    observed: list[Observation] = []
    runner = runner_for(build(store, "describing", "describing.py"), observed)
    describe = Ticket(InferenceRequest("m", None, "d", protocol=Protocol.DESCRIBE, headers={"describe": "True"}))
    outcomes = runner.run_handoff([[ticket("a", [1, 2])], [describe], [ticket("b", [3, 4])]])
    assert json.loads(outcomes[1][0].body) == {"about": "sums"}
    runner.flush()
    assert [o.request_ids for o in observed] == [["a", "b"]]
    assert observed[0].features["s"].tolist() == [3.0, 7.0]


def test_a_handoff_at_a_sample_rate_keeps_only_the_sampled_batches_each_with_its_own_rows(store):
    """Unsampled batches run untouched: the tap keeps nothing while they run (the lists hold
    only the sampled batches before them), and each sampled request is observed with its own
    values."""
    observed: list[Observation] = []
    runner = runner_for(build(store, "picky", "picky.py"), observed, sample_rate=0.5)
    held = []
    handle = runner.service.handle

    def counting(data, context):
        held.append(len(runner.capture.tap.calls))
        return handle(data, context)

    runner.service.handle = counting
    runner.run_handoff([[ticket(f"r{k}", [k, 0])] for k in range(40)])
    runner.flush()
    ids = [i for o in observed for i in o.request_ids]
    assert 0 < len(ids) < 40
    assert [float(v) for o in observed for v in o.features["s"]] == [float(i[1:]) for i in ids]
    sampled = {int(i[1:]) for i in ids}
    assert held == [sum(1 for j in sampled if j < k) for k in range(40)]


files_handler["rows_failing.py"] = '''
    import torch


    class RowsFailing:
        """Sums each row; its monitor_rows fails while ``failing`` is set."""
        monitor_task = "regression"
        monitor_layer = False
        failing = False

        def initialize(self, context):
            pass

        @property
        def monitor_rows(self):
            if self.failing:
                raise ZeroDivisionError("no rows today")
            return None

        def inference(self, x):
            return x.sum(dim=1, keepdim=True)

        def monitor_features(self, inputs, outputs):
            return {"s": inputs.sum(dim=1)}

        def handle(self, data, context):
            return self.inference(torch.tensor([row["body"] for row in data], dtype=torch.float32))[:, 0].tolist()
'''


def test_a_handler_whose_monitor_rows_raises_loses_that_batch_only(store, caplog):
    observed: list[Observation] = []
    runner = runner_for(build(store, "rows_failing", "rows_failing.py"), observed)
    target = runner.service.target
    answers = []
    with caplog.at_level(logging.WARNING, logger="osprey.monitoring"):
        for k in range(3):
            target.failing = k == 1
            answers += runner.run_handoff([[ticket(f"r{k}", [k, 1])]])[0]
        target.failing = False
        answers += runner.run([ticket("alone", [5, 5])])  # a batch outside a handoff, after it
    runner.flush()
    assert [o.status for o in answers] == [200, 200, 200, 200]  # answers are not affected
    assert [o.request_ids for o in observed if o.error is None] == [["r0", "r2", "alone"]]
    assert [o.features["s"].tolist() for o in observed if o.error is None] == [[1.0, 3.0, 10.0]]
    assert any(o.error and "ZeroDivisionError" in o.error for o in observed)
    assert runner.capture.tap.armed is False and not runner.capture._open


def test_the_row_map_is_read_wherever_a_handler_keeps_monitor_rows():
    from handlers.monitoring import Tap

    class Plain:
        pass

    class Declared:
        monitor_rows = None

    class Computed:
        @property
        def monitor_rows(self):
            return [0, 0]

    class Delegating:
        def __getattr__(self, name):
            if name == "monitor_rows":
                return [1, 1]
            raise AttributeError(name)

    plain, declared = Plain(), Declared()
    taps = [Tap(t) for t in (plain, declared, Computed(), Delegating())]
    assert [t.row_map() for t in taps] == [None, None, [0, 0], [1, 1]]
    plain.monitor_rows, declared.monitor_rows = [2], [3]  # set by the handler in handle()
    assert [taps[0].row_map(), taps[1].row_map()] == [[2], [3]]
    module = type(textwrap)("handler_module")
    tap = Tap(module)
    assert tap.row_map() is None
    module.monitor_rows = [4]
    assert tap.row_map() == [4]


def test_joins_at_flush_refuse_tensors_of_different_dtypes():
    from server.instances.capture import _joined

    a, b = torch.zeros(2, 3), torch.zeros(1, 3, dtype=torch.float16)
    assert _joined([a, b], True) is None and _joined([a, b], False) is None
    assert _joined([a, torch.ones(1, 3)], True).shape == (3, 3)
    assert _joined([a, torch.ones(1, 4)], True) is None  # row shapes differ
    assert _joined([a, np.ones((1, 3), dtype=np.float32)], True) is None  # kinds differ
    assert _joined([torch.tensor(1.0), torch.tensor(2.0)], True) is None  # no rows
