"""``digits_cnn``: a small CNN on scikit-learn's bundled 8x8 digits, served by ``image_classifier``.

Clients send images (PNG/JPEG). The archive's handler settings turn any image into the
8x8 grayscale grid the network was trained on: convert to ``L``, box-resize to 8x8, divide
by 255 (a digit rendered with ink = 255 * value / 16 reads back as value / 16). Sample
PNGs of held-out digits are written to ``DIR/samples/digit_<d>.png`` (32x32, white ink on
black, each 8x8 cell a 4x4 block), so ``curl -T DIR/samples/digit_3.png`` answers "3".

Format: TorchScript.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .common import (ExampleResult, classification_metrics, fit, package_example, predict, reference_sample,
                     seed_everything, split, write_reference)
from .networks.digits_cnn import DigitsCNN

__all__ = ["NAME", "HANDLER_CONFIG", "load_data", "train", "retrain", "retrain_digits", "build", "digit_png", "png_to_grid"]

NAME = "digits_cnn"
SEED = 0
EPOCHS = 12
SAMPLE_SCALE = 4  # 8x8 -> 32x32 sample PNGs

# The retraining loop's settings for this example (model-config.yaml ``retraining:``): a canary of
# 20% judged on 100 requests over at least 5 s, then 30 s of probation; the rest defaults.
RETRAINING = {"min_labels": 200, "cooldown": 600,
              "promotion": {"policy": "canary", "canary_share": 0.2, "min_requests": 100, "min_seconds": 5,
                            "max_seconds": 300, "probation": 30}}

HANDLER_CONFIG = {"mode": "L", "resize": [8, 8], "resample": "box", "scale": 255.0,
                  "mean": [0.0], "std": [1.0], "topk": 3}


def load_data() -> tuple[np.ndarray, np.ndarray]:
    """Digit images (N x 8 x 8, values 0..16) and labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.images.astype(np.float32), d.target.astype(np.int64)


def train(images: np.ndarray, labels: np.ndarray, *, seed: int = SEED, epochs: int = EPOCHS) -> DigitsCNN:
    """Training entry point: images N x 8 x 8 in 0..16, labels 0..9 -> a trained DigitsCNN."""
    import torch

    seed_everything(seed)
    model = DigitsCNN()
    x = torch.from_numpy(images[:, None] / 16.0).float()
    y = torch.from_numpy(labels)
    return fit(model, (x,), y, torch.nn.functional.cross_entropy, epochs=epochs, batch_size=32, lr=2e-3, seed=seed)


def retrain(ctx) -> dict:
    """Retraining entry point (``server.retraining.training``): a fresh DigitsCNN trained on the
    archive's reference digits plus the labelled production rows (decoded by the archive's own
    handler: ``ctx.dataset``), each production row counted ``row_weight`` times.

    Hyperparameters: ``epochs`` (12), ``lr`` (2e-3), ``row_weight`` (2), ``seed``. Writes
    TorchScript (what the archive's handler loads) and returns it with the training data as
    the new reference (8x8 grids in 0..16, as :func:`reference_request` sends them)."""
    import torch

    def save(model, out_dir: Path) -> Path:
        path = out_dir / "digits_cnn.pt"
        torch.jit.script(model).save(str(path))
        return path

    return retrain_digits(ctx, DigitsCNN, save, epochs=EPOCHS, lr=2e-3)


