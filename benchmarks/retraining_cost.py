"""What the retraining loop costs serving: the same server with and without a training job running
on the same machine (issue 12).

    .venv/bin/python -m benchmarks.retraining_cost [--rounds 4] [--seconds 10] [--quick]
        [--store model_store]

One ``osprey serve`` (embedded job queue: jobs run in child processes of the server, the default
without ``redis_url``) serves the tiny MLP (TorchScript 16-64-4, batch 32 / 5 ms) and digits_cnn
as ``osprey examples`` builds it (built-in image_classifier, taken from ``--store``; built into
``.work`` when absent), with the example's own ``retraining:`` section but for two keys:
``triggers: [manual]`` (the load sends one PNG again and again, which is drift: no automatic job
may start behind the benchmark's back) and ``gate.min_improvement: 2.0`` (no challenger can pass,
so every job runs the whole pipeline -- champion, labelled rows, the archive's training entry
point ``examples.digits_cnn:retrain`` with its default 12 epochs, packaging the challenger, the
gate scoring both on the held-back rows and the golden set, latency at batch 1 and 32 -- and ends
``rejected``: serving never changes under the measurement; canary and promotion are short and
are covered by the promotion tests, not here).

Before the measurement the server answers ``--labels`` inverted digits (examples.traffic) and
receives their labels through ``POST /feedback/digits_cnn``: the labelled production rows a job
trains on.

Phases, each round (order A B C, then C B A in the next round, and so on):

- **A, serving alone**: ``hey -z S -c C`` on the MLP, then on digits_cnn (the other way round
  in every second round);
- **B, serving while a job trains**: ``POST /models/digits_cnn/retrain`` on the management port
  (what ``osprey retrain digits_cnn`` sends); once the job is ``running``, the same two hey runs.
  A job may be shorter than the window, so jobs run **back to back**: a thread queues the next
  one as soon as the last one ended. If the first job is still running when the measured window
  ends, more load (hey runs of at most 4 s on both models, not counted) follows until it ended, so
  that at least one job ran whole under load; then the job still running is cancelled
  (``DELETE /retraining/jobs/ID``) and waited for, so that the next phase starts quiet. The JSON
  gives the share of the measured window a job was running (``job_coverage``);
- **C, a job alone**: one job, no load: its duration without serving load.

Job durations: ``started`` -> ``finished`` of the record (the child process, start to end), and
the training step alone (the ``data`` step's time -> the ``training`` step's): B's jobs that ran
whole under load (the first one began a fraction of a second before the load, ``first_job_lead_s``)
against C's jobs.

Throughput and latency: hey's requests/s (200s only) and p50/p99 per model and phase; the table
gives the median over rounds of each side and the ratio with/without. The load average (1 min) is
taken before and after each phase: above about 2, something else shared the 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import threading
import time
import zipfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.load import hey  # noqa: E402
from benchmarks.models import BenchModel, build_models  # noqa: E402
from benchmarks.systems import Osprey  # noqa: E402
from examples.retrain_demo import http_call, json_call  # noqa: E402

WORK = ROOT / "benchmarks" / ".work" / "retraining_cost"
MODEL = "digits_cnn"
TERMINAL = ("succeeded", "rejected", "failed", "cancelled")


# --- machine ---------------------------------------------------------------------------
def _load() -> float:
    return round(os.getloadavg()[0], 2)


# --- the store -----------------------------------------------------------------------------
def _digits_archive(source: Path, store: Path) -> Path:
    """The example archive with ``triggers: [manual]`` and an impassable gate (see the module doc)."""
    out = store / f"{MODEL}.mar"
    with zipfile.ZipFile(source) as zin, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zout:
        for item in zin.infolist():
            data = zin.read(item.filename)
            if item.filename == "model-config.yaml":
                cfg = yaml.safe_load(data)
                r = cfg.setdefault("retraining", {})
                r["triggers"] = ["manual"]
                r.setdefault("gate", {})["min_improvement"] = 2.0
                data = yaml.safe_dump(cfg, sort_keys=False).encode()
            zout.writestr(item, data)
    return out


def _example_store(args) -> Path:
    src = Path(args.store)
    if (src / f"{MODEL}.mar").exists() and (src / "samples" / "digits_heldout.npz").exists():
        return src
    built = WORK / "examples"
    if not (built / f"{MODEL}.mar").exists():
        import subprocess

        subprocess.run([sys.executable, "-m", "server.cli", "examples", "--out", str(built), "--only", MODEL],
                       cwd=ROOT, check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    return built


# --- jobs ----------------------------------------------------------------------------------
class Jobs:
    """Retraining jobs through the management API, and a thread that keeps one running."""

    def __init__(self, management: str):
        self.management = management
        self.records: dict[str, dict] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.current: str | None = None

    def submit(self) -> str:
        out = json_call("POST", f"{self.management}/models/{MODEL}/retrain?reason=benchmark")
        return out["job"]["id"]

    def get(self, job_id: str) -> dict:
        rec = json_call("GET", f"{self.management}/retraining/jobs/{job_id}")
        self.records[job_id] = rec
        return rec

    def wait(self, job_id: str, states: tuple, timeout: float = 600) -> dict:
        end = time.monotonic() + timeout
        while True:
            rec = self.get(job_id)
            if rec["state"] in states:
                return rec
            if time.monotonic() > end:
                raise RuntimeError(f"job {job_id} still {rec['state']} after {timeout:g} s")
            time.sleep(0.1)

    def start_running(self) -> str:
        """Queue a job and return once it runs (its child process started)."""
        job_id = self.submit()
        rec = self.wait(job_id, ("running", *TERMINAL))
        if rec["state"] != "running":
            raise RuntimeError(f"job {job_id} ended {rec['state']} before it ran: {rec.get('message')}")
        self.current = job_id
        return job_id

    def back_to_back(self) -> None:
        def loop():
            while not self._stop.is_set():
                rec = self.get(self.current)
                if rec["state"] in TERMINAL:
                    if rec["state"] != "rejected":
                        print(f"  job {self.current} ended {rec['state']}: {rec.get('message')}", file=sys.stderr)
                    if self._stop.is_set():
                        break
                    self.current = self.submit()
                    continue
                self._stop.wait(0.1)
        self._stop.clear()
        self._thread = threading.Thread(target=loop, daemon=True)
        self._thread.start()

    def stop_and_cancel(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        rec = self.get(self.current)
        if rec["state"] not in TERMINAL:
            http_call("DELETE", f"{self.management}/retraining/jobs/{self.current}")
            self.wait(self.current, TERMINAL, timeout=60)


def _durations(rec: dict) -> dict:
    steps = {s["step"]: s["ts"] for s in rec.get("steps", [])}
    out = {"id": rec["id"], "state": rec["state"], "started": rec.get("started"), "finished": rec.get("finished"),
           "job_s": None, "training_s": None}
    if rec.get("started") and rec.get("finished"):
        out["job_s"] = round(rec["finished"] - rec["started"], 3)
    if "data" in steps and "training" in steps:
        out["training_s"] = round(steps["training"] - steps["data"], 3)
    return out


# --- labelled rows -------------------------------------------------------------------------
def _labelled_rows(srv: Osprey, heldout: Path, n: int) -> int:
    import numpy as np
    from concurrent.futures import ThreadPoolExecutor

    from examples.digits_cnn import digit_png
    from examples.traffic import shift_digits

    data = np.load(heldout)
    grids, labels = shift_digits(data["images"], data["labels"], "inverted", n, seed=12)
    url = srv.predict_url(MODEL)

    def one(g):
        status, headers, _ = http_call("POST", url, digit_png(g), "image/png")
        return headers.get("x-request-id") if status == 200 else None

    with ThreadPoolExecutor(8) as pool:
        ids = list(pool.map(one, grids))
    items = [{"request_id": i, "label": str(int(y))} for i, y in zip(ids, labels) if i]
    http_call("POST", f"{srv.inference}/feedback/{MODEL}", json.dumps({"feedback": items}).encode())
    return len(items)


# --- main ----------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=10, help="hey run per model and phase")
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--labels", type=int, default=600, help="labelled inverted digits sent before measuring")
    ap.add_argument("--store", default=str(ROOT / "model_store"),
                    help="where `osprey examples` wrote digits_cnn.mar (built into .work when absent)")
    ap.add_argument("--quick", action="store_true", help="1 round of 4 s per model and phase (a smoke test)")
    ap.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "retraining_cost.json"))
    args = ap.parse_args(argv)
    if args.quick:
        args.rounds, args.seconds = 1, 4.0
    examples = _example_store(args)
    if WORK.exists():
        shutil.rmtree(WORK / "server", ignore_errors=True)
        shutil.rmtree(WORK / "store", ignore_errors=True)
    WORK.mkdir(parents=True, exist_ok=True)
    built = build_models(WORK, with_cnn=False, with_digits=False)
    store = built["mlp"].archive.parent
    (store / "mlp_nb.mar").unlink(missing_ok=True)
    digits = BenchModel(MODEL, _digits_archive(examples / f"{MODEL}.mar", store), examples / "samples" / "digit_3.png",
                        "image/png", "digits", note="osprey examples digits_cnn, built-in image_classifier")
    models = [built["mlp"], digits]
    srv = Osprey(WORK / "server", models, tag="osprey-retraining")
    jobs = Jobs(srv.management)
    phases: list[dict] = []
    alone: list[dict] = []
    under_load: list[dict] = []
    t_start = time.time()
    try:
        srv.start(timeout=300)
        n_labels = _labelled_rows(srv, examples / "samples" / "digits_heldout.npz", args.labels)
        print(f"{n_labels} labelled rows sent; load average {_load()}", file=sys.stderr)
        for m in models:  # warm-up, outside every phase
            hey(srv.predict_url(m.name), str(m.body), m.content_type, args.concurrency, 2, warmup_s=0)
        for r in range(args.rounds):
            order = "ABC" if r % 2 == 0 else "CBA"
            for phase in order:
                load0 = _load()
                entry: dict = {"round": r + 1, "phase": phase, "load_before": load0}
                if phase == "C":
                    job_id = jobs.start_running()
                    rec = jobs.wait(job_id, TERMINAL)
                    d = _durations(rec)
                    alone.append(d)
                    entry.update(job=d)
                    print(f"round {r + 1} C job alone {d['job_s']} s (training {d['training_s']} s) "
                          f"{rec['state']}", file=sys.stderr)
                else:
                    if phase == "B":
                        first = jobs.start_running()
                        jobs.back_to_back()
                    w0 = time.time()
                    runs = {}
                    for m in (models if r % 2 == 0 else models[::-1]):  # each model meets each part of a job
                        res = hey(srv.predict_url(m.name), str(m.body), m.content_type, args.concurrency,
                                  args.seconds, warmup_s=0)
                        runs[m.name] = {k: res.get(k) for k in ("rps", "p50_ms", "p99_ms", "mean_ms", "n", "ok",
                                                               "errors", "status", "command")}
                        print(f"round {r + 1} {phase} {m.name:12s} {res['rps']:8.0f} req/s p50 "
                              f"{res.get('p50_ms', float('nan')):7.1f} ms p99 {res.get('p99_ms', float('nan')):7.1f} ms "
                              f"errors {res['errors']}", file=sys.stderr)
                    w1 = time.time()
                    entry.update(window=[round(w0, 3), round(w1, 3)], runs=runs)
                    if phase == "B":
                        # the first job's duration under load: more (uncounted) load until it ended
                        filler = 0.0
                        while jobs.get(first)["state"] not in TERMINAL:
                            for m in models:
                                t = time.time()
                                hey(srv.predict_url(m.name), str(m.body), m.content_type, args.concurrency,
                                    min(args.seconds, 4.0), warmup_s=0)
                                filler += time.time() - t
                        w2 = time.time()
                        jobs.stop_and_cancel()
                        ids = list(jobs.records)
                        recs = [jobs.get(i) for i in ids[ids.index(first):]]
                        covered = sum(max(0.0, min(x.get("finished") or w1, w1) - max(x.get("started") or w1, w0))
                                      for x in recs)
                        t_first = recs[0]["started"]
                        inside = [_durations(x) for x in recs if x["state"] != "cancelled"
                                  and x.get("started") and x.get("finished") and x["started"] >= t_first
                                  and x["finished"] <= w2]
                        under_load.extend(inside)
                        entry.update(jobs=[_durations(x) for x in recs], job_coverage=round(covered / (w1 - w0), 3),
                                     jobs_inside=len(inside), first_job_lead_s=round(w0 - t_first, 3),
                                     filler_s=round(filler, 1))
                        print(f"round {r + 1} B {len(recs)} jobs, running {100 * covered / (w1 - w0):.0f}% of the "
                              f"window; {len(inside)} ran whole under load ({filler:.0f} s of uncounted load after "
                              f"the window for the first one)", file=sys.stderr)
                entry["load_after"] = _load()
                phases.append(entry)
    finally:
        srv.stop()

    def med(values):
        values = [v for v in values if v is not None]
        return round(statistics.median(values), 3) if values else None

    table = []
    for m in models:
        side = {p: [e["runs"][m.name] for e in phases if e["phase"] == p] for p in "AB"}
        row = {"model": m.name}
        for key in ("rps", "p50_ms", "p99_ms"):
            a, b = med(x[key] for x in side["A"]), med(x[key] for x in side["B"])
            row[f"{key}_without"], row[f"{key}_with"] = a, b
            row[f"{key}_ratio"] = round(b / a, 3) if a and b else None
        row["rps_without_all"] = [round(x["rps"]) for x in side["A"]]
        row["rps_with_all"] = [round(x["rps"]) for x in side["B"]]
        row["errors"] = {p: sum(x["errors"] for x in side[p]) for p in "AB"}
        table.append(row)
    job_table = {"alone": {"n": len(alone), "job_s": med(d["job_s"] for d in alone),
                           "training_s": med(d["training_s"] for d in alone)},
                 "under_load": {"n": len(under_load), "job_s": med(d["job_s"] for d in under_load),
                                "training_s": med(d["training_s"] for d in under_load)}}
    for key in ("job_s", "training_s"):
        a, b = job_table["alone"][key], job_table["under_load"][key]
        job_table[f"{key}_ratio"] = round(b / a, 3) if a and b else None
    loads = [x for e in phases for x in (e["load_before"], e["load_after"])]
    out = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(t_start)), "command": " ".join(sys.argv),
           "machine": {"cpus": os.cpu_count(), "uname": " ".join(os.uname())},
           "rounds": args.rounds, "seconds": args.seconds, "concurrency": args.concurrency, "labels": n_labels,
           "queue": "embedded (child processes of the server)", "entry_point": "examples.digits_cnn:retrain",
           "load_average": {"min": min(loads), "max": max(loads)},
           "models": table, "jobs": job_table, "phases": phases, "jobs_alone": alone, "jobs_under_load": under_load}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    print(f"\nload average (1 min) during the run: {min(loads)} .. {max(loads)}; {args.rounds} round(s) of "
          f"{args.seconds:g} s per model and phase, c={args.concurrency}")
    print("| model | req/s without job | with job | with/without | p50 ms without | with | p99 ms without | with |")
    print("|---|---|---|---|---|---|---|---|")
    for t in table:
        print(f"| {t['model']} | {t['rps_without']:.0f} | {t['rps_with']:.0f} | {t['rps_ratio']:.3f} | "
              f"{t['p50_ms_without']:.1f} | {t['p50_ms_with']:.1f} | {t['p99_ms_without']:.1f} | {t['p99_ms_with']:.1f} |")
    print("\n| retraining job (digits_cnn) | jobs | job s (median) | training step s |")
    print("|---|---|---|---|")
    for key, label in (("alone", "alone"), ("under_load", "under serving load (c=32)")):
        j = job_table[key]
        print(f"| {label} | {j['n']} | {j['job_s']} | {j['training_s']} |")
    print(f"| under load / alone | | {job_table['job_s_ratio']} | {job_table['training_s_ratio']} |")
    print("\nload average (1 min) before -> after each phase: " + ", ".join(
        f"{e['round']}{e['phase']} {e['load_before']}->{e['load_after']}" for e in phases))
    coverage = [e["job_coverage"] for e in phases if e["phase"] == "B"]
    print(f"\njob running during {', '.join(f'{100 * c:.0f}%' for c in coverage)} of the B windows; "
          f"JSON: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
