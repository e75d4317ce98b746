"""One command for the whole benchmark: Osprey vs TorchServe 0.12, the Python peers (MLServer,
LitServe, Ray Serve, BentoML), FastAPI and the raw ceiling.

    .venv/bin/python -m benchmarks.run            # full run (about 70 minutes on 2 cores)
    .venv/bin/python -m benchmarks.run --quick    # tiny MLP only, every system, about 5 minutes

Steps: build the models (same archive files for every server); measure the raw ceiling
(forward passes in a loop at batch 1..64, no server); install TorchServe 0.12 into
``benchmarks/.work/tsvenv`` unless present, and each Python peer into ``benchmarks/.work/peer-NAME``
(``benchmarks/peerenv.py``); then for each system start the real server,
record start-up time and resident memory, drive each model with ``hey`` (closed loop at
each concurrency, warm-up first), an exact closed-loop run at concurrency 1 with the
benchmark's own driver, and the open loop: first the system's open-loop capacity, the
highest Poisson rate it holds with the open-loop driver itself (short probes stepping down
from its best closed-loop throughput), then a full-length run at 70% of that; stop it.
Osprey is also driven over gRPC: closed loop with ``benchmarks/grpc_driver.py`` (Python
grpc.aio; MLServer's gRPC port the same way, point by point beside it) and, at concurrency 1, with the C++ client ``benchmarks/grpc_c1`` (plus the same
client against its own C++ server: the client + transport floor); where a setting exists,
Osprey also runs with metrics off. Writes ``benchmarks/results/latest.json``, the plots, and
``benchmarks/RESULTS.md`` (``benchmarks/report.py``).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path
from urllib.parse import urlsplit

from . import load
from .models import BenchModel, build_models
from .systems import PEER_SERVERS, ConstantApp, FastAPIApp, Osprey, Server, TorchServe, tree_rss_mb

__all__ = ["main"]

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

# Settings names a metrics switch may have in server/settings.py, and the value that turns metrics off.
METRICS_OFF_CANDIDATES = {"request_metrics": "false", "enable_metrics": "false", "metrics_enabled": "false", "disable_metrics": "true",
                          "metrics_mode": "off", "metrics": "off"}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --- plan -----------------------------------------------------------------------------
def plan(args) -> dict:
    if args.quick:
        return {"concurrency": [1, 32], "warmup": 0.5, "duration": 2.0, "cnn_duration": 2.0,
                "exact_c1": 2.0, "exact_models": ["mlp"], "open": 2.0, "open_warmup": 0.5, "open_models": ["mlp"], "ceiling_s": 0.2,
                "probe_s": 1.0, "probe_warmup": 0.5, "probe_steps": 7, "probe_factor": 0.85,
                "grpc_c1_requests": 1000, "grpc_c1_warmup": 300,
                "with_cnn": False, "with_digits": False, "fastapi_models": ["mlp"], "startup_repeats": 0,
                "constant_conc": [32], "profile_s": 0,
                "variant_models": ["mlp"], "variant_conc": [32]}
    return {"concurrency": [1, 8, 32, 128], "warmup": 3.0, "duration": 10.0, "cnn_duration": 15.0,
            "exact_c1": 6.0, "exact_models": ["mlp", "mlp_nb", "cnn", "digits_cnn", "digits_cnn_builtin"],
            "open": 20.0, "open_warmup": 2.0, "open_models": ["mlp", "mlp_nb", "cnn", "digits_cnn"], "ceiling_s": 1.0,
            "probe_s": 3.0, "probe_warmup": 1.0, "probe_steps": 7, "probe_factor": 0.85,
            "grpc_c1_requests": 5000, "grpc_c1_warmup": 300,
            "with_cnn": True, "with_digits": True, "fastapi_models": ["mlp", "cnn"], "startup_repeats": 3,
            "constant_conc": [1, 8, 32, 128], "profile_s": 15,
            "variant_models": ["mlp", "mlp_nb"], "variant_conc": [1, 32]}


def machine() -> dict:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = 0
    try:
        mem = int(Path("/proc/meminfo").read_text().split()[1]) // 1024
    except (OSError, ValueError, IndexError):
        pass
    hey_v = "hey (Debian)"
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    except OSError:
        rev = ""
    import torch

    return {"nproc": os.cpu_count(), "cpu_model": cpu, "mem_mib": mem, "python": platform.python_version(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "kernel": platform.release(),
            "osprey_commit": rev, "load_tool": hey_v}


# --- measurements ---------------------------------------------------------------------
def run_json(cmd: list[str], timeout: float) -> dict:
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])}... failed ({proc.returncode}): {proc.stderr[-1500:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def ceilings(models: dict[str, BenchModel], p: dict) -> dict:
    out = {}
    seen = {}
    for m in models.values():
        if m.weights is None or m.kind == "mlp" and not m.batching:
            continue
        key = str(m.weights)
        if key not in seen:
            log(f"ceiling: {m.name} (forward passes, batch 1..64)")
            seen[key] = run_json([sys.executable, "-m", "benchmarks.ceiling", "--weights", key,
                                  "--shape", ",".join(map(str, m.input_shape)), "--seconds", str(p["ceiling_s"])],
                                 timeout=900)
        out[m.name] = seen[key]
    if "mlp" in out:
        out["mlp_nb"] = out["mlp"]
    return out


def conc_for(system: str, m: BenchModel, p: dict) -> list[int]:
    conc = p["constant_conc"] if system == "uvicorn_constant" else p["concurrency"]
    if system in p.get("variant_tags", ()):
        conc = p["variant_conc"]
    if m.extra.get("concurrency"):
        conc = [c for c in conc if c in m.extra["concurrency"]] or m.extra["concurrency"]
    return conc


def closed_point(system: str, server: Server, m: BenchModel, c: int, p: dict) -> dict:
    duration = p["cnn_duration"] if m.kind == "cnn" else p["duration"]
    body, content_type = server.request_for(m)
    r = load.hey(server.predict_url(m.name), str(body), content_type, c, duration, p["warmup"])
    r.update(system=system, model=m.name, protocol="rest", concurrency=c, tool="hey")
    log(f"  {system:18s} {m.name:18s} c={c:<4d} {r['rps']:9.1f} req/s  p50 {r.get('p50_ms', 0):7.2f} ms"
        f"  p99 {r.get('p99_ms', 0):7.2f} ms  errors {r['errors']}")
    return r


def closed_rows(system: str, server: Server, models: list[BenchModel], p: dict) -> list[dict]:
    return [closed_point(system, server, m, c, p) for m in models for c in conc_for(system, m, p)]


def exact_c1(system: str, server: Server, m: BenchModel, p: dict) -> dict:
    body, content_type = server.request_for(m)
    r = run_json([sys.executable, "-m", "benchmarks.openloop", "--url", server.predict_url(m.name),
                  "--body", str(body), "--content-type", content_type, "--closed", "1",
                  "--duration", str(p["exact_c1"]), "--warmup", "1"], timeout=p["exact_c1"] + 120)
    r.update(system=system, model=m.name, protocol="rest", concurrency=1, tool="openloop --closed 1")
    log(f"  {system:18s} {m.name:10s} exact c=1: p50 {r.get('p50_ms', 0):.3f} ms p99 {r.get('p99_ms', 0):.3f} ms")
    return r


def openloop_binary(work: Path, notes: list[str]) -> Path | None:
    """Compile benchmarks/openloop.c (wrk2-like, µs timers); None where no C compiler is found."""
    exe = work / "openloop"
    src = HERE / "openloop.c"
    if exe.exists() and exe.stat().st_mtime >= src.stat().st_mtime:
        return exe
    cc = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc:
        proc = subprocess.run([cc, "-O2", "-o", str(exe), str(src), "-lm"], capture_output=True, text=True)
        if proc.returncode == 0:
            return exe
        notes.append(f"openloop.c did not compile ({proc.stderr[-300:]}); open loop used the Python driver")
    else:
        notes.append("no C compiler: open loop used the Python driver (about 1 ms timer resolution, more client CPU)")
    return None


# Open-loop capacity: the highest Poisson rate a system holds with the open-loop driver itself.
# hey -c 32 keeps 32 connections and a cheap client; openloop.c opens up to 512 and costs about
# 10 µs a request, so 70% of hey's throughput can already be more than a system holds open-loop.
HELD_PACE = 0.97         # achieved >= 97% of offered
P99_FLOOR_MS = 100.0     # p99 limit: max(P99_TIMES_C1 x the system's c=1 p50, P99_FLOOR_MS)
P99_TIMES_C1 = 50.0


def open_run(server: Server, m: BenchModel, rate: float, duration: float, warmup: float, p: dict) -> dict:
    """One open-loop run (Poisson at ``rate``): the driver's JSON plus ``wall_s``, its wall-clock time."""
    url = server.predict_url(m.name)
    body, content_type = server.request_for(m)
    if p.get("openloop_bin"):
        parts = urlsplit(url)
        cmd = [p["openloop_bin"], parts.hostname, str(parts.port), parts.path, str(body), content_type,
               f"{rate:.1f}", f"{duration:g}", f"{warmup:g}", "512", "1"]
    else:
        cmd = [sys.executable, "-m", "benchmarks.openloop", "--url", url, "--body", str(body),
               "--content-type", content_type, "--rate", f"{rate:.1f}", "--duration", f"{duration:g}",
               "--warmup", f"{warmup:g}"]
    t0 = time.monotonic()
    r = run_json(cmd, timeout=duration + warmup + 180)
    r["wall_s"] = round(time.monotonic() - t0, 3)
    return r


