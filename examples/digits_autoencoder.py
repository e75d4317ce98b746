"""``digits_autoencoder``: an autoencoder on the 8x8 digits, served by ``anomaly``.

The anomaly threshold is the 99th percentile of the training digits' reconstruction
errors, computed here and stored in the archive's model-config.yaml. Held-out metrics:
reconstruction MSE/MAE of held-out digits, and detection of anomalies -- held-out digits
with their pixels scrambled (same ink, no shape) mixed 1:1 with intact held-out digits --
as accuracy, precision, recall and F1 (positive = anomaly). Clients send 64 pixel values
in 0..16 (or an 8x8 nested array), or a digit image. Format: eager state_dict.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .common import (ExampleResult, classification_metrics, fit, package_example, predict, reference_sample,
                     regression_metrics, seed_everything, split, write_reference)
from .digits_cnn import digit_png, load_data
from .networks import digits_autoencoder as network

__all__ = ["NAME", "QUANTILE", "train", "retrain", "scramble", "build"]

NAME = "digits_autoencoder"
SEED = 0
EPOCHS = 60
QUANTILE = 0.99


def train(images: np.ndarray, *, seed: int = SEED, epochs: int = EPOCHS):
    """Training entry point: normal images N x 8 x 8 in 0..16 -> a DigitsAutoencoder."""
    import torch

    seed_everything(seed)
    x = torch.from_numpy(images.reshape(len(images), -1) / 16.0).float()
    return fit(network.DigitsAutoencoder(), (x,), None, torch.nn.functional.mse_loss, epochs=epochs,
               batch_size=32, lr=3e-3, seed=seed)


def retrain(ctx) -> dict:
    """Retraining entry point (``server.retraining.training``): the champion's autoencoder
    fine-tuned on the archive's reference digits plus the production rows' inputs (decoded by
    the archive's own handler: ``ctx.preprocess``; labels are not needed), each production
    row counted ``row_weight`` times; the anomaly threshold is recomputed (the ``QUANTILE`` of
    the new model's reconstruction errors on that training data) and returned as a
    model-config.yaml override.

    Hyperparameters: ``epochs`` (20), ``lr`` (1e-3), ``row_weight`` (2), ``seed``. Writes an
    eager state_dict (what the ``anomaly`` handler loads with the archive's model file)."""
    import torch

    hp = ctx.hyperparameters
    epochs, lr = int(hp.get("epochs", 20)), float(hp.get("lr", 1e-3))
    weight, seed = max(1, int(hp.get("row_weight", 2))), int(hp.get("seed", ctx.seed))
    flat = np.asarray(ctx.reference["inputs"], dtype=np.float32).reshape(len(ctx.reference["inputs"]), -1)
    n_ref = len(flat)
    if ctx.rows:
        x = ctx.preprocess(ctx.rows)  # the handler's view: N x 64 in model units (value / 16)
        flat = np.concatenate([flat, x.reshape(len(x), -1).numpy() * 16.0])
    repeat = np.concatenate([np.arange(n_ref)] + [np.arange(n_ref, len(flat))] * weight)
    ctx.log(f"{ctx.manifest['model']['modelName']}: fine-tuning on {n_ref} reference digits and "
            f"{len(flat) - n_ref} production rows (x{weight}), {epochs} epochs")
    seed_everything(seed)
    model = network.DigitsAutoencoder()
    state = torch.load(ctx.archive_dir / ctx.manifest["model"]["serializedFile"], map_location="cpu",
                       weights_only=True)
    model.load_state_dict(state)
    to_x = lambda a: torch.from_numpy(a / 16.0).float()  # noqa: E731
    model = fit(model, (to_x(flat[repeat]),), None, torch.nn.functional.mse_loss, epochs=epochs, batch_size=32,
                lr=lr, seed=seed, on_epoch=lambda done, total: ctx.progress(done / total, f"epoch {done}/{total}"))
    err = ((predict(model, to_x(flat)) - to_x(flat)) ** 2).mean(1).numpy()
    threshold = float(np.quantile(err[repeat], QUANTILE))
    metrics = {"threshold": round(threshold, 6)}
    if ctx.validation:
        xv = ctx.preprocess(ctx.validation).reshape(len(ctx.validation), -1).float()
        metrics["reconstruction_error"] = round(float(((predict(model, xv) - xv) ** 2).mean()), 6)
    path = ctx.out_dir / "digits_autoencoder.pt"
    torch.save(model.state_dict(), path)
    return {"weights": path, "metrics": metrics, "config": {"handler": {"threshold": threshold}},
            "reference": reference_sample(flat, np.zeros(len(flat), dtype=np.int64), err, seed=seed)}


def scramble(images: np.ndarray, seed: int = SEED) -> np.ndarray:
    """Each image with its pixels shuffled: the same ink, no digit shape."""
    rng = np.random.default_rng(seed)
    flat = images.reshape(len(images), -1).copy()
    for row in flat:
        rng.shuffle(row)
    return flat.reshape(images.shape)


def _errors(model, images: np.ndarray) -> np.ndarray:
    import torch

    x = torch.from_numpy(images.reshape(len(images), -1) / 16.0).float()
    return ((predict(model, x) - x) ** 2).mean(1).numpy()


def build(out: Path, work: Path) -> ExampleResult:
    import torch

    images, labels = load_data()
    x_tr, x_te, _, _ = split(images, labels, seed=SEED)
    model = train(x_tr)
    err_tr = _errors(model, x_tr)
    threshold = float(np.quantile(err_tr, QUANTILE))
    bad = scramble(x_te)
    err_te, err_bad = _errors(model, x_te), _errors(model, bad)
    truth = np.r_[np.zeros(len(x_te)), np.ones(len(bad))].astype(int)
    flagged = (np.r_[err_te, err_bad] > threshold).astype(int)
    flat_te = x_te.reshape(len(x_te), -1) / 16.0
    recon = predict(model, torch.from_numpy(flat_te).float()).numpy()
    metrics = {**classification_metrics(truth, flagged, average="binary"), **{
        f"reconstruction_{k}": v for k, v in regression_metrics(flat_te, recon).items() if k != "n_heldout"},
        "threshold": round(threshold, 6), "threshold_quantile": QUANTILE,
        "anomalies": "held-out digits with scrambled pixels, 1:1 with intact held-out digits"}
    torch.save(model.state_dict(), work / "digits_autoencoder.pt")
    # targets: 0 (normal) for each training digit, so the gate's golden set is the reference digits
    write_reference(work, x_tr.reshape(len(x_tr), -1), err_tr, np.zeros(len(x_tr), dtype=np.int64))
    (out / "samples").mkdir(parents=True, exist_ok=True)
    (out / "samples" / "scrambled_digit.png").write_bytes(digit_png(bad[0]))
    handler = {"threshold": threshold, "threshold_quantile": QUANTILE, "input_shape": [64], "mean": 0.0, "scale": 16.0,
               "image": {"mode": "L", "resize": [8, 8], "resample": "box", "scale": 255.0 / 16.0}}
    archive = package_example(
        name=NAME, out=out, work=work, handler="anomaly", serialized_file=work / "digits_autoencoder.pt",
        model_file=Path(network.__file__), extra_files=[work / "reference.npz"],
        config={"batchSize": 32, "maxBatchDelay": 5, "handler": handler}, metrics=metrics,
        training={"entry_point": "examples.digits_autoencoder:retrain", "data": "sklearn.datasets.load_digits",
                  "seed": SEED, "epochs": EPOCHS, "heldout_fraction": 0.2, "format": "eager state_dict",
                  "threshold": f"{QUANTILE:.0%} quantile of the training reconstruction errors"})
    return ExampleResult(archive, metrics)
