"""The retraining loop, end to end, on digits_cnn: drift, a job, a gate, a canary, a new default.

    osprey demo retrain                      # embedded job queue (nothing to install)
    osprey demo retrain --redis              # a redis-server and an `osprey worker` (Debian's redis-server)

What it does, printing each step as it happens:

1. serves ``digits_cnn`` from a fresh copy of the model store (``osprey examples`` built it,
   with a ``retraining:`` section: canary of 20% on 100 requests, 30 s probation);
2. sends upright held-out digits, then a shifted stream (inverted: white ink on black, a
   camera that changed), 16 at a time, each answer's true label posted back a round later
   (labels arrive late, as they do in production);
3. the monitor opens a drift episode; the server queues one retraining job; a worker (a
   child of the server, or ``osprey worker`` with ``--redis``) trains on the labelled
   production rows, the gate compares challenger and champion on held-back rows, the
   challenger takes 20% of the traffic, then all of it;
4. prints the accuracy of the answers on the shifted stream before and after.

Nothing here is a shortcut: the same HTTP APIs and processes a user runs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

__all__ = ["main", "http_call", "json_call"]

ROOT = Path(__file__).resolve().parent.parent
MODEL = "digits_cnn"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_call(method: str, url: str, body: bytes | None = None, ctype: str = "application/json",
          timeout: float = 60) -> tuple[int, dict, bytes]:
    req = urllib.request.Request(url, data=body, method=method, headers={"content-type": ctype} if body else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read()
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()


def json_call(method: str, url: str, body: object = None) -> object:
    status, _, raw = http_call(method, url, None if body is None else json.dumps(body).encode())
    if status >= 400:
        raise RuntimeError(f"{method} {url}: {status} {raw[:300]!r}")
    return json.loads(raw) if raw else None


class Stack:
    """The processes of the demo: osprey serve, and with --redis a redis-server and a worker."""

    def __init__(self, work: Path, store: Path, redis: bool):
        self.work, self.store, self.procs = work, store, []
        self.inference = f"http://127.0.0.1:{_free_port()}"
        self.management = f"http://127.0.0.1:{_free_port()}"
        env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        self.redis_url = ""
        if redis:
            binary = shutil.which("redis-server") or "/usr/bin/redis-server"
            if not Path(binary).exists():
                raise SystemExit("--redis needs redis-server (apt-get install -y redis-server)")
            port = _free_port()
            self._start("redis", [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                  "--appendonly", "no"], env)
            self.redis_url = f"redis://127.0.0.1:{port}/0"
            env["OSPREY_REDIS_URL"] = self.redis_url
            self._wait(lambda: _port_open(port), "redis-server")
        self._start("server", [sys.executable, "-m", "server.cli", "serve", "--foreground", "--model-store", str(store),
                               "--inference-address", self.inference, "--management-address", self.management,
                               "--metrics-address", f"http://127.0.0.1:{_free_port()}", "--no-grpc",
                               "--disable-token-auth", "--pid-file", str(work / "osprey.pid"),
                               "--models", f"{MODEL}={MODEL}.mar"], env)
        self._wait(lambda: "Osprey ready" in (work / "server.log").read_text(errors="replace"), "osprey serve",
                   timeout=120)
        if redis:
            self._start("worker", [sys.executable, "-m", "server.cli", "worker", "--redis", self.redis_url,
                                   "--model-store", str(store)], env)

    def _start(self, name: str, args: list[str], env: dict) -> None:
        log = open(self.work / f"{name}.log", "wb")
        self.procs.append((name, subprocess.Popen(args, cwd=self.work, stdout=log, stderr=subprocess.STDOUT, env=env)))

    def _wait(self, ready, what: str, timeout: float = 30) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            for name, p in self.procs:
                if p.poll() is not None:
                    raise SystemExit(f"{name} exited ({p.returncode}); see {self.work / (name + '.log')}")
            if ready():
                return
            time.sleep(0.1)
        raise SystemExit(f"{what} did not start in {timeout:g} s; see {self.work}")

    def stop(self) -> None:
        for _, p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for _, p in reversed(self.procs):
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def main(argv: list[str] | None = None) -> int:
    from examples.digits_cnn import digit_png
    from examples.traffic import shift_digits

    ap = argparse.ArgumentParser(prog="osprey demo retrain", description=__doc__.split("\n\n")[0])
    ap.add_argument("--store", default="model_store", help="where `osprey examples` wrote digits_cnn.mar")
    ap.add_argument("--redis", action="store_true", help="jobs on a Redis queue run by an `osprey worker`")
    ap.add_argument("--max-requests", type=int, default=20_000, help="give up after this many shifted requests")
    ap.add_argument("--keep", action="store_true", help="keep the demo's folder (logs, model store)")
    args = ap.parse_args(argv)
    source = Path(args.store)
    held = source / "samples" / "digits_heldout.npz"
    if not (source / f"{MODEL}.mar").exists() or not held.exists():
        print(f"{source}/{MODEL}.mar not found: run `osprey examples --out {source}` first", file=sys.stderr)
        return 2
    try:
        from tqdm import tqdm
    except ImportError:  # the progress bar is a nicety
        tqdm = None
    work = Path(tempfile.mkdtemp(prefix="osprey-demo-"))
    store = work / "store"
    store.mkdir()
    shutil.copy(source / f"{MODEL}.mar", store)
    data = np.load(held)
    t0 = time.monotonic()

    def say(msg: str) -> None:
        print(f"[{time.monotonic() - t0:6.1f} s] {msg}", flush=True)

    say(f"starting osprey ({'Redis queue + osprey worker' if args.redis else 'embedded job queue'}) in {work}")
    stack = Stack(work, store, args.redis)
    url = f"{stack.inference}/predictions/{MODEL}"
    pool = ThreadPoolExecutor(16)

    def send(grids: np.ndarray, labels: np.ndarray) -> tuple[list[str], list[bool], list[str]]:
        def one(g):
            status, headers, body = http_call("POST", url, digit_png(g), "image/png")
            if status != 200:
                return None, None, None
            top = max(json.loads(body).items(), key=lambda kv: kv[1])[0]
            return headers.get("x-request-id"), top, None
        out = list(pool.map(one, grids))
        ids = [o[0] for o in out]
        right = [o[1] == str(int(y)) for o, y in zip(out, labels) if o[0]]
        return ids, right, [o[2] for o in out]

    def feedback(ids: list[str], labels: np.ndarray) -> None:
        items = [{"request_id": i, "label": str(int(y))} for i, y in zip(ids, labels) if i]
        if items:
            http_call("POST", f"{stack.inference}/feedback/{MODEL}", json.dumps({"feedback": items}).encode())

    try:
        grids, labels = shift_digits(data["images"], data["labels"], "none", 400, seed=1)
        ids, right, _ = send(grids, labels)
        feedback(ids, labels)
        say(f"upright digits: accuracy {np.mean(right):.3f} on {len(right)} answers (version 1.0)")
        say("now the camera changes: inverted digits (white ink on black), labels posted one round later")
        before, after, pending = [], [], None
        job_id, job, seen_steps, bar, episode_at = None, None, 0, None, None
        n, rnd = 0, 0
        while n < args.max_requests:
            rnd += 1
            grids, labels = shift_digits(data["images"], data["labels"], "inverted", 100, seed=100 + rnd)
            ids, right, _ = send(grids, labels)
            n += len(grids)
            if pending is not None:
                feedback(*pending)  # the previous round's labels arrive now
            pending = (ids, labels)
            steps_before = {s["step"] for s in (job or {}).get("steps", [])}  # as the round began
            if episode_at is None:
                status = json_call("GET", f"{stack.inference}/monitoring/{MODEL}/1.0")
                if status["drift"]["detected"]:
                    episode_at = n
                    top = sorted(status["drift"]["features"], key=lambda f: -f.get("score", 0))[:3]
                    say(f"drift episode opened after {n} shifted requests (score {status['drift']['score']:.2f}; "
                        f"top features {', '.join(f['name'] for f in top)}); live accuracy so far "
                        f"{np.mean(before):.3f}")
            if job_id is None:
                jobs = json_call("GET", f"{stack.management}/retraining/jobs?model={MODEL}")
                jobs = jobs.get("jobs", jobs) if isinstance(jobs, dict) else jobs
                if jobs:
                    job_id = jobs[0]["id"]
                    say(f"job {job_id} queued (trigger {jobs[0]['trigger']}, episode {jobs[0]['episode']})")
                    if tqdm is not None:
                        bar = tqdm(total=100, desc="retraining", unit="%", leave=False,
                                   disable=not sys.stdout.isatty())
            if job_id is not None:
                job = json_call("GET", f"{stack.management}/retraining/jobs/{job_id}")
                if bar is not None:
                    bar.n = int(100 * float(job.get("progress") or 0))
                    bar.set_postfix_str(job.get("phase") or job["state"])
                    bar.refresh()
                for s in job.get("steps", [])[seen_steps:]:
                    (bar.write if bar is not None else print)(f"         job step: {s['step']}: {s.get('detail', '')}")
                seen_steps = len(job.get("steps", []))
            # a round answered by 1.0 alone counts as before; one that began with the new version the
            # default counts as after; rounds that saw the canary (a mix of both) count as neither
            steps_now = {s["step"] for s in (job or {}).get("steps", [])}
            if "promoted" in steps_before:
                after.extend(right)
            elif not steps_now & {"canary", "shadow", "promoted"}:
                before.extend(right)
            if job is not None:
                if job["state"] in ("succeeded", "rejected", "failed", "cancelled"):
                    if job["state"] != "succeeded" or len(after) >= 400:
                        break
        if bar is not None:
            bar.close()
        if job is None:
            say(f"no retraining job after {n} shifted requests; see {work}")
            return 1
        say(f"job {job_id} ended {job['state']}: {job.get('message', '')}")
        gate = job.get("gate") or {}
        hold = gate.get("holdout") or {}
        if hold:
            m = gate.get("metric", "accuracy")
            say(f"gate: {m} on held-back production rows {hold['champion'].get(m)} (champion) -> "
                f"{hold['challenger'].get(m)} (challenger); golden set "
                f"{(gate.get('golden') or {}).get('champion', {}).get(m)} -> "
                f"{(gate.get('golden') or {}).get('challenger', {}).get(m)}")
        say(f"accuracy on the shifted stream: before {np.mean(before):.3f} ({len(before)} answers), "
            f"after {np.mean(after) if after else float('nan'):.3f} ({len(after)} answers, new default)")
        return 0 if job["state"] == "succeeded" and after and np.mean(after) > np.mean(before) else 1
    finally:
        pool.shutdown(wait=False)
        stack.stop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"kept {work}")


if __name__ == "__main__":
    sys.exit(main())
