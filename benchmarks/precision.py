"""Throughput and held-out accuracy of the optimization switches (issue 4), one run.

For ``digits_lstm``, ``text_transformer`` and ``cancer_mlp`` (built by ``osprey examples``)
this serves three variants of the same archive side by side in one Osprey process: fp32,
``quantize: dynamic-int8`` and ``precision: bf16`` (model-config.yaml), measures held-out
accuracy through the server, then drives each variant with ``hey -c 32`` for a few seconds,
interleaved over rounds so that background load hits every variant alike.

    .venv/bin/python -m benchmarks.precision [--seconds 6] [--rounds 2]

Writes ``benchmarks/results/precision.json`` and prints a markdown table (kept in
``benchmarks/CHANGES.md``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.builtin_models import concurrent_posts, example_store, variant  # noqa: E402
from tests.conftest import OspreyProcess  # noqa: E402

BASES = ("digits_lstm", "text_transformer", "cancer_mlp")
VARIANTS = {"fp32": {}, "int8": {"quantize": "dynamic-int8"}, "bf16": {"precision": "bf16"}}


def held_out(examples: Path, base: str) -> tuple[list, list, str, str]:
    """(bodies, true labels, content type, one body file for hey)."""
    samples = examples / "samples"
    if base == "digits_lstm":
        from examples.digits_cnn import digit_png

        held = np.load(samples / "digits_heldout.npz")
        bodies = [digit_png(g) for g in held["images"][:300]]
        return bodies, [str(y) for y in held["labels"][:300]], "image/png", str(samples / "digit_3.png")
    if base == "cancer_mlp":
        records = json.loads((samples / "cancer_records.json").read_text())
        y = np.load(samples / "cancer_heldout.npz")["y"]
        names = ["malignant", "benign"]
        return records, [names[i] for i in y], "application/json", ""
    held = json.loads((samples / "texts_heldout.json").read_text())
    return held["texts"], held["labels"], "application/json", ""


def accuracy(url: str, bodies: list, truth: list) -> float:
    answers = [r.json() for r in concurrent_posts(url, bodies)]
    return float(np.mean([next(iter(a)) == t for a, t in zip(answers, truth)]))


def hey(url: str, body_file: str, content_type: str, seconds: float) -> float:
    out = subprocess.run(["hey", "-z", f"{seconds}s", "-c", "32", "-m", "POST", "-T", content_type, "-D", body_file, url],
                         capture_output=True, text=True, check=True).stdout
    return float(re.search(r"Requests/sec:\s+([0-9.]+)", out).group(1))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=6)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    examples = example_store("digits_cnn", *BASES)  # digits_cnn writes the digits held-out set
    work = Path(tempfile.mkdtemp(prefix="osprey-precision-"))
    store = work / "store"
    store.mkdir()
    models = [variant(examples / f"{b}.mar", store, f"{b}_{v}", **cfg) for b in BASES for v, cfg in VARIANTS.items()]
    server = work / "server"
    server.mkdir()
    proc = OspreyProcess(server, store, models)
    results: dict = {}
    try:
        proc.wait_ready(timeout=300)
        for base in BASES:
            bodies, truth, ctype, body_file = held_out(examples, base)
            if not body_file:
                body_file = str(work / f"{base}.json")
                Path(body_file).write_text(json.dumps(bodies[0]))
            for v in VARIANTS:
                url = f"{proc.inference}/predictions/{base}_{v}"
                results[(base, v)] = {"accuracy": accuracy(url, bodies, truth), "rps": []}
            for _ in range(args.rounds):
                for v in VARIANTS:
                    url = f"{proc.inference}/predictions/{base}_{v}"
                    results[(base, v)]["rps"].append(hey(url, body_file, ctype, args.seconds))
    finally:
        proc.stop()
    rows = []
    print(f"Optimization switches, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {os.cpu_count()} CPUs, "
          f"`python -m benchmarks.precision --seconds {args.seconds:g} --rounds {args.rounds}` "
          f"(hey -c 32, {args.rounds} interleaved rounds, median)\n")
    print("| model | variant | held-out accuracy | req/s (c=32) | vs fp32 |")
    print("|---|---|---|---|---|")
    for base in BASES:
        fp32 = float(np.median(results[(base, "fp32")]["rps"]))
        for v in VARIANTS:
            r = results[(base, v)]
            rps = float(np.median(r["rps"]))
            rows.append({"model": base, "variant": v, "accuracy": r["accuracy"], "rps": r["rps"]})
            print(f"| {base} | {v} | {r['accuracy']:.3f} | {rps:.0f} | {rps / fp32:.2f}x |")
    out = ROOT / "benchmarks" / "results" / "precision.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "machine": platform.platform(),
                               "cpus": os.cpu_count(), "seconds": args.seconds, "rounds": args.rounds, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