def pace(r: dict, duration: float, warmup: float, p99_limit: float) -> tuple[float, float]:
    """(offered, achieved) in req/s for an open-loop run. Offered: the requests the Poisson schedule
    drew in the measured window over its length (not the nominal rate, so that a short low-rate run is
    not failed by the draw's ±1/sqrt(n)). Achieved: those answered with 200, scaled to the whole run
    (warm-up included), over the wall-clock time until the last answer less one p99 latency (capped
    at the p99 limit: the last request's own time in flight). The driver waits for every answer, so
    a system that falls behind shows as a run that took longer than its schedule."""
    sent, ok, wall = r.get("sent") or 0, r.get("ok") or 0, r.get("wall_s") or 0.0
    offered = sent / duration if duration else 0.0
    span = wall - min(r.get("p99_ms") or 0.0, p99_limit) / 1000
    achieved = ok * (duration + warmup) / duration / span if duration and span > 0 else 0.0
    return offered, achieved


def c1_p50(result: dict, system: str, model: str) -> float | None:
    """The system's lowest c=1 p50 for the model in this run (exact driver or hey)."""
    vals = [r.get("p50_ms") for sec in ("exact_c1", "closed") for r in result.get(sec, [])
            if r.get("system") == system and r.get("model") == model and r.get("concurrency") == 1]
    vals = [v for v in vals if v]
    return min(vals) if vals else None


