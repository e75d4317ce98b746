"""``digits_vae``: a conditional VAE on the 8x8 digits; its decoder is served by ``generator``.

``{"seed": 7, "class": 3}`` draws z ~ N(0, I) with that seed and decodes a "3" as a PNG.
Held-out metrics: reconstruction MSE/MAE of held-out digits (pixels in 0..1), and
``judged_accuracy``: how often the *judge*, a logistic regression trained on the real
training digits, recognizes the asked-for class in generated samples (with precision,
recall, F1). Format: TorchScript (the decoder; the encoder rides along for retraining).

The archive carries what retraining needs: ``digits_vae_encoder.pt`` (the CVAE's encoder,
TorchScript: the whole CVAE is fine-tuned), ``judge.npz`` (the judge's coefficients: the
gate's scorer, :func:`judge`) and ``reference.npz``: ``inputs`` (``[seed, class]`` rows,
the golden set's requests and the drift reference), ``targets`` (their classes), ``outputs``
(the samples drawn for them, 0..255) and ``images`` / ``image_classes`` (the real training
digits, 0..16).

Feedback for a generator: the class a viewer (or a downstream classifier) recognised in the
sample it got. Live quality is then how often that is the class asked for; :func:`retrain`
learns from those labels by hindsight relabelling.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .common import (ExampleResult, classification_metrics, fit, package_example, regression_metrics, seed_everything,
                     split)
from .digits_cnn import load_data
from .networks.digits_vae import DigitsDecoder, DigitsEncoder

__all__ = ["NAME", "LATENT", "train", "retrain", "judge", "build", "reference_request", "HANDLER_CONFIG",
           "ENCODER_FILE", "JUDGE_FILE"]

NAME = "digits_vae"
SEED = 0
EPOCHS = 40
LATENT = 8
GOLDEN = 500  # [seed, class] requests in reference.npz: the golden set
ENCODER_FILE, DECODER_FILE, JUDGE_FILE = "digits_vae_encoder.pt", "digits_vae_decoder.pt", "judge.npz"
METRIC = "judged_accuracy"
HANDLER_CONFIG = {"latent_dim": LATENT, "num_classes": 10, "output_range": [0.0, 1.0], "image_shape": [8, 8],
                  "upscale": 4, "max_samples": 64}


def _cvae(latent: int = LATENT, classes: int = 10):
    import torch

    class CVAE(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder, self.decoder = DigitsEncoder(latent, classes), DigitsDecoder(latent, classes)

        def forward(self, x, cls):
            mu, logvar = self.encoder(x, cls)
            z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar) if self.training else mu
            return self.decoder(z, cls).reshape(len(x), -1), mu, logvar

    return CVAE()


def _loss(out, x):
    import torch

    recon, mu, logvar = out
    bce = torch.nn.functional.binary_cross_entropy(recon, x, reduction="sum")
    kl = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())
    return (bce + kl) / len(x)


def train(images: np.ndarray, labels: np.ndarray, *, seed: int = SEED, epochs: int = EPOCHS):
    """The build's training: images N x 8 x 8 in 0..16 and labels -> a CVAE (encoder, decoder) from scratch."""
    import torch

    seed_everything(seed)
    model = _cvae()
    x = torch.from_numpy(images.reshape(len(images), -1) / 16.0).float()
    return fit(model, (x, torch.from_numpy(labels)), None, _loss, epochs=epochs, batch_size=64, lr=3e-3, seed=seed)


