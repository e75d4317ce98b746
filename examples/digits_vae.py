"""``digits_vae``: a conditional VAE on the 8x8 digits; its decoder is served by ``generator``.

``{"seed": 7, "class": 3}`` draws z ~ N(0, I) with that seed and decodes a "3" as a PNG.
Held-out metrics: reconstruction MSE/MAE of held-out digits (pixels in 0..1), and how
often a classifier trained on real digits (logistic regression) recognizes the asked-for
class in generated samples (accuracy, precision, recall, F1). Format: TorchScript.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .common import (ExampleResult, classification_metrics, fit, package_example, regression_metrics, seed_everything,
                     split, write_reference)
from .digits_cnn import load_data
from .networks.digits_vae import DigitsDecoder, DigitsEncoder

__all__ = ["NAME", "LATENT", "train", "build", "HANDLER_CONFIG"]

NAME = "digits_vae"
SEED = 0
EPOCHS = 40
LATENT = 8
HANDLER_CONFIG = {"latent_dim": LATENT, "num_classes": 10, "output_range": [0.0, 1.0], "image_shape": [8, 8],
                  "upscale": 4, "max_samples": 64}


def _cvae():
    import torch

    class CVAE(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder, self.decoder = DigitsEncoder(LATENT), DigitsDecoder(LATENT)

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
    """Training entry point: images N x 8 x 8 in 0..16 and labels -> the trained CVAE (encoder, decoder)."""
    import torch

    seed_everything(seed)
    model = _cvae()
    x = torch.from_numpy(images.reshape(len(images), -1) / 16.0).float()
    return fit(model, (x, torch.from_numpy(labels)), None, _loss, epochs=epochs, batch_size=64, lr=3e-3, seed=seed)


def build(out: Path, work: Path) -> ExampleResult:
    import torch
    from sklearn.linear_model import LogisticRegression

    images, labels = load_data()
    x_tr, x_te, y_tr, y_te = split(images, labels, seed=SEED)
    cvae = train(x_tr, y_tr)
    flat_te = torch.from_numpy(x_te.reshape(len(x_te), -1) / 16.0).float()
    with torch.inference_mode():
        recon = cvae(flat_te, torch.from_numpy(y_te))[0].numpy()
        gen = torch.Generator().manual_seed(SEED)
        asked = torch.arange(10).repeat_interleave(30)
        samples = cvae.decoder(torch.randn(len(asked), LATENT, generator=gen), asked).reshape(len(asked), -1).numpy()
    metrics = {**regression_metrics(flat_te.numpy(), recon), "n_heldout": len(x_te), "units": "pixels in 0..1"}
    judge = LogisticRegression(max_iter=2000).fit(x_tr.reshape(len(x_tr), -1) / 16.0, y_tr)
    metrics["generated"] = classification_metrics(asked.numpy(), judge.predict(samples))
    metrics["generated"]["judge"] = "logistic regression trained on the training digits"

    decoder = torch.jit.script(cvae.decoder.eval())
    decoder.save(str(work / "digits_vae_decoder.pt"))
    with torch.inference_mode():
        z_tr, _ = cvae.encoder(torch.from_numpy(x_tr.reshape(len(x_tr), -1) / 16.0).float(), torch.from_numpy(y_tr))
        out_tr = cvae.decoder(z_tr, torch.from_numpy(y_tr)).numpy()
    write_reference(work, z_tr.numpy(), out_tr, y_tr)  # decoder inputs (latent means) and outputs
    archive = package_example(
        name=NAME, out=out, work=work, handler="generator", serialized_file=work / "digits_vae_decoder.pt",
        extra_files=[work / "reference.npz"], config={"batchSize": 16, "maxBatchDelay": 5, "handler": HANDLER_CONFIG},
        metrics=metrics,
        training={"entry_point": "examples.digits_vae:train", "data": "sklearn.datasets.load_digits", "seed": SEED,
                  "epochs": EPOCHS, "latent_dim": LATENT, "heldout_fraction": 0.2, "format": "torchscript (decoder)"})
    return ExampleResult(archive, {k: v for k, v in metrics.items() if k != "generated"} | {
        "generated_accuracy": metrics["generated"]["accuracy"]})


def reference_request(z: np.ndarray) -> dict:
    """A reference row (a latent mean) as a client sends it."""
    return {"latent": [z.tolist()]}
