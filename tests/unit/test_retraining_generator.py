"""Retraining a conditional generator (digits_vae, the ``generator`` handler): feedback is the
class a viewer recognised in a sample; the entry point fine-tunes the whole CVAE on the real
digits plus the production samples relabelled in hindsight; the gate judges both models'
answers (the PNGs a client gets) with the archive's scorer, ``judged_accuracy``.

The champion is damaged the cheap way: classes 3 and 8 swapped in the label embeddings of its
decoder and encoder (a CVAE trained with those labels swapped), so asked for an 8 it draws a 3.
The viewers are a k-nearest-neighbours classifier on the real digits (not the judge, a logistic
regression), reading the PNGs the damaged champion answered."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from server.core.archive import open_archive
from server.retraining.data import split_rows
from server.retraining.gate import evaluate
from server.retraining.package import stage
from server.retraining.scoring import ScorerError
from server.retraining.serving import LoadedModel
from server.retraining.training import TrainingError, run_training
from tests.builtin_models import example_store

SWAP = (3, 8)


def _swapped(src: Path, dest: Path) -> Path:
    """A copy of the archive folder ``src`` whose CVAE has classes 3 and 8 swapped."""
    shutil.copytree(src, dest)
    for name in ("digits_vae_decoder.pt", "digits_vae_encoder.pt"):
        m = torch.jit.load(str(dest / name))
        with torch.no_grad():
            w = m.label.weight
            w[list(SWAP)] = w[list(SWAP[::-1])].clone()
        m.save(str(dest / name))
    return dest


def _viewers():
    from sklearn.neighbors import KNeighborsClassifier

    from examples.digits_cnn import load_data

    images, labels = load_data()
    return KNeighborsClassifier(3).fit(images.reshape(len(images), -1) / 16.0, labels)


def _recognised(archive: Path, rows: list[dict]) -> list[int]:
    """What the viewers recognise in the PNG the model answers each row."""
    from PIL import Image

    with LoadedModel(archive) as m:
        answers, errors = m.answer(rows)
    assert not errors
    pixels = [np.asarray(Image.open(io.BytesIO(a.body)).convert("L").resize((8, 8), Image.Resampling.BOX)) / 255.0
              for a in answers]
    return _viewers().predict(np.stack(pixels).reshape(len(rows), -1)).tolist()


@pytest.fixture(scope="module")
def champion(tmp_path_factory):
    mar = example_store("digits_vae") / "digits_vae.mar"
    opened = open_archive(mar)
    try:
        return _swapped(Path(opened.model_dir), tmp_path_factory.mktemp("vae") / "champion")
    finally:
        opened.cleanup()


def _rows(champion: Path, n: int = 200) -> list[dict]:
    rows = [{"rid": f"r{i}", "ts": float(i), "inputs": {"body": json.dumps({"seed": 1000 + i, "class": i % 10}).encode()}}
            for i in range(n)]
    for i, (row, seen) in enumerate(zip(rows, _recognised(champion, rows))):
        row["label"] = str(seen) if i % 2 else seen  # as feedback sends it: a class by name or index
    return rows


def test_digits_vae_retrains_on_recognised_classes_and_passes_the_gate_on_judged_accuracy(champion, tmp_path):
    rows = _rows(champion)
    asked = np.array([i % 10 for i in range(len(rows))])
    seen = np.array([int(r["label"]) for r in rows])
    assert np.mean(seen[asked == 8] == 3) > 0.8 and np.mean(seen[asked == 3] == 8) > 0.8  # the damage, as viewers see it
    assert np.mean(seen[(asked != 3) & (asked != 8)] == asked[(asked != 3) & (asked != 8)]) > 0.9
    train, hold = split_rows(rows, 0.3, seed=0)
    res = run_training(champion, train, tmp_path / "out")
    assert res.entry_point == "examples.digits_vae:retrain" and res.weights.name == "digits_vae_decoder.pt"
    assert set(res.files) == {"digits_vae_encoder.pt"} and res.files["digits_vae_encoder.pt"].is_file()
    assert res.metrics["relabelled"] >= 15 and res.metrics["production_samples"] == len(train) - res.validation_rows
    v = res.validation  # scored by the archive's judge through the handler
    assert v["task"] == "generator" and v["metric"] == "judged_accuracy" and v["higher_is_better"] is True
    assert v["judged_accuracy"] > 0.95 and v["rows"] == res.validation_rows

    challenger = stage(champion, res.weights, tmp_path / "chal", version="2.0", files=res.files)
    assert (challenger / "digits_vae_encoder.pt").read_bytes() == res.files["digits_vae_encoder.pt"].read_bytes()
    gate = evaluate(champion, challenger, hold, gate_cfg={"max_latency_ratio": 10})
    n = gate.numbers
    assert n["metric"] == "judged_accuracy" and n["direction"] == "higher" and n["task"] == "generator"
    assert n["scorer"] == "examples.digits_vae:judge"
    h, g = n["holdout"], n["golden"]
    assert h["scored"] == len(hold) and g["rows"] == 500  # the golden set: reference.npz's [seed, class] requests
    assert 0.7 < h["champion"]["judged_accuracy"] < 0.9 and h["challenger"]["judged_accuracy"] > 0.95
    assert 0.7 < g["champion"]["judged_accuracy"] < 0.9 and g["challenger"]["judged_accuracy"] > 0.95
    assert gate.passed, gate.reasons

    # the other way round: the damaged model as a challenger to the repaired one is rejected
    worse = evaluate(challenger, champion, hold, [], gate_cfg={"max_latency_ratio": 10})
    assert not worse.passed and worse.numbers["holdout"]["change"] < -0.1
    assert any(r.startswith("holdout: judged_accuracy") and "does not improve" in r for r in worse.reasons)


def test_a_generator_without_a_scorer_fails_before_training_naming_what_is_missing(champion, tmp_path):
    bare = tmp_path / "bare"
    shutil.copytree(champion, bare)
    training = json.loads((bare / "training.json").read_text())
    del training["scorer"]
    (bare / "training.json").write_text(json.dumps(training))
    rows = [{"rid": "a", "inputs": {"body": b'{"seed": 1, "class": 2}'}, "label": 2}]
    with pytest.raises(ScorerError) as err:
        run_training(bare, rows * 3, tmp_path / "out")
    msg = str(err.value)
    assert isinstance(err.value, TrainingError)
    assert "digits_vae is a generator" in msg and "needs a scorer" in msg and '"scorer"' in msg
    assert "training.json" in msg and "retraining.gate.scorer" in msg
    assert not any((tmp_path / "out").glob("*.pt"))  # nothing was trained
    with pytest.raises(ScorerError, match="needs a scorer"):
        evaluate(bare, bare, rows, [])
    # named in model-config.yaml instead (retraining.gate.scorer), it is used
    res = evaluate(bare, bare, rows, [], gate_cfg={"scorer": "examples.digits_vae:judge", "max_latency_ratio": 10})
    assert res.numbers["metric"] == "judged_accuracy" and res.numbers["holdout"]["champion"]["rows"] == 1


def test_bad_files_and_a_bad_scorer_are_errors_naming_them(champion, tmp_path):
    arch = tmp_path / "arch"
    shutil.copytree(champion, arch)
    (arch / "train_odd.py").write_text(
        "import shutil\n\n"
        "def escape(ctx):\n"
        "    p = ctx.out_dir / 'digits_vae_decoder.pt'\n"
        "    shutil.copy(ctx.archive_dir / 'digits_vae_decoder.pt', p)\n"
        "    return {'weights': p, 'files': {'../judge.npz': p}}\n\n"
        "def short(rows, answers, judge_dir):\n"
        "    return {'metric': 'odd', 'values': [1.0]}\n\n"
        "def nan(rows, answers, judge_dir):\n"
        "    return {'metric': 'odd', 'values': [float('nan')] * len(rows)}\n")
    rows = [{"rid": f"r{i}", "inputs": {"body": b'{"seed": 1, "class": 2}'}, "label": 2} for i in range(3)]
    with pytest.raises(TrainingError, match=r"train_odd:escape: \"files\" key '../judge.npz' must be a plain file name"):
        run_training(arch, rows, tmp_path / "a", entry_point="train_odd:escape")
    with pytest.raises(ScorerError, match="scorer train_odd:short returned 1 values for 3 rows"):
        evaluate(arch, arch, rows, [], gate_cfg={"scorer": "train_odd:short"})
    with pytest.raises(ScorerError, match="scorer train_odd:nan: value 0 is nan, not a finite number or None"):
        evaluate(arch, arch, rows, [], gate_cfg={"scorer": "train_odd:nan"})
    with pytest.raises(ScorerError, match="scorer 'train_odd:absent': module 'train_odd'.*has no 'absent'"):
        evaluate(arch, arch, rows, [], gate_cfg={"scorer": "train_odd:absent"})