def judge_open(r: dict, duration: float, warmup: float, p99_limit: float) -> tuple[bool, str | None, float, float]:
    """(held, why not, offered, achieved): held = no errors (non-200 answers, failed or lost connections,
    unanswered), achieved >= 97% of offered, and p99 below the limit."""
    offered, achieved = pace(r, duration, warmup, p99_limit)
    why = []
    if r.get("errors"):
        codes = {k: v for k, v in (r.get("status") or {}).items() if str(k) != "200"}
        why.append(f"{r['errors']} errors" + (f" {codes}" if codes else ""))
    if offered and achieved < HELD_PACE * offered:
        why.append(f"fell behind: {achieved:.0f} of {offered:.0f}/s")
    if r.get("p99_ms") is None or r["p99_ms"] >= p99_limit:
        why.append(f"p99 {r.get('p99_ms') or 0:.0f} ms >= {p99_limit:.0f} ms")
    return not why, "; ".join(why) or None, offered, achieved


def open_capacity(system: str, server: Server, m: BenchModel, estimate: float, p99_limit: float, p: dict) -> dict:
    """Search down from the closed-loop estimate for the highest rate the open-loop driver shows the
    system holding: short probes, each ``probe_factor`` x the last (after a probe that fell far behind,
    the geometric mean of its rate and what it achieved, where that is lower); a probe that failed on
    p99 alone is repeated once at the same rate; at most ``probe_steps`` probes. Stops at the first held rate."""
    d, w = p["probe_s"], p["probe_warmup"]
    probes, rate, capacity, retried = [], estimate, None, False
    for _ in range(p["probe_steps"]):
        r = open_run(server, m, rate, d, w, p)
        held, why, offered, achieved = judge_open(r, d, w, p99_limit)
        probes.append({"rate": round(rate, 1), "offered_rps": round(offered, 1), "achieved_rps": round(achieved, 1),
                       "errors": r.get("errors"), "status": r.get("status"), "p50_ms": r.get("p50_ms"),
                       "p99_ms": r.get("p99_ms"), "lateness_p99_ms": (r.get("lateness") or {}).get("p99_ms"),
                       "wall_s": r["wall_s"], "held": held, "why": why})
        log(f"  {system:18s} {m.name:18s} probe {rate:8.1f}/s: achieved {achieved:8.1f}/s p50 {r.get('p50_ms') or 0:.2f} ms"
            f" p99 {r.get('p99_ms') or 0:.2f} ms errors {r.get('errors')} -> " + ("held" if held else why))
        if held:
            capacity = rate
            break
        if achieved >= HELD_PACE * offered and not r.get("errors") and not retried:
            retried = True  # p99 alone: one scheduling stall can fail a short probe; same rate once more
            continue
        retried = False
        nxt = rate * p["probe_factor"]
        if 0 < achieved < HELD_PACE * offered:
            # fell behind: skip down to the geometric mean of the rate and what it achieved, where lower (a
            # system far past its capacity can serve much less than its capacity: not taken as the capacity)
            nxt = min(nxt, (rate * achieved) ** 0.5)
        rate = max(1.0, nxt)
    return {"probes": probes, "open_capacity_rps": capacity, "capacity_found": capacity is not None,
            "probe_s": d, "probe_warmup_s": w, "p99_limit_ms": p99_limit}


def open_row(system: str, server: Server, m: BenchModel, result: dict, p: dict) -> dict | None:
    """Open-loop capacity search, then the measured run at 70% of the open-loop capacity (full duration)."""
    estimate = max((r["rps"] for r in result["closed"] if r["model"] == m.name and r["system"] == system),
                   default=0.0)
    if estimate <= 0:
        return None
    base = c1_p50(result, system, m.name)
    p99_limit = max(P99_TIMES_C1 * base, P99_FLOOR_MS) if base else P99_FLOOR_MS
    search = open_capacity(system, server, m, estimate, p99_limit, p)
    # where no probe held, the measured point is still run (at 70% of the lowest probe) and stays flagged
    cap = search["open_capacity_rps"] or search["probes"][-1]["rate"]
    rate = max(1.0, 0.7 * cap)
    duration = p["open"]
    if m.kind in ("cnn",):
        duration = max(duration, min(60.0, 2000 / rate))  # enough samples for a p99
    r = open_run(server, m, rate, duration, p["open_warmup"], p)
    held, why, offered, achieved = judge_open(r, duration, p["open_warmup"], p99_limit)
    r.update(system=system, model=m.name, protocol="rest", closed_loop_estimate_rps=estimate, c1_p50_ms=base,
             capacity_rps=cap, load_fraction=0.7, held_by_probe_rule=held, probe_rule_why=why,
             offered_rps=offered, achieved_wall_rps=achieved, **search)
    log(f"  {system:18s} {m.name:18s} open {rate:8.1f}/s (70% of {cap:.0f}/s"
        f"{'' if search['capacity_found'] else ', no probe held'}): p50 {r.get('p50_ms', 0):.2f} ms"
        f" p99 {r.get('p99_ms', 0):.2f} ms errors {r['errors']} (driver lateness p99 {r['lateness'].get('p99_ms', 0):.2f} ms)")
    return r


