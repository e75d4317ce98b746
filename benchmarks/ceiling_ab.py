"""The CNN served against its raw ceiling, measured in alternating rounds (issue 15, item 4).

    .venv/bin/python -m benchmarks.ceiling_ab [--rounds 5] [--seconds 8] [--warmup 2] [--concurrency 32 128]
        [--batches 8,16,32] [--cnn-side 112] [--setting KEY=VALUE ...] [--also KEY=VALUE ...] [--json PATH]

The full run (``benchmarks.run``) measures the raw ceiling once, at its start, and the served
CNN many minutes later. On this shared 2-core machine the ceiling itself moves by 20-30% from
one minute to the next (batch 16: 116, 161 and 165 images/s in three runs 10 s apart,
2026-12-01), so a ratio of two numbers taken at different times says more about the machine's
neighbours than about Osprey. Here the same two quantities are measured back to back, round
after round, the order alternating: the ceiling (``benchmarks.ceiling``: forward passes of the
same TorchScript file in a loop, in a process of its own, its best batch among ``--batches`` at
the better of 1 thread and torch's default, as ``benchmarks.run`` measures it; half of ``--seconds``
a batch size and thread count) with the server paused (SIGSTOP), then Osprey serving the same file
(``hey -c C``, a warm-up, then ``--seconds``), or the other way round. Each round's ratio is
Osprey's throughput at its best concurrency over that round's ceiling; the table gives every
round and the median ratio. ``--also KEY=VALUE`` adds a second Osprey with other settings to
the same rounds (each server is paused while the other and the ceiling run).

Osprey runs as ``benchmarks.run`` runs it: its defaults (monitoring on) but ``job_queue_size``
1000 (the default, 100, refuses some of c=128's requests), the benchmark's CNN archive
(3x112x112 float32 raw body, batchSize 32 / 5 ms), one instance.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from . import load
from .ab import key_values
from .models import build_models
from .systems import Osprey

HERE = Path(__file__).resolve().parent


def ceiling(weights: Path, shape: tuple[int, ...], batches: str, seconds: float) -> dict:
    """Best samples/s over ``batches`` and thread counts (1 and torch's default, as ``benchmarks.run``
    measures it), in a process of its own."""
    cmd = [sys.executable, "-m", "benchmarks.ceiling", "--weights", str(weights), "--shape",
           ",".join(map(str, shape)), "--batches", batches, "--seconds", str(seconds)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=HERE.parent, timeout=600)
    data = json.loads(out.stdout)
    by_batch = {int(b): round(v["samples_per_s"], 1) for b, v in data["by_batch"].items()}
    best = max(by_batch, key=by_batch.get)
    return {"best_batch": best, "best_samples_per_s": by_batch[best], "by_batch": by_batch}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=8.0, help="each served point (half of it: each batch size and thread count of the ceiling)")
    ap.add_argument("--warmup", type=float, default=2.0)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[32, 128])
    ap.add_argument("--batches", default="8,16,32", help="batch sizes the ceiling tries (its best counts)")
    ap.add_argument("--cnn-side", type=int, default=112)
    ap.add_argument("--setting", action="append", default=[], metavar="KEY=VALUE",
                    help="a server setting for config.properties (e.g. torch_threads=1); repeatable")
    ap.add_argument("--also", action="append", default=[], metavar="KEY=VALUE",
                    help="a second Osprey with these settings on top of --setting, measured in the same rounds "
                         "right after the first (e.g. monitoring=false); repeatable")
    ap.add_argument("--json", default="", help="write the rounds and the summary here")
    args = ap.parse_args(argv)
    if args.rounds < 1 or args.seconds <= 0:
        ap.error("--rounds must be at least 1 and --seconds above 0")
    work = HERE / ".work" / "ceiling_ab"
    work.mkdir(parents=True, exist_ok=True)
    model = build_models(HERE / ".work" / "ab" / "models", cnn_side=args.cnn_side, with_digits=False)["cnn"]
    # job_queue_size as benchmarks.run sets it (the default, 100, answers 503 at c=128)
    config = {"job_queue_size": "1000", **key_values(args.setting, "--setting", ap.error)}
    servers = {"osprey": Osprey(work / "osprey", [model], config=config, tag="ceiling_ab")}
    if args.also:
        also = key_values(args.also, "--also", ap.error)
        servers["also"] = Osprey(work / "also", [model], config={**config, **also}, tag="ceiling_ab-also")
    for server in servers.values():
        server.start()
        server.pause()
    rounds = []
    try:
        for r in range(args.rounds):
            row: dict = {"round": r + 1, "started": time.strftime("%H:%M:%S", time.gmtime())}
            steps = ["ceiling", *servers] if r % 2 == 0 else [*servers, "ceiling"]
            for step in steps:
                if step == "ceiling":
                    row["ceiling"] = ceiling(model.weights, model.input_shape, args.batches, args.seconds / 2)
                    continue
                server = servers[step]
                url = f"{server.inference}/predictions/{model.name}"
                row[step] = {}
                server.resume()  # only the server measured runs; the other is paused (SIGSTOP)
                try:
                    for c in args.concurrency:
                        out = load.hey(url, str(model.body), model.content_type, c, args.seconds, args.warmup)
                        if out.get("errors"):
                            raise SystemExit(f"round {r + 1}, {step}, c={c}: {out['errors']} errors "
                                             f"({out.get('error_sample', out.get('status'))})")
                        row[step][c] = round(out["rps"] or 0.0, 1)
                finally:
                    server.pause()
            for side in servers:
                best_c = max(row[side], key=row[side].get)
                row[f"{side}_ratio"] = round(row[side][best_c] / row["ceiling"]["best_samples_per_s"], 3)
            rounds.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    finally:
        for server in servers.values():
            server.resume()
            server.stop()
    summary: dict = {"median_ceiling": statistics.median(x["ceiling"]["best_samples_per_s"] for x in rounds)}
    for side in servers:
        ratios = [x[f"{side}_ratio"] for x in rounds]
        summary[side] = {"median_ratio": round(statistics.median(ratios), 3), "min_ratio": min(ratios),
                         "max_ratio": max(ratios),
                         "median_served": {c: statistics.median(x[side][c] for x in rounds) for c in args.concurrency}}
    names = {"osprey": "Osprey", "also": "Osprey " + ",".join(args.also)}
    cols = [(side, c) for side in servers for c in args.concurrency]
    print("| round | ceiling (best batch) | " + " | ".join(f"{names[s]} c={c}" for s, c in cols) + " | "
          + " | ".join(f"{names[s]} / ceiling" for s in servers) + " |")
    print("|---|---|" + "---|" * (len(cols) + len(servers)))
    for x in rounds:
        print(f"| {x['round']} | {x['ceiling']['best_samples_per_s']:.1f} ({x['ceiling']['best_batch']}) | "
              + " | ".join(f"{x[s][c]:.1f}" for s, c in cols) + " | "
              + " | ".join(f"{x[f'{s}_ratio']:.0%}" for s in servers) + " |")
    for side in servers:
        m = summary[side]
        print(f"{names[side]}: median {m['median_ratio']:.1%} of the ceiling (rounds {m['min_ratio']:.0%}-{m['max_ratio']:.0%})")
    if args.json:
        Path(args.json).write_text(json.dumps({"command": " ".join(sys.argv), "settings": args.setting,
                                               "rounds": rounds, "summary": summary}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