def retrain_digits(ctx, make_model, save, *, epochs: int, lr: float) -> dict:
    """Shared by the digits classifiers: train ``make_model()`` on the reference digits plus
    the production rows; ``save(model, out_dir) -> weights path``."""
    import torch

    hp = ctx.hyperparameters
    epochs, lr = int(hp.get("epochs", epochs)), float(hp.get("lr", lr))
    weight, seed = max(1, int(hp.get("row_weight", 2))), int(hp.get("seed", ctx.seed))
    grids = np.asarray(ctx.reference["inputs"], dtype=np.float32)  # N x 8 x 8 in 0..16
    labels = np.asarray(ctx.reference["targets"], dtype=np.int64)
    n_ref = len(grids)
    if ctx.rows:
        x, y = ctx.dataset(ctx.rows)  # the handler's view: N x 1 x 8 x 8 in 0..1, class indices
        grids = np.concatenate([grids, x[:, 0].numpy() * 16.0])
        labels = np.concatenate([labels, y.numpy()])
    repeat = np.concatenate([np.arange(n_ref)] + [np.arange(n_ref, len(grids))] * weight)
    ctx.log(f"{ctx.manifest['model']['modelName']}: training on {n_ref} reference digits and "
            f"{len(grids) - n_ref} production rows (x{weight}), {epochs} epochs")
    seed_everything(seed)
    to_x = lambda g: torch.from_numpy(g[:, None] / 16.0).float()  # noqa: E731
    model = fit(make_model(), (to_x(grids[repeat]),), torch.from_numpy(labels[repeat]),
                torch.nn.functional.cross_entropy, epochs=epochs, batch_size=32, lr=lr, seed=seed,
                on_epoch=lambda done, total: ctx.progress(done / total, f"epoch {done}/{total}"))
    metrics = {}
    if ctx.validation:
        xv, yv = ctx.dataset(ctx.validation)
        metrics = classification_metrics(yv.numpy(), predict(model, xv).argmax(1).numpy())
    path = save(model, ctx.out_dir)
    probs = torch.softmax(predict(model, to_x(grids)), 1).numpy()
    return {"weights": path, "metrics": metrics, "reference": reference_sample(grids, labels, probs, seed=seed)}


def digit_png(grid: np.ndarray, scale: int = SAMPLE_SCALE) -> bytes:
    """An 8x8 grid of 0..16 values as a grayscale PNG, each cell a ``scale`` x ``scale`` block."""
    import io

    from PIL import Image

    pixels = np.rint(np.clip(grid, 0, 16) * (255.0 / 16.0)).astype(np.uint8)
    img = Image.fromarray(pixels, mode="L").resize((8 * scale, 8 * scale), Image.Resampling.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def png_to_grid(data: bytes) -> np.ndarray:
    """The handler's view of a PNG: the 8x8 grid in 0..16 units (for checks)."""
    from handlers.builtin.image_classifier import ImageTransform

    return ImageTransform(HANDLER_CONFIG)(data)[0] * 16.0


def build(out: Path, work: Path) -> ExampleResult:
    import torch

    images, labels = load_data()
    x_tr, x_te, y_tr, y_te = split(images, labels, seed=SEED)
    model = train(x_tr, y_tr)
    logits_te = predict(model, torch.from_numpy(x_te[:, None] / 16.0).float())
    pred_te = logits_te.argmax(1).numpy()
    metrics = classification_metrics(y_te, pred_te)

    scripted = torch.jit.script(model)
    scripted.save(str(work / "digits_cnn.pt"))
    (work / "index_to_name.json").write_text(json.dumps({str(i): str(i) for i in range(10)}))
    probs_tr = torch.softmax(predict(model, torch.from_numpy(x_tr[:, None] / 16.0).float()), 1).numpy()
    write_reference(work, x_tr, probs_tr, y_tr)

    # Sample PNGs: per digit, the first held-out image the model gets right.
    samples = out / "samples"
    samples.mkdir(parents=True, exist_ok=True)
    written = {}
    for d in range(10):
        for i in np.flatnonzero(y_te == d):
            if pred_te[i] == d:
                (samples / f"digit_{d}.png").write_bytes(digit_png(x_te[i]))
                written[str(d)] = f"samples/digit_{d}.png"
                break
    heldout = out / "samples" / "digits_heldout.npz"
    np.savez_compressed(heldout, images=x_te, labels=y_te)

    archive = package_example(
        name=NAME, out=out, work=work, handler="image_classifier", serialized_file=work / "digits_cnn.pt",
        extra_files=[work / "index_to_name.json", work / "reference.npz"],
        config={"batchSize": 16, "maxBatchDelay": 5, "handler": HANDLER_CONFIG, "retraining": RETRAINING},
        metrics=metrics,
        training={"entry_point": "examples.digits_cnn:retrain", "data": "sklearn.datasets.load_digits",
                  "seed": SEED, "epochs": EPOCHS, "heldout_fraction": 0.2, "format": "torchscript",
                  "samples": written})
    return ExampleResult(archive, metrics, {"samples": written})


def reference_request(grid: np.ndarray) -> bytes:
    """A reference row (an 8x8 grid of 0..16) as a client sends it: a PNG."""
    return digit_png(grid)