def run_json_group(cmd: list[str], timeout: float) -> dict:
    """run_json for a command that spawns processes: on timeout its whole process group is killed."""
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise RuntimeError(f"{' '.join(cmd[1:3])} did not finish in {timeout:.0f} s")
    if proc.returncode != 0 or not out.strip():
        raise RuntimeError(f"{' '.join(cmd[1:3])} failed ({proc.returncode}): {err[-1500:]}")
    return json.loads(out.strip().splitlines()[-1])


def grpc_rows(targets: list[tuple[str, Server]], models: list[BenchModel], p: dict, notes: list[str],
              everyone: list[Server] = ()) -> list[dict]:
    """Each target over gRPC (Open Inference Protocol ModelInfer, FP32 1x16), every point on each target
    back to back (Osprey as ``osprey_grpc``, MLServer as ``mlserver_grpc``), plus Osprey's ServerLive at c=1
    (the transport floor). ModelInfer is driven by the C++ client (benchmarks/grpc_c1: closed loop of C
    threads, tens of µs of client CPU a call, as hey is for REST) where it was built, else by
    benchmarks/grpc_driver.py (Python grpc.aio, whose client costs about as much CPU as the server on
    2 cores, so its rows understate every server); a marked gap when neither exists."""
    from . import grpc_c1

    binary = p.get("grpc_c1_bin")
    driver = HERE / "grpc_driver.py"
    rows = []
    points = [(m, c, "oip", system, server) for m in models for c in p["concurrency"] for system, server in targets]
    points += [(models[0], 1, "live", system, server) for system, server in targets
               if system == "osprey_grpc"] if models else []
    if not binary and not driver.exists():
        notes.append("gRPC rows missing: neither benchmarks/grpc_c1 nor benchmarks/grpc_driver.py can run")
        return []
    for m, c, api, system, server in points:
        spec = "INPUT0:FP32:1," + ",".join(map(str, m.input_shape))
        channels = 1 if c < 8 else 2
        if binary and api == "oip":  # C requests in flight from C threads; at c=1 a count of calls
            calls = dict(requests=p["grpc_c1_requests"], warmup=p["grpc_c1_warmup"]) if c == 1 else \
                dict(requests=1, warmup=20, concurrency=c, channels=channels, duration=p["duration"])
            cmd = grpc_c1.command(binary, server.grpc, "infer", m.name, spec, **calls)
            tool = "grpc_c1 (C++ client, infer)"

            def measure(m=m, server=server, spec=spec, calls=calls):
                return grpc_c1.run(binary, server.grpc, "infer", m.name, spec, **calls)
        else:
            cmd = [sys.executable, str(driver), "--target", server.grpc, "--api", api, "--model", m.name,
                   "--input", spec, "-c", str(c), "-p", str(channels), "-d", str(p["duration"]),
                   "--warmup", str(p["warmup"])]
            tool = "grpc_driver (" + api + ")"

            def measure(cmd=cmd):
                return run_json_group(cmd, timeout=p["duration"] + p["warmup"] + 120)
        try:
            if everyone:
                only(everyone, server)
            r = measure()
        except Exception as exc:  # leave a marked gap, keep going
            notes.append(f"gRPC {system} {api} {m.name} c={c} missing: {str(exc)[:300]}")
            continue
        lat = r.get("latency_ms", {})
        row = {"system": system if api == "oip" else f"{system}_live", "model": m.name, "protocol": "grpc",
               "concurrency": c, "tool": tool, "rps": r.get("throughput_rps") or 0.0,
               "p50_ms": lat.get("p50"), "p90_ms": lat.get("p90"), "p99_ms": lat.get("p99"), "mean_ms": lat.get("mean"),
               "n": r.get("requests"), "errors": r.get("errors"), "command": " ".join(cmd[1:]), "raw": r}
        log(f"  {row['system']:18s} {m.name:18s} c={c:<4d} {row['rps']:9.1f} req/s  p50 {row['p50_ms'] or 0:7.2f} ms"
            f"  p99 {row['p99_ms'] or 0:7.2f} ms  errors {row['errors']}")
        rows.append(row)
    return rows


