"""``osprey examples`` digits_cnn: trained, packaged, served, and answering the right digit.

Batched and one-by-one results must agree: top label identical and every probability
within 1e-5 (absolute), the tolerance of float32 convolutions computed in batches of
different sizes (1e-4 where the server runs on a GPU).
"""

from __future__ import annotations

import base64
import time
import json

import httpx
import numpy as np
import pytest
import torch

from examples.digits_cnn import digit_png, png_to_grid
from tests.builtin_models import concurrent_posts, example_store, mean_batch_size

TOL = 1e-4 if torch.cuda.is_available() else 1e-5


def test_examples_list_names_every_example_with_its_family():
    from examples.build import list_examples

    listed = dict(list_examples())
    assert listed["digits_cnn"].startswith("CNN")


def test_sample_pngs_read_back_as_the_digits_grid():
    store = example_store("digits_cnn")
    held = np.load(store / "samples" / "digits_heldout.npz")
    grid = held["images"][0]
    assert np.allclose(png_to_grid(digit_png(grid)), grid, atol=16 / 255)
    for d in range(10):
        png = (store / "samples" / f"digit_{d}.png").read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_digits_cnn_metrics_written_next_to_the_archive():
    store = example_store("digits_cnn")
    assert (store / "digits_cnn.mar").is_file()
    info = json.loads((store / "digits_cnn.metrics.json").read_text())
    held = info["heldout"]
    assert set(held) >= {"accuracy", "precision", "recall", "f1"}
    assert held["accuracy"] >= 0.95 and held["f1"] >= 0.95
    assert info["entry_point"] == "examples.digits_cnn:retrain"


def test_digits_cnn_served_answers_samples_and_batches_match_singles(osprey):
    store = example_store("digits_cnn")
    srv = osprey(models=["digits_cnn=digits_cnn.mar"], store=store)
    url = f"{srv.inference}/predictions/digits_cnn"

    # curl -T digit_3.png (a PUT with the raw bytes), for every sample digit
    for d in range(10):
        png = (store / "samples" / f"digit_{d}.png").read_bytes()
        r = httpx.put(url, content=png, timeout=30)
        assert r.status_code == 200, r.text
        out = r.json()
        assert len(out) == 3  # topk: 3 in the archive's model-config.yaml
        assert next(iter(out)) == str(d), out
        assert sum(out.values()) <= 1.0 + 1e-6

    # base64 in JSON gives the same answer as raw bytes
    png = (store / "samples" / "digit_5.png").read_bytes()
    raw = httpx.post(url, content=png, timeout=30).json()
    b64 = httpx.post(url, json={"data": base64.b64encode(png).decode()}, timeout=30).json()
    assert b64 == raw

    # held-out digits one by one, then all at once (batched), must agree
    held = np.load(store / "samples" / "digits_heldout.npz")
    images, labels = held["images"][:64], held["labels"][:64]
    pngs = [digit_png(g) for g in images]
    singles = [httpx.post(url, content=p, timeout=30).json() for p in pngs]
    batched = [r.json() for r in concurrent_posts(url, pngs, workers=32)]
    assert mean_batch_size(srv.metrics, "digits_cnn") > 1.0, "concurrent requests were never batched"
    for one, many in zip(singles, batched):
        assert next(iter(one)) == next(iter(many))
        for label in set(one) & set(many):
            assert abs(one[label] - many[label]) <= TOL
    accuracy = np.mean([int(next(iter(o))) == y for o, y in zip(singles, labels)])
    assert accuracy >= 0.9

    # not an image -> 400 naming the problem, and the server carries on
    r = httpx.post(url, content=b"certainly not a png", timeout=30)
    assert r.status_code == 400 and "image" in r.json()["message"]
    assert httpx.put(url, content=png, timeout=30).status_code == 200

    # monitored with no configuration, against the profile `osprey examples` put in the archive
    sent = 10 + 2 + 64 * 2 + 1
    deadline = time.monotonic() + 60
    while True:
        st = httpx.get(f"{srv.inference}/monitoring/digits_cnn", timeout=30).json()
        if st["requests"] >= sent or time.monotonic() > deadline:
            break
        time.sleep(0.05)  # polling the monitor's state, not timing anything
    assert st["reference"] == "archive" and st["requests"] >= sent and st["degraded"] is None
    assert st["quality"]["baseline"]["accuracy"] == pytest.approx(0.98, abs=0.02)  # training.json's held-out


def test_osprey_examples_cli_lists_builds_and_refuses_unknown(tmp_path):
    import subprocess
    import sys

    def run(*args):
        return subprocess.run([sys.executable, "-m", "server.cli", "examples", *args], capture_output=True, text=True,
                              timeout=300)

    listed = run("--list")
    assert listed.returncode == 0
    names = [line.split()[0] for line in listed.stdout.splitlines() if line.strip()]
    assert names == ["digits_cnn", "digits_lstm", "text_transformer", "minilm_embedding", "cancer_mlp",
                     "diabetes_mlp", "digits_vae", "digits_autoencoder"]
    assert "(tabular)" in listed.stdout and "(generator)" in listed.stdout and "(anomaly)" in listed.stdout

    bad = run("--out", str(tmp_path), "--only", "nope")
    assert bad.returncode == 2 and "unknown example" in bad.stderr

    built = run("--out", str(tmp_path), "--only", "cancer_mlp")
    assert built.returncode == 0, built.stderr
    assert "1/1 cancer_mlp done" in built.stderr  # the progress bar
    assert (tmp_path / "cancer_mlp.mar").is_file()
    info = json.loads((tmp_path / "cancer_mlp.metrics.json").read_text())
    assert info["heldout"]["accuracy"] >= 0.9 and info["entry_point"] == "examples.tabular:retrain_cancer"
    import zipfile

    with zipfile.ZipFile(tmp_path / "cancer_mlp.mar") as zf:
        members = set(zf.namelist())
        assert {"reference.npz", "training.json", "features.json", "MAR-INF/MANIFEST.json"} <= members
        training = json.loads(zf.read("training.json"))
    assert training["entry_point"] == "examples.tabular:retrain_cancer"
