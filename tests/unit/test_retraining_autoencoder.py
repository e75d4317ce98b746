"""Retraining an autoencoder (digits_autoencoder, the ``anomaly`` handler): its entry point
fine-tunes on production rows' inputs, and the gate judges it by the handler's mean
reconstruction error (lower is better; labels are not used).

The production digits are *inverted* (16 - value): the champion reconstructs them badly;
fine-tuned on them, the challenger's held-out reconstruction error falls by far more than
the gate's 1 %. The reference (normal) digits -- the golden set -- reconstruct about 30 %
worse afterwards, which the default ``max_regression`` (0.02) would reject; the test allows 0.5."""

from __future__ import annotations

import numpy as np

from server.retraining.data import split_rows
from server.retraining.gate import evaluate, gate_config
from server.retraining.package import stage
from server.retraining.training import run_training
from tests.builtin_models import example_store


def _inverted_rows() -> list[dict]:
    from examples.common import split
    from examples.digits_cnn import load_data

    images, labels = load_data()
    _, x_te, _, _ = split(images, labels, seed=0)
    return [{"rid": f"r{i}", "ts": float(i), "inputs": {"body": (16.0 - g).reshape(-1).tolist()}, "label": 0}
            for i, g in enumerate(x_te)]


def test_digits_autoencoder_retrains_on_shifted_digits_and_passes_the_gate(tmp_path):
    store = example_store("digits_autoencoder")
    mar = store / "digits_autoencoder.mar"
    train, hold = split_rows(_inverted_rows(), 0.3, seed=0)
    res = run_training(mar, train, tmp_path / "out")
    assert res.entry_point == "examples.digits_autoencoder:retrain" and res.weights.name == "digits_autoencoder.pt"
    assert res.validation["task"] == "autoencoder" and res.validation["reconstruction_error"] > 0
    assert res.config["handler"]["threshold"] > 0  # recomputed for the new model
    challenger = stage(mar, res.weights, tmp_path / "chal", version="2.0", config_overrides=res.config,
                       reference=res.reference)
    gate = evaluate(mar, challenger, hold, gate_cfg={"max_regression": 0.5, "max_latency_ratio": 10})
    h = gate.numbers["holdout"]
    assert gate.numbers["metric"] == "reconstruction_error" and gate.numbers["direction"] == "lower"
    assert h["scored"] == len(hold)
    assert h["challenger"]["reconstruction_error"] < h["champion"]["reconstruction_error"] * 0.5 and h["change"] > 0.5
    assert gate.numbers["golden"]["rows"] == 500  # the reference digits (targets: 0, normal)
    assert -0.5 < gate.numbers["golden"]["change"] < 0  # normal digits a little worse (about 30 %): allowed here
    assert gate.passed, gate.reasons
    assert gate_config({"metric": "reconstruction_error"}).metric == "reconstruction_error"