def retrain(ctx) -> dict:
    """Retraining entry point (``server.retraining.training``): the champion's whole CVAE
    (its served decoder and the encoder the archive carries) fine-tuned on the real training
    digits of its reference.npz plus the production samples, **relabelled in hindsight**: a
    production row is a request (``{"seed", "class"}`` or a latent) and its label the class a
    viewer recognised in the sample the champion drew for it; that sample, redrawn here
    through the archive's own handler preprocessing (the same latent and asked class) and the
    champion's decoder, is a real example of the class *recognised* -- whatever was asked.
    Each production sample counts ``row_weight`` times.

    Hyperparameters: ``epochs`` (10), ``lr`` (3e-3), ``row_weight`` (2), ``seed``. Writes the
    decoder as TorchScript (what the ``generator`` handler loads) and the encoder beside it
    (``files``: the new version's encoder)."""
    import torch

    from server.retraining.data import resolve_labels

    hp = ctx.hyperparameters
    epochs, lr = int(hp.get("epochs", 10)), float(hp.get("lr", 3e-3))
    weight, seed = max(1, int(hp.get("row_weight", 2))), int(hp.get("seed", ctx.seed))
    handler = (ctx.config.raw or {}).get("handler") or {}
    latent, classes = int(handler.get("latent_dim", LATENT)), int(handler.get("num_classes", 10))
    name = ctx.manifest["model"]["modelName"]
    missing = [k for k in ("images", "image_classes") if k not in ctx.reference]
    if missing or not (ctx.archive_dir / ENCODER_FILE).is_file():
        what = f"reference.npz has no {' / '.join(missing)}" if missing else f"the archive has no {ENCODER_FILE}"
        raise ValueError(f"{name}: {what} (the real training digits and the CVAE's encoder it fine-tunes): "
                         "rebuild the archive with `osprey examples --only digits_vae`")
    cvae = _cvae(latent, classes)
    cvae.encoder.load_state_dict(torch.jit.load(str(ctx.archive_dir / ENCODER_FILE), map_location="cpu").state_dict())
    cvae.decoder.load_state_dict(torch.jit.load(str(ctx.archive_dir / ctx.manifest["model"]["serializedFile"]),
                                                map_location="cpu").state_dict())
    real = np.asarray(ctx.reference["images"], dtype=np.float32).reshape(len(ctx.reference["images"]), -1) / 16.0
    x, y = torch.from_numpy(real), torch.from_numpy(np.asarray(ctx.reference["image_classes"], dtype=np.int64))
    relabelled = n_new = 0
    if ctx.rows:
        z, asked = ctx.preprocess(ctx.rows)  # the handler's draw: the latents and classes the champion decoded
        labels = []
        for r in ctx.rows:  # a request of k samples has a label per sample
            lab = r.get("label")
            labels += [dict(r, label=v) for v in lab] if isinstance(lab, list) else [r]
        if len(labels) != len(z):
            raise ValueError(f"{len(ctx.rows)} production rows drew {len(z)} samples but have {len(labels)} labels "
                             "(a request of k samples needs a list of k recognised classes)")
        seen = torch.tensor(resolve_labels(labels, "classification", [str(c) for c in range(classes)]))
        with torch.inference_mode():
            samples = cvae.decoder(z, asked).reshape(len(z), -1)
        relabelled, n_new = int((seen != asked).sum()), len(z)
        x = torch.cat([x] + [samples.clone()] * weight)
        y = torch.cat([y] + [seen] * weight)
    ctx.log(f"{name}: fine-tuning the CVAE on {len(real)} real digits and {n_new} production samples (x{weight}; "
            f"{relabelled} recognised as another class than asked, relabelled), {epochs} epochs")
    seed_everything(seed)
    cvae = fit(cvae, (x, y), None, _loss, epochs=epochs, batch_size=64, lr=lr, seed=seed,
               on_epoch=lambda done, total: ctx.progress(done / total, f"epoch {done}/{total}"))
    with torch.inference_mode():
        loss = float(_loss(cvae(x[:len(real)], y[:len(real)]), x[:len(real)]))
    weights, encoder = ctx.out_dir / DECODER_FILE, ctx.out_dir / ENCODER_FILE
    torch.jit.script(cvae.decoder.eval()).save(str(weights))
    torch.jit.script(cvae.encoder.eval()).save(str(encoder))
    return {"weights": weights, "files": {ENCODER_FILE: encoder},
            "metrics": {"loss_real_digits": round(loss, 4), "production_samples": n_new, "relabelled": relabelled}}


def _judge_images(images: np.ndarray, judge_dir: Path) -> np.ndarray:
    """The judge's class for each image (N x H x W or N x H*W, pixels in 0..1)."""
    with np.load(Path(judge_dir) / JUDGE_FILE, allow_pickle=False) as j:
        coef, intercept = j["coef"], j["intercept"]
    x = np.asarray(images, dtype=np.float64).reshape(len(images), -1)
    return (x @ coef.T + intercept).argmax(axis=1)


def _png_pixels(data: bytes, shape: tuple[int, int]) -> np.ndarray:
    """A PNG as served (8-bit, upscaled) back at the model's size, pixels in 0..1."""
    import io

    from PIL import Image

    img = Image.open(io.BytesIO(data)).convert("L")
    if img.size != (shape[1], shape[0]):
        img = img.resize((shape[1], shape[0]), Image.Resampling.BOX)
    return np.asarray(img, dtype=np.float64) / 255.0


def _asked(row: dict) -> int | None:
    """The class a row's request asked for, when it names one."""
    import json

    inputs = row.get("inputs") or {}
    body = inputs.get("body", inputs.get("data"))
    if isinstance(body, (bytes, bytearray)):
        try:
            body = json.loads(body)
        except ValueError:
            return None
    cls = body.get("class") if isinstance(body, dict) else None
    return cls if isinstance(cls, int) and not isinstance(cls, bool) else None


