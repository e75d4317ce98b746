"""Traffic for the drift benchmark: held-out requests of the examples, and shifted ones.

In-distribution traffic is drawn (with replacement) from each example's held-out split, the
rows the model was never trained on and that are not in its reference sample. Shifts are the
ones issue 11 names: digits inverted, with Gaussian noise, rotated 30 degrees, a class-prior
shift (only three digits); cancer_mlp with one feature scaled by 1.3; diabetes_mlp with bmi
+20%; text_transformer fed text from another domain (sentences of the Python standard
library's documentation). Every generator is deterministic for its seed.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

__all__ = ["Scenario", "SCENARIOS", "heldout", "bodies"]

CANCER_SHIFTED = "mean texture"
DIABETES_SHIFTED = "bmi"


@dataclass(frozen=True)
class Scenario:
    model: str
    name: str  # "in-distribution" or the shift
    make: Callable[[Path, int, int], list[bytes]]  # (model_store, n, seed) -> request bodies
    shifted_feature: str | None = None  # tabular: the feature that should rank first
    content_type: str = "application/json"


def _digits(store: Path) -> tuple[np.ndarray, np.ndarray]:
    d = np.load(store / "samples" / "digits_heldout.npz")
    return d["images"].astype(np.float64), d["labels"]


def _png(grids: np.ndarray) -> list[bytes]:
    from examples.digits_cnn import digit_png

    return [digit_png(g) for g in grids]


def _digits_shift(store: Path, n: int, seed: int, shift: str) -> list[bytes]:
    from examples.traffic import shift_digits

    x, y = _digits(store)
    return _png(shift_digits(x, y, shift, n, seed)[0])


def digits_plain(store: Path, n: int, seed: int) -> list[bytes]:
    return _digits_shift(store, n, seed, "none")


def digits_inverted(store: Path, n: int, seed: int) -> list[bytes]:
    return _digits_shift(store, n, seed, "inverted")


def digits_noise(store: Path, n: int, seed: int) -> list[bytes]:
    return _digits_shift(store, n, seed, "noise")


def digits_rotated(store: Path, n: int, seed: int) -> list[bytes]:
    return _digits_shift(store, n, seed, "rotated")


def digits_prior(store: Path, n: int, seed: int) -> list[bytes]:
    return _digits_shift(store, n, seed, "prior")


def _records(store: Path, name: str, n: int, seed: int, change: Callable[[dict], None] | None = None) -> list[bytes]:
    d = np.load(store / "samples" / f"{name}_heldout.npz")
    features = json.loads((store / "samples" / f"{name}_record.json").read_text())
    names = list(features)
    x = d[[k for k in d.files if k != "labels" and k != "targets"][0]]
    rows = x[np.random.default_rng(seed).choice(len(x), n)]
    out = []
    for row in rows:
        rec = {f: float(v) for f, v in zip(names, row)}
        if change is not None:
            change(rec)
        out.append(json.dumps(rec).encode())
    return out


def cancer_plain(store: Path, n: int, seed: int) -> list[bytes]:
    return _records(store, "cancer", n, seed)


def cancer_scaled(store: Path, n: int, seed: int) -> list[bytes]:
    def change(rec: dict) -> None:
        rec[CANCER_SHIFTED] *= 1.3
    return _records(store, "cancer", n, seed, change)


def diabetes_plain(store: Path, n: int, seed: int) -> list[bytes]:
    return _records(store, "diabetes", n, seed)


def diabetes_bmi(store: Path, n: int, seed: int) -> list[bytes]:
    def change(rec: dict) -> None:
        rec[DIABETES_SHIFTED] *= 1.2
    return _records(store, "diabetes", n, seed, change)


def _texts(store: Path) -> list[str]:
    return json.loads((store / "samples" / "texts_heldout.json").read_text())["texts"]


def texts_plain(store: Path, n: int, seed: int) -> list[bytes]:
    texts = _texts(store)
    return [texts[i].encode() for i in np.random.default_rng(seed).choice(len(texts), n)]


def _other_domain() -> list[str]:
    """Sentences from the documentation of Python's standard library: another domain entirely."""
    import argparse, csv, email, http, json as js, logging, pathlib, sqlite3, subprocess, zipfile  # noqa: E401

    text = " ".join(m.__doc__ or "" for m in (argparse, csv, email, http, js, logging, pathlib, sqlite3,
                                               subprocess, zipfile))
    sentences = [re.sub(r"[^a-z ]+", " ", s.lower()).split() for s in re.split(r"[.\n]\s*\n|\.\s", text)]
    return [" ".join(s[:14]) for s in sentences if 4 <= len(s)]


def texts_other(store: Path, n: int, seed: int) -> list[bytes]:
    texts = _other_domain()
    return [texts[i].encode() for i in np.random.default_rng(seed).choice(len(texts), n)]


def heldout(model: str) -> Callable[[Path, int, int], list[bytes]]:
    return {"digits_cnn": digits_plain, "cancer_mlp": cancer_plain, "diabetes_mlp": diabetes_plain,
            "text_transformer": texts_plain}[model]


SCENARIOS: list[Scenario] = [
    Scenario("digits_cnn", "digits inverted", digits_inverted, content_type="image/png"),
    Scenario("digits_cnn", "digits + Gaussian noise (sigma 3 of 16)", digits_noise, content_type="image/png"),
    Scenario("digits_cnn", "digits rotated 30 degrees", digits_rotated, content_type="image/png"),
    Scenario("digits_cnn", "class prior: only 0, 1, 2", digits_prior, content_type="image/png"),
    Scenario("cancer_mlp", f"{CANCER_SHIFTED} x 1.3", cancer_scaled, shifted_feature=CANCER_SHIFTED),
    Scenario("diabetes_mlp", f"{DIABETES_SHIFTED} +20%", diabetes_bmi, shifted_feature=DIABETES_SHIFTED),
    Scenario("text_transformer", "text from another domain", texts_other, content_type="text/plain"),
]

CONTENT_TYPES = {"digits_cnn": "image/png", "cancer_mlp": "application/json", "diabetes_mlp": "application/json",
                 "text_transformer": "text/plain"}


def bodies(model: str, store: Path, n: int, seed: int) -> list[bytes]:
    return heldout(model)(store, n, seed)
