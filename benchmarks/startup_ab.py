"""Interleaved start-up A/B of two Osprey commits: process start to every benchmark model answering.

    .venv/bin/python -m benchmarks.startup_ab OLD NEW [--starts 8] [--old-env KEY=VALUE ...] [--new-env KEY=VALUE ...]

Each start is a fresh server (the benchmark's ``Osprey`` class, the five archives of the full
run: mlp, mlp_nb, the CNN at 112x112, digits_cnn and its built-in handler twin), timed as the
full run times its start: from ``Popen`` until every model answered a prediction, one model
after another. Starts alternate the order (A B, then B A, ...). Also the server's CPU time up to
that moment (user + system, from ``/proc``): steadier than the wall time on a shared machine,
and what a start costs the other work on it. Prints each start and the medians; writes
``benchmarks/results/startup-OLD-NEW.json``. Sides are given and checked out as for ``benchmarks.ab``.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import psutil

from .ab import HERE, OspreyAt, add_side_arguments, result_name, sides_of
from .models import build_models


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_side_arguments(ap)
    ap.add_argument("--starts", type=int, default=8, help="starts of each side")
    args = ap.parse_args(argv)
    sides = sides_of(args, ap.error)
    work = Path(args.work)
    models = list(build_models(HERE / ".work", cnn_side=112).values())  # the full run's archives
    runs: dict[str, list[dict]] = {tag: [] for tag, *_ in sides}
    for i in range(args.starts):
        for tag, _sha, tree, env in (sides if i % 2 == 0 else sides[::-1]):
            server = OspreyAt(tree, work / f"startup-{i}", models, config={"job_queue_size": 1000}, extra_env=env)
            server.start()
            try:
                cpu = psutil.Process(server.proc.pid).cpu_times()
                row = {"all_models_s": round(server.startup["all_models_s"], 3),
                       "first_answer_s": round(server.startup["first_answer_s"], 3),
                       "cpu_s": round(cpu.user + cpu.system, 3), "models": server.startup["models"]}
            finally:
                server.stop()
            runs[tag].append(row)
            print(f"start {i + 1} {tag}: all {row['models']} models {row['all_models_s']:.2f} s, "
                  f"CPU {row['cpu_s']:.2f} s", flush=True)
    summary = {tag: {"all_models_s_median": statistics.median(r["all_models_s"] for r in rows),
                     "cpu_s_median": statistics.median(r["cpu_s"] for r in rows)} for tag, rows in runs.items()}
    for tag, s in summary.items():
        print(f"{tag}: median {s['all_models_s_median']:.2f} s to all models answering, CPU {s['cpu_s_median']:.2f} s")
    out = HERE / "results" / f"startup-{result_name(sides)}.json"
    out.write_text(json.dumps({"starts": runs, "summary": summary,
                               "env": {tag: env for tag, _sha, _tree, env in sides}}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
