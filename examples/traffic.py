"""Send digits_cnn traffic to a running server: held-out digits, shifted ones, and their labels.

    python -m examples.traffic --requests 1000                   # held-out digits (in distribution)
    python -m examples.traffic --shift inverted --requests 1000  # white ink on black: drift
    python -m examples.traffic --requests 500 --feedback         # and post each answer's true label
    python -m examples.traffic --requests 500 --feedback --corrupt 0.3   # 30% of the labels wrong

Digits come from the held-out split that ``osprey examples`` writes to
``model_store/samples/digits_heldout.npz`` (never the training rows), drawn with replacement
and sent as PNGs, 16 at a time. Shifts: ``inverted`` (16 - pixel), ``noise`` (Gaussian, sigma
3 of 16), ``rotated`` (30 degrees), ``prior`` (only the digits 0, 1 and 2). With
``--feedback`` each answer's ``x-request-id`` is posted back with the digit's true label to
``POST /feedback/digits_cnn``: the monitor joins them and live accuracy appears in
``GET /monitoring/digits_cnn``.
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

__all__ = ["SHIFTS", "shift_digits", "main"]

SHIFTS = ("none", "inverted", "noise", "rotated", "prior")


def shift_digits(grids: np.ndarray, labels: np.ndarray, shift: str, n: int, seed: int = 0
                 ) -> tuple[np.ndarray, np.ndarray]:
    """``n`` digits (8x8 grids of 0..16) drawn from ``grids`` with ``shift`` applied, and their labels."""
    rng = np.random.default_rng(seed)
    pool = np.flatnonzero(np.isin(labels, (0, 1, 2))) if shift == "prior" else np.arange(len(grids))
    idx = rng.choice(pool, n)
    x, y = grids[idx].astype(np.float64), labels[idx]
    if shift == "inverted":
        x = 16.0 - x
    elif shift == "noise":
        x = np.clip(x + rng.normal(0.0, 3.0, x.shape), 0, 16)
    elif shift == "rotated":
        from scipy.ndimage import rotate

        x = np.clip(rotate(x, 30.0, axes=(1, 2), reshape=False, order=1), 0, 16)
    elif shift not in ("none", "prior"):
        raise ValueError(f"unknown shift {shift!r}: one of {', '.join(SHIFTS)}")
    return x, y


def _post(url: str, body: bytes, content_type: str, token: str | None) -> tuple[int, dict, bytes]:
    headers = {"content-type": content_type}
    if token:
        headers["authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def main(argv: list[str] | None = None) -> int:
    from examples.digits_cnn import digit_png

    ap = argparse.ArgumentParser(prog="python -m examples.traffic", description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", default="http://127.0.0.1:8080", help="the inference address")
    ap.add_argument("--model", default="digits_cnn")
    ap.add_argument("--store", default="model_store", help="where `osprey examples` wrote samples/")
    ap.add_argument("--shift", default="none", choices=SHIFTS)
    ap.add_argument("--requests", "-n", type=int, default=1000)
    ap.add_argument("--feedback", action="store_true", help="post each answer's true label")
    ap.add_argument("--corrupt", type=float, default=0.0, help="share of labels to post wrong (with --feedback)")
    ap.add_argument("--token", help="the inference token (when token auth is on)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    held = Path(args.store) / "samples" / "digits_heldout.npz"
    if not held.exists():
        print(f"{held} not found: run `osprey examples --out {args.store}` first", file=sys.stderr)
        return 2
    data = np.load(held)
    grids, labels = shift_digits(data["images"], data["labels"], args.shift, args.requests, args.seed)
    url = f"{args.url}/predictions/{args.model}"

    def send(grid: np.ndarray) -> str | None:
        status, headers, body = _post(url, digit_png(grid), "image/png", args.token)
        if status != 200:
            print(f"{status}: {body[:200]!r}", file=sys.stderr)
            return None
        return {k.lower(): v for k, v in headers.items()}.get("x-request-id")

    with ThreadPoolExecutor(16) as pool:
        ids = list(pool.map(send, grids))
    answered = [i for i in ids if i]
    print(f"{len(answered)} of {len(ids)} answered ({args.shift})")
    if args.feedback:
        rng = np.random.default_rng(args.seed + 1)
        wrong = rng.random(len(labels)) < args.corrupt
        sent = np.where(wrong, (labels + rng.integers(1, 10, len(labels))) % 10, labels)
        items = [{"request_id": i, "label": str(int(y))} for i, y in zip(ids, sent) if i]
        status, _, body = _post(f"{args.url}/feedback/{args.model}", json.dumps({"feedback": items}).encode(),
                                "application/json", args.token)
        print(f"feedback {status}: {body.decode(errors='replace')}")
    return 0 if len(answered) == len(ids) else 1


if __name__ == "__main__":
    sys.exit(main())