def grpc_cpp_rows(binary: Path, server: Osprey, m: BenchModel, p: dict, notes: list[str]) -> list[dict]:
    """gRPC at concurrency 1 with benchmarks/grpc_c1 (a synchronous C++ client costing tens of µs a call):
    Osprey's ModelInfer and ServerLive, then the same client against its own C++ server of the same
    service (the client + transport floor)."""
    from . import grpc_c1

    spec = "INPUT0:FP32:1," + ",".join(map(str, m.input_shape))
    n, w = p["grpc_c1_requests"], p["grpc_c1_warmup"]
    points = [("osprey", "infer", lambda: grpc_c1.run(binary, server.grpc, "infer", m.name, spec, n, w)),
              ("osprey", "live", lambda: grpc_c1.run(binary, server.grpc, "live", "", spec, n, w)),
              ("cpp_floor", "infer", lambda: grpc_c1.floor(binary, "infer", spec, n, w)),
              ("cpp_floor", "live", lambda: grpc_c1.floor(binary, "live", spec, n, w))]
    rows = []
    for target, api, fn in points:
        try:
            r = fn()
        except Exception as exc:
            notes.append(f"gRPC C++ client {api} against {target} failed: {str(exc)[:300]}")
            continue
        lat = r.get("latency_ms", {})
        row = {"target": target, "api": api, "model": m.name if api == "infer" else None, "concurrency": 1,
               "tool": "grpc_c1 (C++ sync client)", "input": spec if api == "infer" else None,
               "n": r.get("requests"), "errors": r.get("errors"), "rps": r.get("throughput_rps"),
               "p50_ms": lat.get("p50"), "p90_ms": lat.get("p90"), "p99_ms": lat.get("p99"), "mean_ms": lat.get("mean"),
               "client_cpu_us_per_call": r.get("client_cpu_us_per_call"), "raw": r}
        log(f"  grpc_c1 {target:10s} {api:6s} c=1: p50 {row['p50_ms'] or 0:.3f} ms p99 {row['p99_ms'] or 0:.3f} ms"
            f" {row['rps'] or 0:.0f} req/s errors {row['errors']} (client CPU {row['client_cpu_us_per_call']} µs/call)")
        rows.append(row)
    return rows


def variants(args, notes: list[str]) -> list[tuple[str, dict]]:
    """Osprey configurations compared with the default one on the tiny MLP."""
    from server.settings import Settings

    names = set(Settings.__dataclass_fields__)
    out = []
    metrics = [(k, v) for k, v in METRICS_OFF_CANDIDATES.items() if k in names]
    if metrics:
        out.append(("osprey_nometrics", dict(metrics[:1])))
    else:
        notes.append("metrics on/off: no metrics switch in server/settings.py yet (looked for: "
                     + ", ".join(METRICS_OFF_CANDIDATES) + ")")
    if "torch_threads" in names:
        out.append(("osprey_threads1", {"torch_threads": "1"}))
    for spec in args.osprey_variant or []:
        tag, _, kvs = spec.partition(":")
        cfg = dict(kv.split("=", 1) for kv in kvs.split(",") if "=" in kv)
        unknown = [k for k in cfg if k not in names]
        if unknown:
            notes.append(f"variant {tag}: unknown settings {unknown} (server/settings.py); skipped")
            continue
        out.append((f"osprey_{tag}", cfg))
    return out


def loadavg() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def started(system: str, server: Server, result: dict, notes: list[str]) -> None:
    """Record a freshly started server's start-up time and idle memory."""
    for name, why in getattr(server, "failed", {}).items():
        notes.append(f"{system}: model {name} skipped: {why}")
    log(f"{system}: first answer {server.startup.get('first_answer_s', 0):.2f} s, "
        f"all {len(server.models)} models {server.startup.get('all_models_s', 0):.2f} s, RSS {server.rss_mb():.0f} MiB")
    result["startup"].append({"system": system, "models": [m.name for m in server.models], **server.startup})
    result["memory"].append({"system": system, "when": "idle, models loaded", "models": [m.name for m in server.models],
                             "rss_mib": server.rss_mb(), "idle_cpu_pct": round(server.idle_cpu_pct(), 2)})


def only(servers, server: Server) -> None:
    """Measure ``server`` alone: every other server's process tree is paused (SIGSTOP), this one
    continues. All stay started, so the points still run on each system back to back."""
    for other in servers:
        if other is not server:
            other.pause()
    server.resume()


def drive_all(servers: dict[str, Server], models: dict[str, BenchModel], p: dict, result: dict,
              notes: list[str]) -> None:
    """Every measurement point runs on each system back to back, so that a change in the
    machine's background load hits all systems alike and ratios stay meaningful; the others are
    paused meanwhile (:func:`only`)."""
    everyone = list(servers.values())
    result["loadavg"].append({"phase": "closed loop", "before": loadavg()})
    for name, m in models.items():
        for c in sorted({c for s, srv in servers.items() if m in srv.models for c in conc_for(s, m, p)}):
            for system, server in servers.items():
                if m in server.models and c in conc_for(system, m, p):
                    only(everyone, server)
                    row = closed_point(system, server, m, c, p)
                    if system in p.get("variant_tags", ()):
                        row["config"] = server.config
                        result["variants"].append(row)
                    else:
                        result["closed"].append(row)
    result["loadavg"][-1]["after"] = loadavg()
    result["loadavg"].append({"phase": "exact c=1 and open loop", "before": loadavg()})
    for name, m in models.items():
        for system, server in servers.items():
            if (m not in server.models or system == "uvicorn_constant" or name not in p["exact_models"]
                    or system in p.get("variant_tags", ())):
                continue
            try:
                only(everyone, server)
                result["exact_c1"].append(exact_c1(system, server, m, p))
            except Exception as exc:
                notes.append(f"{system} {m.name}: exact c=1 run failed: {exc}")
    for name, m in models.items():
        if name not in p["open_models"]:
            continue
        for system, server in servers.items():
            # the bare uvicorn app (a constant answer, mlp's body) is the platform's floor for the tail goal
            if m not in server.models or system in p.get("variant_tags", ()) or (system == "uvicorn_constant" and name != "mlp"):
                continue
            try:
                only(everyone, server)
                row = open_row(system, server, m, result, p)
                if row:
                    result["open"].append(row)
            except Exception as exc:
                notes.append(f"{system} {m.name}: open-loop run failed: {exc}")
    result["loadavg"][-1]["after"] = loadavg()
    for server in everyone:
        server.resume()
    for system, server in servers.items():
        result["memory"].append({"system": system, "when": "after load", "models": [m.name for m in server.models],
                                 "rss_mib": server.rss_mb()})


