"""Monitoring's CPU time per batch, in process (issue 11, "Cost"): capture in the instance's
thread, and the monitor's analysis of what it hands over, for the same archive's handler
loaded twice in this thread (one runner monitored at sample_rate 1.0, one not), interleaved.

    .venv/bin/python -m benchmarks.capture_cost [--batches 1000] [--batch 1 8 32] [--rounds 3]

Each round runs ``--batches`` batches on each runner (order alternating between rounds) the
way an instance loop does (``--handoff`` batches per ``run_handoff``, then ``flush(force=False)`` after each handoff, a forced
flush at the end; a tree whose ``flush`` takes no argument flushes after every batch) and
counts ``time.thread_time()``: the difference per batch is capture's cost on the instance
thread (noisy: a difference of two large numbers); ``flush`` is the part measured directly, the
thread time spent building and handing over observations. The observations then go through a real :class:`monitoring.monitor.Monitor` (drift
binning, windows, the quality part's prediction log), its pass run in this thread and timed
the same way: the background thread's cost per batch. Medians over rounds. ``OSPREY_TREE=DIR``
measures another checkout's code (e.g. main's, before a change) with this script.
"""

from __future__ import annotations

import argparse
import inspect
import os
import json
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, os.environ.get("OSPREY_TREE", str(ROOT)))  # the tree whose code is measured

from benchmarks.models import build_models  # noqa: E402

WORK = ROOT / "benchmarks" / ".work" / "monitoring_cost"


def _tickets(model, n: int, k: int):
    from server.core.types import Field, InferenceRequest, Ticket

    body = Path(model.body).read_bytes()
    return [Ticket(InferenceRequest(model.name, None, f"r{k}-{i}", fields={"body": Field(body, model.content_type)}))
            for i in range(n)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, default=1000)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tag", default="")
    ap.add_argument("--handoff", type=int, default=1,
                    help="batches per handoff, run back to back as an instance runs them (the batcher bundles "
                         "up to 32 fast batches into one); 1: each batch on its own")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    from monitoring.monitor import Monitor
    from monitoring.quality import quality_factory
    from server.core.archive import open_archive
    from server.core.model_config import parse_model_config
    from server.instances.runner import load_runner

    WORK.mkdir(parents=True, exist_ok=True)
    built = build_models(WORK, with_cnn=False, with_digits=True)
    for key in ("mlp", "digits_cnn_builtin"):
        m = built[key]
        archive = open_archive(m.archive, WORK / f"capture-cost-{args.tag or 'x'}" / key)
        config = parse_model_config(archive.config)
        mv = SimpleNamespace(config=config, archive=archive)
        monitor = Monitor(SimpleNamespace(monitoring=True, redis_url=""), lambda _m, _v: mv,
                          lambda model, version, cfg, model_dir, store: quality_factory(model, version, cfg,
                                                                                        model_dir, None),
                          start=False)
        runners = {side: load_runner(archive.name, archive.version, str(archive.model_dir), archive.handler,
                                     archive.manifest, config, None, None,
                                     monitor.observe if side == "on" else None) for side in ("on", "off")}
        lazy = "force" in inspect.signature(runners["on"].flush).parameters
        for n in args.batch:
            cpu = {"on": [], "off": [], "monitor": [], "flush": []}
            obs = []
            for r in range(args.rounds):
                for side in (("on", "off") if r % 2 == 0 else ("off", "on")):
                    runner = runners[side]
                    batches = [_tickets(m, n, k) for k in range(args.batches)]
                    for b in batches[:20]:
                        runner.run(b)
                        runner.flush()
                    monitor._pass(force=True)
                    before = len(monitor._queue)
                    t0 = time.thread_time()
                    flushing = 0.0
                    for i in range(0, len(batches), args.handoff):
                        if args.handoff > 1:
                            runner.run_handoff(batches[i:i + args.handoff])
                        else:
                            runner.run(batches[i])
                        t1 = time.thread_time()
                        runner.flush(force=False) if lazy else runner.flush()
                        flushing += time.thread_time() - t1
                    t1 = time.thread_time()
                    runner.flush()
                    flushing += time.thread_time() - t1
                    cpu[side].append((time.thread_time() - t0) / len(batches))
                    if side == "on":
                        cpu["flush"].append(flushing / len(batches))
                    if side == "on":
                        obs.append(len(monitor._queue) - before)
                        t0 = time.thread_time()
                        monitor._pass(force=False)
                        cpu["monitor"].append((time.thread_time() - t0) / len(batches))
            on, off = statistics.median(cpu["on"]), statistics.median(cpu["off"])
            mon = statistics.median(cpu["monitor"])
            row = {"tree": args.tag, "model": m.name, "batch": n, "handoff": args.handoff, "cpu_us_per_batch_off": round(1e6 * off, 1),
                   "capture_us_per_batch": round(1e6 * (on - off), 1),
                   "flush_us_per_batch": round(1e6 * statistics.median(cpu["flush"]), 1),
                   "monitor_us_per_batch": round(1e6 * mon, 1),
                   "total_us_per_row": round(1e6 * (on - off + mon) / n, 2),
                   "observations_per_batch": round(statistics.median(obs) / args.batches, 3)}
            print(json.dumps(row), flush=True)
        monitor.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
