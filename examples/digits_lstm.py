"""``digits_lstm``: an LSTM reading each 8x8 digit row by row, served by ``image_classifier``.

A sequence model on the same data and the same image handler settings as ``digits_cnn``
(so ``DIR/samples/digit_<d>.png`` work for both). Format: eager -- model file +
``state_dict`` (``torch.load(weights_only=True)``), which ``quantize: dynamic-int8`` needs.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .common import ExampleResult, classification_metrics, fit, package_example, predict, seed_everything, split, write_reference
from .digits_cnn import HANDLER_CONFIG, load_data, retrain_digits
from .networks import digits_lstm as network

__all__ = ["NAME", "train", "retrain", "build"]

NAME = "digits_lstm"
SEED = 0
EPOCHS = 20


def train(images: np.ndarray, labels: np.ndarray, *, seed: int = SEED, epochs: int = EPOCHS):
    """Training entry point: images N x 8 x 8 in 0..16, labels 0..9 -> a trained DigitsLSTM."""
    import torch

    seed_everything(seed)
    model = network.DigitsLSTM()
    x = torch.from_numpy(images[:, None] / 16.0).float()
    return fit(model, (x,), torch.from_numpy(labels), torch.nn.functional.cross_entropy, epochs=epochs,
               batch_size=32, lr=5e-3, seed=seed)


def retrain(ctx) -> dict:
    """Retraining entry point (``server.retraining.training``): a fresh DigitsLSTM on the
    reference digits plus the labelled production rows (as ``examples.digits_cnn.retrain``);
    hyperparameters ``epochs`` (20), ``lr`` (5e-3), ``row_weight`` (2). Writes a state_dict."""
    import torch

    def save(model, out_dir: Path) -> Path:
        path = out_dir / "digits_lstm.pt"
        torch.save(model.state_dict(), path)
        return path

    return retrain_digits(ctx, network.DigitsLSTM, save, epochs=EPOCHS, lr=5e-3)


def build(out: Path, work: Path) -> ExampleResult:
    import torch

    images, labels = load_data()
    x_tr, x_te, y_tr, y_te = split(images, labels, seed=SEED)
    model = train(x_tr, y_tr)
    pred = predict(model, torch.from_numpy(x_te[:, None] / 16.0).float()).argmax(1).numpy()
    metrics = classification_metrics(y_te, pred)
    torch.save(model.state_dict(), work / "digits_lstm.pt")
    (work / "index_to_name.json").write_text(json.dumps({str(i): str(i) for i in range(10)}))
    probs = torch.softmax(predict(model, torch.from_numpy(x_tr[:, None] / 16.0).float()), 1).numpy()
    write_reference(work, x_tr, probs, y_tr)
    archive = package_example(
        name=NAME, out=out, work=work, handler="image_classifier", serialized_file=work / "digits_lstm.pt",
        model_file=Path(network.__file__), extra_files=[work / "index_to_name.json", work / "reference.npz"],
        config={"batchSize": 16, "maxBatchDelay": 5, "handler": HANDLER_CONFIG}, metrics=metrics,
        training={"entry_point": "examples.digits_lstm:retrain", "data": "sklearn.datasets.load_digits",
                  "seed": SEED, "epochs": EPOCHS, "heldout_fraction": 0.2, "format": "eager state_dict"})
    return ExampleResult(archive, metrics)


def reference_request(grid: np.ndarray) -> bytes:
    """A reference row (an 8x8 grid of 0..16) as a client sends it: a PNG."""
    from .digits_cnn import digit_png

    return digit_png(grid)
