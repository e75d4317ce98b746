"""The same example archives served on the CPU and on a CUDA GPU by one Osprey process, one run.

For ``digits_cnn`` (PNG in, image_classifier) and ``text_transformer`` (JSON text in,
text_classifier) this serves two variants of each archive side by side (model-config
``deviceType: cpu`` and ``deviceType: gpu``, the example's own batching), checks that both
answer the held-out inputs alike, then drives each with ``hey -c C`` for a few seconds,
the variants taking turns, and reads the GPU's memory from the server's own
``osprey_gpu_memory_used_bytes``. Needs a CUDA GPU (exits 2 without one).

    python -m benchmarks.gpu_serving [--seconds 8] [--concurrency 1,32] [--out results.json]

Prints a markdown table (kept in ``benchmarks/CHANGES.md``) and writes the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.load import hey  # noqa: E402
from tests.builtin_models import concurrent_posts, example_store, variant  # noqa: E402
from tests.conftest import OspreyProcess  # noqa: E402

MODELS = ("digits_cnn", "text_transformer")


def _bodies(examples: Path, base: str, work: Path) -> tuple[Path, str, list]:
    """A body file for hey, its content type, and 64 held-out bodies for the agreement check."""
    import numpy as np

    if base == "digits_cnn":
        from examples.digits_cnn import digit_png

        images = np.load(examples / "samples" / "digits_heldout.npz")["images"][:64]
        pngs = [digit_png(g) for g in images]
        path = work / "digit.png"
        path.write_bytes(pngs[0])
        return path, "image/png", pngs
    texts = json.loads((examples / "samples" / "texts_heldout.json").read_text())["texts"][:64]
    path = work / "text.json"
    path.write_text(json.dumps({"text": texts[0]}))
    return path, "application/json", [{"text": t} for t in texts]


def _gpu_memory(metrics_url: str) -> float | None:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{metrics_url}/metrics", timeout=10).text
    for fam in text_string_to_metric_families(text):
        if fam.name == "osprey_gpu_memory_used_bytes" and fam.samples:
            return sum(s.value for s in fam.samples)
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--concurrency", default="1,32")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gpu_serving.json"))
    args = ap.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("gpu_serving: no CUDA GPU here", file=sys.stderr)
        return 2
    examples = example_store(*MODELS)
    work = Path(tempfile.mkdtemp(prefix="osprey-gpu-bench-"))
    store = work / "store"
    store.mkdir()
    (work / "srv").mkdir()
    specs = []
    for base in MODELS:
        for dev in ("cpu", "gpu"):
            specs.append(f"{base}_{dev}=" + variant(examples / f"{base}.mar", store, f"{base}_{dev}", deviceType=dev))
    srv = OspreyProcess(work / "srv", store, specs).wait_ready(timeout=300)
    results: dict = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "gpu": torch.cuda.get_device_name(0),
                     "cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
                     "command": "python -m benchmarks.gpu_serving " + " ".join(argv or sys.argv[1:]), "rows": []}
    try:
        for base in MODELS:
            body, ctype, held = _bodies(examples, base, work)
            answers = {}
            for dev in ("cpu", "gpu"):
                got = concurrent_posts(f"{srv.inference}/predictions/{base}_{dev}", held)
                assert all(r.status_code == 200 for r in got), [r.text for r in got if r.status_code != 200][:3]
                answers[dev] = [next(iter(r.json())) if isinstance(r.json(), dict) else r.json() for r in got]
            agree = sum(a == b for a, b in zip(answers["cpu"], answers["gpu"])) / len(held)
            for c in (int(x) for x in args.concurrency.split(",")):
                for dev in ("cpu", "gpu"):
                    r = hey(f"{srv.inference}/predictions/{base}_{dev}", str(body), ctype, c, args.seconds, 2.0)
                    row = {"model": base, "device": dev, "concurrency": c, "rps": round(r["rps"], 1),
                           "p50_ms": r.get("p50_ms"), "p99_ms": r.get("p99_ms"), "errors": r.get("errors", 0),
                           "top_class_agreement_cpu_gpu": agree}
                    results["rows"].append(row)
                    print(json.dumps(row), flush=True)
        results["gpu_memory_used_bytes"] = _gpu_memory(srv.metrics)
    finally:
        srv.stop()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"\n{results['gpu']}, {results['cpus']} CPUs, torch {results['torch']}, {results['date']}")
    print("| model | c | CPU req/s | GPU req/s | GPU/CPU | CPU p50 ms | GPU p50 ms | CPU p99 ms | GPU p99 ms |")
    print("|---|---|---|---|---|---|---|---|---|")
    rows = {(r["model"], r["concurrency"], r["device"]): r for r in results["rows"]}
    for base in MODELS:
        for c in (int(x) for x in args.concurrency.split(",")):
            a, b = rows[(base, c, "cpu")], rows[(base, c, "gpu")]
            print(f"| {base} | {c} | {a['rps']} | {b['rps']} | {b['rps'] / max(a['rps'], 1e-9):.2f} | {a['p50_ms']} | "
                  f"{b['p50_ms']} | {a['p99_ms']} | {b['p99_ms']} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
