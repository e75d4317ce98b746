"""The batches Osprey forms under closed-loop load: one model, several concurrencies.

    .venv/bin/python -m benchmarks.batch_sizes [--model cnn] [--concurrency 8 32] [--seconds 12]
        [--instances 1] [--setting KEY=VALUE ...]

Serves one benchmark model (``benchmarks/models.py``: mlp, mlp_nb, cnn, digits_cnn_builtin) in
a fresh Osprey, scales it to ``--instances``, and for each concurrency runs ``hey`` (a warm-up,
then the measured run) and reads the ``osprey_batch_size`` histogram from the metrics port
before and after: requests per second, batches, the mean batch and how many batches fell in
each bucket of the histogram during the measured run. The batch sizes say whether the batcher
runs a model at the batch size it runs best at (``benchmarks.ceiling`` measures that curve).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import urllib.request
from pathlib import Path

from . import load
from .ab import key_values
from .models import build_models
from .systems import Osprey

HERE = Path(__file__).resolve().parent


def histogram(metrics_url: str, model: str) -> tuple[dict[float, float], float, float]:
    """(cumulative count per bucket bound, count, sum) of the model's ``osprey_batch_size``."""
    text = urllib.request.urlopen(metrics_url, timeout=30).read().decode()
    lines = [line for line in text.splitlines() if line.startswith("osprey_batch_size") and f'model="{model}"' in line]
    buckets = {}
    count = total = 0.0
    for line in lines:
        value = float(line.rsplit(" ", 1)[1])
        if line.startswith("osprey_batch_size_bucket"):
            le = re.search(r'le="([^"]+)"', line).group(1)
            if le != "+Inf":
                buckets[float(le)] = value
        elif line.startswith("osprey_batch_size_count"):
            count = value
        elif line.startswith("osprey_batch_size_sum"):
            total = value
    return buckets, count, total


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="cnn", choices=["mlp", "mlp_nb", "cnn", "digits_cnn_builtin"])
    ap.add_argument("--concurrency", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--seconds", type=float, default=12.0)
    ap.add_argument("--warmup", type=float, default=3.0)
    ap.add_argument("--instances", type=int, default=1)
    ap.add_argument("--cnn-side", type=int, default=112)
    ap.add_argument("--setting", action="append", default=[], metavar="KEY=VALUE",
                    help="a server setting for config.properties (e.g. torch_threads=1)")
    ap.add_argument("--work", default=str(HERE / ".work" / "batch_sizes"))
    args = ap.parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    models = build_models(HERE / ".work" / "ab" / "models", cnn_side=args.cnn_side, with_cnn=args.model == "cnn",
                          with_digits=args.model == "digits_cnn_builtin")
    model = models[args.model]
    server = Osprey(work, [model], config=key_values(args.setting, "--setting", ap.error), tag="batch_sizes")
    server.start()
    try:
        if args.instances != 1:
            req = urllib.request.Request(f"{server.management}/models/{model.name}?min_worker={args.instances}"
                                         f"&synchronous=true", method="PUT")
            urllib.request.urlopen(req, timeout=300).read()
        metrics = f"http://127.0.0.1:{server.ports['metrics']}/metrics"
        url = f"{server.inference}/predictions/{model.name}"
        for c in args.concurrency:
            load.hey(url, str(model.body), model.content_type, c, args.warmup, 0)  # warm-up, not counted
            before, n0, s0 = histogram(metrics, model.name)
            out = load.hey(url, str(model.body), model.content_type, c, args.seconds, 0)
            after, n1, s1 = histogram(metrics, model.name)
            batches = n1 - n0
            by_bucket, below = {}, 0.0
            for bound in sorted(after):
                cumulative = after[bound] - before.get(bound, 0.0)
                if cumulative - below:
                    by_bucket[f"<={bound:g}"] = int(cumulative - below)
                below = cumulative
            print(json.dumps({"model": model.name, "concurrency": c, "instances": args.instances,
                              "settings": args.setting, "rps": round(out["rps"] or 0.0, 1),
                              "p50_ms": out.get("p50_ms"), "batches": int(batches),
                              "mean_batch": round((s1 - s0) / batches, 2) if batches else None,
                              "batches_by_size": by_bucket}), flush=True)
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