def startup_repeats(work: Path, model: BenchModel, ts_bin: Path | None, repeats: int, result: dict,
                    peer_python: dict[str, Path] | None = None) -> None:
    """Start each server with only the tiny MLP, several times: process start to first answer."""
    for i in range(repeats):
        kinds = [("osprey", lambda w: Osprey(w, [model]))]
        if ts_bin is not None:
            kinds.append(("torchserve", lambda w: TorchServe(w, [model], ts_bin)))
        for peer, python in (peer_python or {}).items():
            kinds.append((peer, lambda w, peer=peer, python=python: PEER_SERVERS[peer](w, [model], python)))
        for name, make in kinds:
            server = make(work / f"startup-{name}-{i}")
            try:
                server.start()
                rss = server.rss_mb()
                result["startup_single"].append({"system": name, "model": model.name, "run": i,
                                                 "first_answer_s": server.startup["first_answer_s"], "rss_mib": rss})
                log(f"startup {name} #{i}: {server.startup['first_answer_s']:.2f} s, RSS {rss:.0f} MiB")
            finally:
                server.stop()


def summarize_collapsed(path: Path, top: int = 25) -> dict:
    """Top frames by own (self) and inclusive samples from py-spy's collapsed stacks, per thread."""
    own: dict[str, int] = {}
    incl: dict[str, int] = {}
    threads: dict[str, int] = {}
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        n = int(n)
        total += n
        frames = stack.split(";")
        threads[frames[0]] = threads.get(frames[0], 0) + n
        leaf = frames[-1]
        own[leaf] = own.get(leaf, 0) + n
        for f in set(frames[1:]):
            incl[f] = incl.get(f, 0) + n
    pct = lambda d: [(k, round(100.0 * v / total, 1)) for k, v in sorted(d.items(), key=lambda kv: -kv[1])[:top]]
    return {"samples": total, "threads": pct(threads), "self": pct(own), "inclusive": pct(incl)}


def _shown(path: Path) -> str:
    """A file the run wrote, as the report names it: relative to the repository when it is in it
    (the default --out), else as given (an --out elsewhere)."""
    path = Path(path)
    try:
        return str(path.resolve().relative_to(ROOT.resolve()))
    except ValueError:
        return str(path)