def judge(rows: list, answers: list, judge_dir: Path) -> dict:
    """The gate's scorer (``training.json`` ``"scorer"``, see :mod:`server.retraining.scoring`):
    ``judged_accuracy``, per row the share of the samples the model answered (PNG, or base64
    PNGs in JSON) that the judge -- the logistic regression in the archive's ``judge.npz``,
    trained on the real training digits -- recognises as the class asked for (the JSON's
    ``classes``, the ``x-osprey-class`` header, or the request's ``class``). None: no answer,
    or no asked class to compare with."""
    import base64
    import json

    with np.load(Path(judge_dir) / JUDGE_FILE, allow_pickle=False) as j:
        shape = tuple(int(d) for d in j["image_shape"])
    values: list = []
    for row, ans in zip(rows, answers):
        if ans is None:
            values.append(None)
            continue
        if str(ans.content_type).startswith("image/"):
            header = (ans.headers or {}).get("x-osprey-class")
            pngs, asked = [ans.body], [int(header) if header is not None else _asked(row)]
        else:
            doc = json.loads(ans.body)
            pngs, asked = [base64.b64decode(b) for b in doc.get("images") or []], list(doc.get("classes") or [])
        if not pngs or len(asked) != len(pngs) or any(c is None for c in asked):
            values.append(None)
            continue
        seen = _judge_images(np.stack([_png_pixels(p, shape) for p in pngs]), judge_dir)
        values.append(float(np.mean(seen == np.asarray(asked))))
    return {"metric": METRIC, "values": values, "higher_is_better": True}


def _draw(decoder, requests: np.ndarray) -> np.ndarray:
    """What the generator handler draws for ``[seed, class]`` requests (pixels in 0..1)."""
    import torch

    z = torch.cat([torch.randn(1, LATENT, generator=torch.Generator().manual_seed(int(s))) for s, _ in requests])
    with torch.inference_mode():
        return decoder(z, torch.from_numpy(requests[:, 1].astype(np.int64))).numpy()


def build(out: Path, work: Path) -> ExampleResult:
    import torch
    from sklearn.linear_model import LogisticRegression

    images, labels = load_data()
    x_tr, x_te, y_tr, y_te = split(images, labels, seed=SEED)
    cvae = train(x_tr, y_tr)
    flat_te = torch.from_numpy(x_te.reshape(len(x_te), -1) / 16.0).float()
    with torch.inference_mode():
        recon = cvae(flat_te, torch.from_numpy(y_te))[0].numpy()
    judge_lr = LogisticRegression(max_iter=2000).fit(x_tr.reshape(len(x_tr), -1) / 16.0, y_tr)
    np.savez_compressed(work / JUDGE_FILE, coef=judge_lr.coef_, intercept=judge_lr.intercept_,
                        image_shape=np.array([8, 8]))
    # the golden set: [seed, class] requests as clients send them, and what the decoder draws for them
    golden = np.stack([np.arange(GOLDEN), np.arange(GOLDEN) % 10], axis=1).astype(np.int64)
    drawn = _draw(cvae.decoder, golden)
    pixels = np.rint(drawn * 255) / 255  # as the PNGs carry them
    generated = classification_metrics(golden[:, 1], _judge_images(pixels, work))
    metrics = {METRIC: generated["accuracy"],
               **{f"reconstruction_{k}": v for k, v in regression_metrics(flat_te.numpy(), recon).items()
                  if k != "n_heldout"}, "n_heldout": len(x_te),
               "units": "reconstruction: pixels in 0..1",
               "generated": {**generated, "judge": "logistic regression trained on the training digits (judge.npz)",
                             "samples": f"{GOLDEN} golden requests [seed, class]"}}

    torch.jit.script(cvae.decoder.eval()).save(str(work / DECODER_FILE))
    torch.jit.script(cvae.encoder.eval()).save(str(work / ENCODER_FILE))
    np.savez_compressed(work / "reference.npz", inputs=golden, targets=golden[:, 1],
                        outputs=np.rint(drawn * 255).astype(np.uint8),
                        images=x_tr.astype(np.uint8), image_classes=y_tr.astype(np.int64))
    archive = package_example(
        name=NAME, out=out, work=work, handler="generator", serialized_file=work / DECODER_FILE,
        extra_files=[work / "reference.npz", work / ENCODER_FILE, work / JUDGE_FILE],
        config={"batchSize": 16, "maxBatchDelay": 5, "handler": HANDLER_CONFIG}, metrics=metrics,
        training={"entry_point": "examples.digits_vae:retrain", "scorer": "examples.digits_vae:judge",
                  "data": "sklearn.datasets.load_digits", "seed": SEED, "epochs": EPOCHS, "latent_dim": LATENT,
                  "heldout_fraction": 0.2, "format": "torchscript (decoder; encoder in digits_vae_encoder.pt)",
                  "labels": "feedback: the class a viewer recognised in the sample"})
    return ExampleResult(archive, {METRIC: metrics[METRIC], "reconstruction_mse": metrics["reconstruction_mse"],
                                   "reconstruction_mae": metrics["reconstruction_mae"]})


def reference_request(row: np.ndarray) -> dict:
    """A reference row (``[seed, class]``) as a client sends it."""
    return {"seed": int(row[0]), "class": int(row[1])}
