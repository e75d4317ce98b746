"""Model formats and optimization switches, served by the real server.

Formats: one small network saved as TorchScript, eager state_dict, safetensors,
``torch.export`` (.pt2) and ONNX (when onnxruntime is installed) answers like the eager
network (probabilities within 1e-5), one by one and batched. A file that cannot load is a
400 at registration that says why.

Switches (model-config.yaml): ``quantize: dynamic-int8`` and ``precision: bf16`` lose at
most 2 accuracy points against fp32 on held-out data (digits_lstm, cancer_mlp,
text_transformer) and really change the computation (outputs are not bit-identical);
``channels_last`` and ``compile`` (dynamo with the eager backend; an unknown backend falls
back to eager with a warning) answer like the plain model.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import textwrap
from pathlib import Path

import httpx
import numpy as np
import pytest

from server.core.archive import write_archive
from tests.builtin_models import concurrent_posts, example_store, variant

TINY_NET = '''
import torch
from torch import nn


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))

    def forward(self, x):
        return self.net(x)
'''

HAS_ONNX = importlib.util.find_spec("onnxruntime") is not None and importlib.util.find_spec("onnx") is not None
FORMATS = ["torchscript", "state_dict", "safetensors", "export", "onnx"]


def _tiny(work: Path):
    import importlib.util as iu

    (work / "tiny_net.py").write_text(textwrap.dedent(TINY_NET))
    spec = iu.spec_from_file_location("tiny_net_for_test", work / "tiny_net.py")
    module = iu.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules["tiny_net_for_test"] = module  # so that a whole module can be pickled (a bad archive)
    import torch

    torch.manual_seed(3)
    return module.TinyNet().eval()


def _package(store: Path, work: Path, name: str, serialized: Path, model_file: Path | None = None,
             config: dict | None = None) -> str:
    (work / "features.json").write_text(json.dumps({"features": ["a", "b", "c", "d"], "task": "classification"}))
    (work / "index_to_name.json").write_text(json.dumps(["x", "y", "z"]))
    extras = [str(work / "features.json"), str(work / "index_to_name.json")]
    cfg = None
    if config:
        import yaml

        cfg = work / f"{name}-config.yaml"
        cfg.write_text(yaml.safe_dump(config))
    write_archive(model_name=name, handler="tabular", serialized_file=str(serialized),
                  model_file=str(model_file) if model_file else None, extra_files=extras,
                  config_file=str(cfg) if cfg else None, export_path=str(store), force=True)
    return f"{name}.mar"


@pytest.fixture(scope="module")
def formats(tmp_path_factory):
    """The tiny network in every format, packaged in one store; and its eager reference."""
    import torch

    store = tmp_path_factory.mktemp("formats-store")
    work = tmp_path_factory.mktemp("formats-work")
    model = _tiny(work)
    made = {}
    torch.jit.script(model).save(str(work / "tiny_ts.pt"))
    made["torchscript"] = _package(store, work, "torchscript", work / "tiny_ts.pt")
    torch.save(model.state_dict(), work / "tiny_sd.pt")
    made["state_dict"] = _package(store, work, "state_dict", work / "tiny_sd.pt", work / "tiny_net.py")
    from safetensors.torch import save_file

    save_file(model.state_dict(), str(work / "tiny.safetensors"))
    made["safetensors"] = _package(store, work, "safetensors", work / "tiny.safetensors", work / "tiny_net.py")
    program = torch.export.export(model, (torch.zeros(2, 4),), dynamic_shapes=({0: torch.export.Dim("batch", max=1024)},))
    torch.export.save(program, str(work / "tiny.pt2"))
    made["export"] = _package(store, work, "export", work / "tiny.pt2")
    if HAS_ONNX:
        torch.onnx.export(model, (torch.zeros(2, 4),), str(work / "tiny.onnx"), dynamo=False, input_names=["x"],
                          output_names=["y"], dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}})
        made["onnx"] = _package(store, work, "onnx", work / "tiny.onnx")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(24, 4)).astype(np.float32)
    with torch.inference_mode():
        reference = torch.softmax(model(torch.from_numpy(x)), dim=-1).numpy()
    return store, work, made, x, reference


@pytest.fixture(scope="module")
def formats_server(formats, tmp_path_factory):
    from tests.conftest import OspreyProcess

    store, _, made, _, _ = formats
    proc = OspreyProcess(tmp_path_factory.mktemp("formats-server"), store, [f"{f}={a}" for f, a in made.items()])
    try:
        proc.wait_ready(timeout=180)
        yield proc
    finally:
        proc.stop()


@pytest.mark.parametrize("fmt", FORMATS)
def test_each_format_loads_and_answers_like_the_eager_model(formats_server, formats, fmt):
    _, _, made, x, reference = formats
    if fmt == "onnx" and not HAS_ONNX:
        pytest.skip("onnxruntime/onnx not installed (pip install 'osprey[onnx]')")
    assert fmt in made
    url = f"{formats_server.inference}/predictions/{fmt}"
    records = [dict(zip("abcd", map(float, row))) for row in x]
    singles = [httpx.post(url, json=r, timeout=30).json() for r in records]
    batched = [r.json() for r in concurrent_posts(url, records, workers=24)]
    for got in (singles, batched):
        probs = np.asarray([[g[label] for label in ("x", "y", "z")] for g in got])
        np.testing.assert_allclose(probs, reference, atol=1e-5)


def _bad_archives(store: Path, work: Path) -> dict[str, tuple[str, str]]:
    """name -> (archive, what the 400 must say)."""
    import torch

    model = _tiny(work)
    out = {}
    (work / "garbage.pt2").write_bytes(b"not a program")
    out["bad_pt2"] = (_package(store, work, "bad_pt2", work / "garbage.pt2"), "is not a torch.export program")
    torch.save(model, work / "pickled.pt")  # a whole pickled module, not a state_dict
    out["pickled"] = (_package(store, work, "pickled", work / "pickled.pt", work / "tiny_net.py"), "weights_only=True")
    torch.save({"other.weight": torch.zeros(2, 2)}, work / "other_sd.pt")
    out["mismatch"] = (_package(store, work, "mismatch", work / "other_sd.pt", work / "tiny_net.py"), "does not fit TinyNet")
    torch.save({"net.0.weight": torch.zeros(5, 4)}, work / "shape_sd.pt")
    out["wrong_shape"] = (_package(store, work, "wrong_shape", work / "shape_sd.pt", work / "tiny_net.py"), "does not fit TinyNet")
    (work / "garbage.safetensors").write_bytes(b"\x00" * 16)
    out["bad_safetensors"] = (_package(store, work, "bad_safetensors", work / "garbage.safetensors", work / "tiny_net.py"),
                              "not a readable safetensors file")
    (work / "garbage.pt").write_bytes(b"nope")
    out["bad_ts"] = (_package(store, work, "bad_ts", work / "garbage.pt"), "is not a TorchScript file")
    torch.jit.script(model).save(str(work / "ts_for_quant.pt"))
    out["quant_ts"] = (_package(store, work, "quant_ts", work / "ts_for_quant.pt", config={"quantize": "dynamic-int8"}),
                       "needs an eager model")
    out["bad_precision"] = (_package(store, work, "bad_precision", work / "ts_for_quant.pt", config={"precision": "fp8"}),
                            "precision must be one of")
    if HAS_ONNX:
        (work / "garbage.onnx").write_bytes(b"not onnx")
        out["bad_onnx"] = (_package(store, work, "bad_onnx", work / "garbage.onnx"), "is not a loadable ONNX model")
    return out


def test_a_format_that_cannot_load_is_400_at_registration_saying_why(osprey, tmp_path):
    store, work = tmp_path / "bad-store", tmp_path / "bad-work"
    store.mkdir()
    work.mkdir()
    bad = _bad_archives(store, work)
    srv = osprey(store=store)
    for name, (archive, needle) in bad.items():
        r = httpx.post(f"{srv.management}/models", params={"url": archive, "synchronous": "true"}, timeout=120)
        assert r.status_code == 400, (name, r.status_code, r.text)
        assert needle in r.json()["message"], (name, r.json()["message"])
    assert httpx.get(f"{srv.inference}/ping", timeout=10).json()["status"] == "Healthy"


# --- optimization switches -------------------------------------------------------------------
MAX_ACCURACY_LOSS = 0.02


@pytest.fixture(scope="module")
def optimized(tmp_path_factory):
    from tests.conftest import OspreyProcess

    examples = example_store("digits_cnn", "digits_lstm", "cancer_mlp", "text_transformer")
    store = tmp_path_factory.mktemp("optimized-store")
    models = []
    for base in ("digits_lstm", "cancer_mlp", "text_transformer"):
        models.append(variant(examples / f"{base}.mar", store, f"{base}_fp32"))
        models.append(variant(examples / f"{base}.mar", store, f"{base}_int8", quantize="dynamic-int8"))
        models.append(variant(examples / f"{base}.mar", store, f"{base}_bf16", precision="bf16"))
    models.append(variant(examples / "digits_cnn.mar", store, "digits_cnn_plain"))
    models.append(variant(examples / "digits_cnn.mar", store, "digits_cnn_cl", channels_last=True))
    models.append(variant(examples / "cancer_mlp.mar", store, "cancer_mlp_compiled", compile={"backend": "eager"}))
    models.append(variant(examples / "cancer_mlp.mar", store, "cancer_mlp_nobackend", compile={"backend": "no-such-backend"}))
    proc = OspreyProcess(tmp_path_factory.mktemp("optimized-server"), store, models)
    try:
        proc.wait_ready(timeout=180)
        yield proc, examples
    finally:
        proc.stop()


def _digits_answers(proc, model: str, pngs: list[bytes]) -> list[dict]:
    rs = concurrent_posts(f"{proc.inference}/predictions/{model}", pngs, workers=16)
    assert all(r.status_code == 200 for r in rs), [r.text for r in rs][:3]
    return [r.json() for r in rs]


def _accuracy(answers: list[dict], labels) -> float:
    return float(np.mean([next(iter(a)) == str(y) for a, y in zip(answers, labels)]))


def _identical(a: list[dict], b: list[dict]) -> bool:
    return all(x == y for x, y in zip(a, b))


def test_int8_and_bf16_digits_lstm_within_accuracy_loss(optimized):
    proc, examples = optimized
    from examples.digits_cnn import digit_png

    held = np.load(examples / "samples" / "digits_heldout.npz")
    pngs = [digit_png(g) for g in held["images"][:200]]
    labels = held["labels"][:200]
    answers = {v: _digits_answers(proc, f"digits_lstm_{v}", pngs) for v in ("fp32", "int8", "bf16")}
    acc = {v: _accuracy(a, labels) for v, a in answers.items()}
    assert acc["fp32"] >= 0.9
    for v in ("int8", "bf16"):
        assert acc[v] >= acc["fp32"] - MAX_ACCURACY_LOSS, acc
        assert not _identical(answers[v], answers["fp32"]), f"{v}: the switch changed nothing"


def test_int8_and_bf16_tabular_and_transformer_within_accuracy_loss(optimized):
    proc, examples = optimized
    records = json.loads((examples / "samples" / "cancer_records.json").read_text())
    y = np.load(examples / "samples" / "cancer_heldout.npz")["y"]
    names = ["malignant", "benign"]
    held = json.loads((examples / "samples" / "texts_heldout.json").read_text())
    for base, body, truth in (("cancer_mlp", records, [names[i] for i in y]),
                              ("text_transformer", held["texts"], held["labels"])):
        answers, acc = {}, {}
        for v in ("fp32", "int8", "bf16"):
            r = httpx.post(f"{proc.inference}/predictions/{base}_{v}", json=body, timeout=120)
            assert r.status_code == 200, r.text
            answers[v] = r.json()
            acc[v] = float(np.mean([next(iter(a)) == t for a, t in zip(answers[v], truth)]))
        assert acc["fp32"] >= 0.85, (base, acc)
        for v in ("int8", "bf16"):
            assert acc[v] >= acc["fp32"] - MAX_ACCURACY_LOSS, (base, acc)
            assert not _identical(answers[v], answers["fp32"]), f"{base} {v}: the switch changed nothing"


def test_channels_last_and_compile_answer_like_the_plain_model(optimized):
    proc, examples = optimized
    pngs = [(examples / "samples" / f"digit_{d}.png").read_bytes() for d in range(10)]
    plain, cl = _digits_answers(proc, "digits_cnn_plain", pngs), _digits_answers(proc, "digits_cnn_cl", pngs)
    for a, b in zip(plain, cl):
        assert next(iter(a)) == next(iter(b))
        for k in set(a) & set(b):
            assert abs(a[k] - b[k]) <= 1e-4
    records = json.loads((examples / "samples" / "cancer_records.json").read_text())[:16]
    base = httpx.post(f"{proc.inference}/predictions/cancer_mlp_fp32", json=records, timeout=60).json()
    for name in ("cancer_mlp_compiled", "cancer_mlp_nobackend"):
        got = httpx.post(f"{proc.inference}/predictions/{name}", json=records, timeout=120).json()
        for a, b in zip(base, got):
            for k in a:
                assert abs(a[k] - b[k]) <= 1e-5
    assert "running the model eagerly" in proc.log()  # the unknown backend fell back, with a warning