def profile_osprey(work: Path, model: BenchModel, seconds: float, out_dir: Path, result: dict) -> None:
    """py-spy on Osprey while hey drives the tiny MLP at concurrency 32 (flamegraph + collapsed stacks)."""
    pyspy = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
    if not pyspy:
        result["notes"].append("profile skipped: py-spy not installed (pip install py-spy)")
        return
    server = Osprey(work / "profile", [model]).start()
    try:
        hey_cmd = load.hey_command(server.predict_url(model.name), str(model.body), model.content_type, 32,
                                   3 * seconds + 10)
        hey_proc = subprocess.Popen(hey_cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        time.sleep(3)
        svg = out_dir / "profile-osprey-mlp-c32.svg"
        raw = out_dir / "profile-osprey-mlp-c32.collapsed.txt"
        gil = out_dir / "profile-osprey-mlp-c32.gil.collapsed.txt"
        for fmt, path, extra in (("flamegraph", svg, []), ("raw", raw, []), ("raw", gil, ["--gil"])):
            subprocess.run([pyspy, "record", "--pid", str(server.proc.pid), "--duration", str(int(seconds)),
                            "--rate", "250", "--threads", "--nonblocking", "--format", fmt, "--output", str(path),
                            *extra], capture_output=True, timeout=seconds + 60)
        dump = subprocess.run([pyspy, "dump", "--pid", str(server.proc.pid)], capture_output=True, text=True, timeout=30)
        hey_out, _ = hey_proc.communicate(timeout=3 * seconds + 90)
        result["profile"] = {"flamegraph": _shown(svg) if svg.exists() else None,
                             "collapsed": _shown(raw) if raw.exists() else None,
                             "summary": summarize_collapsed(raw) if raw.exists() else None,
                             "gil_summary": summarize_collapsed(gil) if gil.exists() else None,
                             "hey_during_profile": load.parse_hey(hey_out), "dump": dump.stdout[-4000:]}
        log(f"profile: {svg}")
    finally:
        server.stop()


# --- main -----------------------------------------------------------------------------
# mlserver_grpc: MLServer's gRPC port, driven by grpc_driver.py beside Osprey's gRPC
ALL_SYSTEMS = ("osprey", "osprey_grpc", "torchserve", "fastapi", "uvicorn_constant", "ceiling",
               "mlserver", "mlserver_grpc", "litserve", "rayserve", "bentoml")


def peers_wanted(systems: set[str]) -> list[str]:
    """The peers to start: each named one, and MLServer also when only its gRPC is asked for."""
    return [name for name in PEER_SERVERS if name in systems or f"{name}_grpc" in systems]


def install_peers(names: list[str], work: Path, result: dict, notes: list[str]) -> dict[str, Path]:
    """Each peer's venv (created on demand, reused when present): name -> its python."""
    from .peerenv import PEERS, ensure_peer, installed_version

    pythons = {}
    for name in names:
        venv = work / f"peer-{name}"
        try:
            pythons[name] = ensure_peer(name, venv, log=log)
            result["peers"][name] = {"label": PEERS[name].label, "version": installed_version(venv, PEERS[name]),
                                     "packages": list(PEERS[name].packages)}
        except Exception as exc:
            notes.append(f"{name} rows missing: {str(exc)[:800]}")
            result["peers"][name] = {"label": PEERS[name].label, "error": f"could not be installed: {str(exc)[:300]}"}
    return pythons


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Osprey vs TorchServe vs FastAPI vs the raw ceiling")
    ap.add_argument("--quick", action="store_true", help="tiny MLP only, short runs (about 5 minutes)")
    ap.add_argument("--work", default=str(HERE / ".work"), help="scratch folder (venvs, archives, logs)")
    ap.add_argument("--out", default=str(HERE / "results"), help="where latest.json and the plots go")
    ap.add_argument("--report", default=str(HERE / "RESULTS.md"), help="the Markdown report to write")
    ap.add_argument("--systems", default=",".join(ALL_SYSTEMS), help="comma-separated subset of " + ",".join(ALL_SYSTEMS))
    ap.add_argument("--cnn-side", type=int, default=112,
                    help="CNN input is 3xSxS float32 (112: about 20 ms a sample here, enough requests per point)")
    ap.add_argument("--job-queue-size", type=int, default=1000,
                    help="job_queue_size on both servers (their default, 100, answers 503 at c=128)")
    ap.add_argument("--no-profile", action="store_true")
    ap.add_argument("--no-digits", action="store_true")
    ap.add_argument("--digits", action="store_true", help="include digits_cnn in a --quick run")
    ap.add_argument("--no-cnn", action="store_true")
    ap.add_argument("--osprey-variant", action="append", metavar="TAG:key=value[,key=value]",
                    help="also run Osprey with these config.properties settings (tiny MLP), e.g. threads2:torch_threads=2")
    ap.add_argument("--overload", type=float, default=0.0, metavar="SECONDS",
                    help="also run the overload section (benchmarks/overload.py): capacity probe, then 1x and 2x "
                         "capacity open loop for SECONDS each on Osprey's mlp and digits_cnn")
    args = ap.parse_args(argv)
    t_start = time.monotonic()
    load_start = loadavg()
    p = plan(args)
    if args.no_cnn:
        p["with_cnn"] = False
    if args.no_digits:
        p["with_digits"] = False
    if args.digits:
        p["with_digits"] = True
    systems = set(args.systems.split(","))
    p["openloop_bin"] = None
    p["job_queue_size"] = args.job_queue_size
    p["osprey_config"] = {"job_queue_size": args.job_queue_size}
    work, out = Path(args.work), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    notes: list[str] = []
    result: dict = {"meta": {"date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                             "command": "python -m benchmarks.run " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])),
                             "mode": "quick" if args.quick else "full", "plan": p, "machine": machine(),
                             "loadavg_start": load_start, "others_paused": True},
                    "models": {}, "ceiling": {}, "closed": [], "exact_c1": [], "open": [], "grpc_c1": [], "startup": [],
                    "startup_single": [], "memory": [], "variants": [], "overload": [], "profile": None, "notes": notes, "loadavg": [],
                    "config": {}, "peers": {}}
    log(f"building models in {work} ({result['meta']['mode']} run)")
    models = build_models(work, cnn_side=args.cnn_side, with_cnn=p["with_cnn"], with_digits=p["with_digits"], log=notes)
    result["models"] = {n: m.as_json() for n, m in models.items()}
    exe = openloop_binary(work, notes)
    p["openloop_bin"] = str(exe) if exe else None
    grpc_bin = None
    if "osprey_grpc" in systems:
        from . import grpc_c1

        grpc_bin = grpc_c1.build(work / "grpc_c1")
        p["grpc_c1_bin"] = str(grpc_bin) if grpc_bin else None
        if grpc_bin is None:
            notes.append("gRPC c=1: the C++ client (benchmarks/grpc_c1.cc) could not be built (needs g++, protoc, "
                         "grpc_cpp_plugin, pkg-config grpc++ protobuf: apt-get install libgrpc++-dev "
                         "protobuf-compiler-grpc libprotobuf-dev pkg-config); the gRPC goal uses the Python "
                         "grpc.aio driver's c=1 p50, which includes that client's own cost")
    served = list(models.values())

    if "ceiling" in systems:
        result["ceiling"] = ceilings(models, p)

    ts_bin = None
    if "torchserve" in systems:
        try:
            from .tsenv import ensure_torchserve

            ts_bin = ensure_torchserve(work / "tsvenv", log=log)
            result["meta"]["machine"]["torchserve"] = "0.12.0"
        except Exception as exc:
            notes.append(f"TorchServe rows missing: {exc}")

    peer_python = install_peers(peers_wanted(systems), work, result, notes)

    def guarded(name: str, fn) -> None:
        try:
            fn()
        except Exception as exc:
            traceback.print_exc()
            notes.append(f"{name} failed: {type(exc).__name__}: {str(exc)[:500]}")

    # Start each server alone (its start-up time is measured on an otherwise quiet machine), keep them all
    # up, then drive them point by point.
    servers: dict[str, Server] = {}
    try:
        if "osprey" in systems or "osprey_grpc" in systems:
            def start_osprey():
                servers["osprey"] = Osprey(work / "osprey", served, config=p["osprey_config"]).start()
                started("osprey", servers["osprey"], result, notes)
                servers["osprey"].pause()  # the next server starts, and is measured idle, on a quiet machine
            guarded("osprey start", start_osprey)
        if ts_bin is not None:
            def start_ts():
                ts_models = [m for m in served if not m.extra.get("osprey_only")]
                server = TorchServe(work / "torchserve", ts_models, ts_bin,
                                    properties={"job_queue_size": p["job_queue_size"]}).start()
                servers["torchserve"] = server
                started("torchserve", server, result, notes)
                result["config"]["torchserve"] = {m.name: {k: server.describe(m.name).get(k) for k in
                                                           ("batchSize", "maxBatchDelay", "minWorkers", "maxWorkers")}
                                                  for m in server.models}
                server.pause()
            guarded("torchserve start", start_ts)
        if "fastapi" in systems:
            def start_fastapi():
                fm = [models[n] for n in p["fastapi_models"] if n in models]
                servers["fastapi"] = FastAPIApp(work / "fastapi", fm).start()
                started("fastapi", servers["fastapi"], result, notes)
                servers["fastapi"].pause()
            guarded("fastapi start", start_fastapi)
        for peer, python in peer_python.items():
            def start_peer(peer=peer, python=python):
                server = PEER_SERVERS[peer](work / peer, served, python).start()
                servers[peer] = server
                started(peer, server, result, notes)
                result["peers"][peer].update(server.describe_peer())
                server.pause()
            try:
                start_peer()
            except Exception as exc:
                traceback.print_exc()
                notes.append(f"{peer} start failed: {type(exc).__name__}: {str(exc)[:500]}")
                result["peers"][peer]["error"] = f"did not start: {str(exc)[:300]}"
        if "uvicorn_constant" in systems:
            def start_constant():
                servers["uvicorn_constant"] = ConstantApp(work / "constant", [models["mlp"]]).start()
                servers["uvicorn_constant"].pause()
            guarded("uvicorn_constant start", start_constant)
        if "osprey" in systems:  # Osprey variants run interleaved with everything else
            p["variant_tags"] = []
            for tag, cfg in variants(args, notes):
                def start_variant(tag=tag, cfg=cfg):
                    vm = [models[n] for n in p["variant_models"] if n in models]
                    servers[tag] = Osprey(work / tag, vm, config={**p["osprey_config"], **cfg}, tag=tag).start()
                    servers[tag].config = cfg
                    servers[tag].pause()
                    p["variant_tags"].append(tag)
                guarded(f"variant {tag} start", start_variant)
        rest = {k: v for k, v in servers.items() if k not in ("osprey", "mlserver") or k in systems}
        guarded("closed/open loop", lambda: drive_all(rest, models, p, result, notes))
        if args.overload > 0 and "osprey" in servers:
            from .overload import overload

            over = [m for m in servers["osprey"].models if m.name in ("mlp", "digits_cnn")]
            only(servers.values(), servers["osprey"])
            guarded("overload", lambda: result["overload"].extend(
                overload({"osprey": servers["osprey"]}, over, seconds=args.overload, binary=p["openloop_bin"])))
        targets = [(f"{name}_grpc", servers[name]) for name in ("osprey", "mlserver")
                   if f"{name}_grpc" in systems and name in servers]
        if targets:
            grpc_models = [m for m in targets[0][1].models if m.kind == "mlp" and m.batching]
            guarded("grpc", lambda: result["closed"].extend(grpc_rows(targets, grpc_models, p, notes,
                                                                      list(servers.values()))))
        if "osprey_grpc" in systems and "osprey" in servers:
            grpc_models = [m for m in servers["osprey"].models if m.kind == "mlp" and m.batching]
            if grpc_bin and grpc_models:
                only(servers.values(), servers["osprey"])
                guarded("grpc c=1 (C++ client)", lambda: result["grpc_c1"].extend(
                    grpc_cpp_rows(grpc_bin, servers["osprey"], grpc_models[0], p, notes)))
    finally:
        for server in servers.values():
            server.stop()

    if p["startup_repeats"] and "osprey" in systems:
        guarded("startup", lambda: startup_repeats(work, models["mlp"], ts_bin, p["startup_repeats"], result,
                                                        peer_python))

    if p["profile_s"] and not args.no_profile and "osprey" in systems:
        guarded("profile", lambda: profile_osprey(work, models["mlp"], p["profile_s"], out, result))

    result["meta"]["duration_s"] = round(time.monotonic() - t_start, 1)
    result["meta"]["loadavg_end"] = loadavg()
    (out / "latest.json").write_text(json.dumps(result, indent=1, default=str))
    log(f"wrote {out / 'latest.json'} ({result['meta']['duration_s']:.0f} s)")
    from .report import generate

    generate(out / "latest.json", Path(args.report), out)
    log(f"wrote {args.report}")
    for n in notes:
        log("note: " + n)
    return 0


if __name__ == "__main__":
    sys.exit(main())
