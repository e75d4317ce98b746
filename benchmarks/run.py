"""One command for the whole benchmark: Osprey vs TorchServe 0.12 vs FastAPI vs the raw ceiling.

    .venv/bin/python -m benchmarks.run            # full run (about 25 minutes on 2 cores)
    .venv/bin/python -m benchmarks.run --quick    # tiny MLP only, under 2 minutes

Steps: build the models (same archive files for every server); measure the raw ceiling
(forward passes in a loop at batch 1..64, no server); install TorchServe 0.12 into
``benchmarks/.work/tsvenv`` unless present; then for each system start the real server,
record start-up time and resident memory, drive each model with ``hey`` (closed loop at
each concurrency, warm-up first), an exact closed-loop run at concurrency 1 with the
benchmark's own driver, and an open-loop Poisson run at 70% of that system's measured
capacity; stop it. Osprey is also driven over gRPC (``benchmarks/grpc_driver.py``) and,
where a setting exists, with metrics off. Writes ``benchmarks/results/latest.json``, the
plots, and ``benchmarks/RESULTS.md`` (``benchmarks/report.py``).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path

from . import load
from .models import BenchModel, build_models
from .systems import ConstantApp, FastAPIApp, Osprey, Server, TorchServe, tree_rss_mb

__all__ = ["main"]

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

# Settings names a metrics switch may have in server/settings.py, and the value that turns metrics off.
METRICS_OFF_CANDIDATES = {"enable_metrics": "false", "metrics_enabled": "false", "disable_metrics": "true",
                          "metrics_mode": "off", "metrics": "off"}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --- plan -----------------------------------------------------------------------------
def plan(args) -> dict:
    if args.quick:
        return {"concurrency": [1, 32], "warmup": 1.0, "duration": 3.0, "cnn_duration": 3.0,
                "exact_c1": 2.0, "open": 4.0, "open_models": ["mlp"], "ceiling_s": 0.2,
                "with_cnn": False, "with_digits": False, "fastapi_models": ["mlp"], "startup_repeats": 0,
                "constant_conc": [32], "profile_s": 0}
    return {"concurrency": [1, 8, 32, 128], "warmup": 3.0, "duration": 10.0, "cnn_duration": 15.0,
            "exact_c1": 6.0, "open": 20.0, "open_models": ["mlp", "mlp_nb", "cnn", "digits_cnn"], "ceiling_s": 1.0,
            "with_cnn": True, "with_digits": True, "fastapi_models": ["mlp", "cnn"], "startup_repeats": 3,
            "constant_conc": [1, 8, 32, 128], "profile_s": 15}


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


def closed_rows(system: str, server: Server, models: list[BenchModel], p: dict, protocol: str = "rest") -> list[dict]:
    rows = []
    for m in models:
        duration = p["cnn_duration"] if m.kind == "cnn" else p["duration"]
        conc = p["constant_conc"] if system == "uvicorn_constant" else p["concurrency"]
        for c in conc:
            r = load.hey(server.predict_url(m.name), str(m.body), m.content_type, c, duration, p["warmup"])
            r.update(system=system, model=m.name, protocol=protocol, concurrency=c, tool="hey")
            log(f"  {system:18s} {m.name:10s} c={c:<4d} {r['rps']:9.1f} req/s  p50 {r.get('p50_ms', 0):7.2f} ms"
                f"  p99 {r.get('p99_ms', 0):7.2f} ms  errors {r['errors']}")
            rows.append(r)
    return rows


def exact_c1(system: str, server: Server, m: BenchModel, p: dict) -> dict:
    r = run_json([sys.executable, "-m", "benchmarks.openloop", "--url", server.predict_url(m.name),
                  "--body", str(m.body), "--content-type", m.content_type, "--closed", "1",
                  "--duration", str(p["exact_c1"]), "--warmup", "1"], timeout=p["exact_c1"] + 120)
    r.update(system=system, model=m.name, protocol="rest", concurrency=1, tool="openloop --closed 1")
    log(f"  {system:18s} {m.name:10s} exact c=1: p50 {r.get('p50_ms', 0):.3f} ms p99 {r.get('p99_ms', 0):.3f} ms")
    return r


def open_row(system: str, server: Server, m: BenchModel, capacity: float, p: dict) -> dict:
    rate = max(1.0, 0.7 * capacity)
    duration = p["open"]
    if m.kind in ("cnn",):
        duration = max(duration, min(60.0, 2000 / rate))  # enough samples for a p99
    r = run_json([sys.executable, "-m", "benchmarks.openloop", "--url", server.predict_url(m.name),
                  "--body", str(m.body), "--content-type", m.content_type, "--rate", f"{rate:.1f}",
                  "--duration", f"{duration:g}", "--warmup", "2"], timeout=duration + 180)
    r.update(system=system, model=m.name, protocol="rest", capacity_rps=capacity, load_fraction=0.7)
    log(f"  {system:18s} {m.name:10s} open {rate:8.1f}/s: p50 {r.get('p50_ms', 0):.2f} ms p99 {r.get('p99_ms', 0):.2f} ms"
        f" (driver lateness p99 {r['lateness'].get('p99_ms', 0):.2f} ms)")
    return r


def grpc_rows(server: Osprey, models: list[BenchModel], p: dict, notes: list[str]) -> list[dict]:
    """Osprey over gRPC with benchmarks/grpc_driver.py (written separately); a marked gap without it."""
    driver = HERE / "grpc_driver.py"
    if not driver.exists():
        notes.append("gRPC rows missing: benchmarks/grpc_driver.py does not exist yet")
        return []
    rows = []
    for m in models:
        for c in p["concurrency"]:
            cmd = [sys.executable, "-m", "benchmarks.grpc_driver", "--target", server.grpc, "--model", m.name,
                   "--input-file", str(m.body), "--concurrency", str(c), "--duration", str(p["duration"]),
                   "--warmup", str(p["warmup"]), "--json"]
            try:
                r = run_json(cmd, timeout=p["duration"] + p["warmup"] + 180)
            except Exception as exc:  # the driver's CLI may differ: leave a marked gap, keep going
                notes.append(f"gRPC rows missing: {' '.join(cmd[2:4])} failed: {str(exc)[:300]}")
                return rows
            r.update(system="osprey_grpc", model=m.name, protocol="grpc", concurrency=c, tool="grpc_driver")
            log(f"  {'osprey_grpc':18s} {m.name:10s} c={c:<4d} {r.get('rps', 0):9.1f} req/s  p50 {r.get('p50_ms', 0):7.2f} ms")
            rows.append(r)
    return rows


def metrics_off_config() -> dict | None:
    from server.settings import Settings

    names = {f for f in Settings.__dataclass_fields__}
    for key, value in METRICS_OFF_CANDIDATES.items():
        if key in names:
            return {key: value}
    return None


def drive_system(system: str, server: Server, models: list[BenchModel], p: dict, result: dict, notes: list[str],
                 *, open_loop: bool = True, exact: bool = True) -> None:
    log(f"{system}: started, first answer {server.startup.get('first_answer_s', 0):.2f} s, "
        f"all {len(models)} models {server.startup.get('all_models_s', 0):.2f} s, RSS {server.rss_mb():.0f} MiB")
    result["startup"].append({"system": system, "models": [m.name for m in models], **server.startup})
    result["memory"].append({"system": system, "when": "idle, models loaded", "models": [m.name for m in models],
                             "rss_mib": server.rss_mb()})
    rows = closed_rows(system, server, models, p)
    result["closed"] += rows
    for m in models:
        if exact:
            try:
                result["exact_c1"].append(exact_c1(system, server, m, p))
            except Exception as exc:
                notes.append(f"{system} {m.name}: exact c=1 run failed: {exc}")
        if open_loop and m.name in p["open_models"]:
            cap = max((r["rps"] for r in rows if r["model"] == m.name), default=0.0)
            if cap > 0:
                try:
                    result["open"].append(open_row(system, server, m, cap, p))
                except Exception as exc:
                    notes.append(f"{system} {m.name}: open-loop run failed: {exc}")
    result["memory"].append({"system": system, "when": "after load", "models": [m.name for m in models],
                             "rss_mib": server.rss_mb()})


def startup_repeats(work: Path, model: BenchModel, ts_bin: Path | None, repeats: int, result: dict) -> None:
    """Start each server with only the tiny MLP, several times: process start to first answer."""
    for i in range(repeats):
        kinds = [("osprey", lambda w: Osprey(w, [model]))]
        if ts_bin is not None:
            kinds.append(("torchserve", lambda w: TorchServe(w, [model], ts_bin)))
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


def profile_osprey(work: Path, model: BenchModel, seconds: float, out_dir: Path, result: dict) -> None:
    """py-spy on Osprey while hey drives the tiny MLP at concurrency 32 (flamegraph + collapsed stacks)."""
    pyspy = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
    if not pyspy:
        result["notes"].append("profile skipped: py-spy not installed (pip install py-spy)")
        return
    server = Osprey(work / "profile", [model]).start()
    try:
        hey_cmd = load.hey_command(server.predict_url(model.name), str(model.body), model.content_type, 32,
                                   2 * seconds + 8)
        hey_proc = subprocess.Popen(hey_cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        time.sleep(3)
        svg = out_dir / "profile-osprey-mlp-c32.svg"
        raw = out_dir / "profile-osprey-mlp-c32.collapsed.txt"
        for fmt, path in (("flamegraph", svg), ("raw", raw)):
            subprocess.run([pyspy, "record", "--pid", str(server.proc.pid), "--duration", str(int(seconds)),
                            "--rate", "250", "--threads", "--nonblocking", "--format", fmt, "--output", str(path)],
                           capture_output=True, timeout=seconds + 60)
        dump = subprocess.run([pyspy, "dump", "--pid", str(server.proc.pid)], capture_output=True, text=True, timeout=30)
        hey_out, _ = hey_proc.communicate(timeout=2 * seconds + 90)
        result["profile"] = {"flamegraph": str(svg.relative_to(ROOT)) if svg.exists() else None,
                             "collapsed": str(raw.relative_to(ROOT)) if raw.exists() else None,
                             "summary": summarize_collapsed(raw) if raw.exists() else None,
                             "hey_during_profile": load.parse_hey(hey_out), "dump": dump.stdout[-4000:]}
        log(f"profile: {svg}")
    finally:
        server.stop()


# --- main -----------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Osprey vs TorchServe vs FastAPI vs the raw ceiling")
    ap.add_argument("--quick", action="store_true", help="tiny MLP only, short runs (under 2 minutes)")
    ap.add_argument("--work", default=str(HERE / ".work"), help="scratch folder (venvs, archives, logs)")
    ap.add_argument("--out", default=str(HERE / "results"), help="where latest.json and the plots go")
    ap.add_argument("--report", default=str(HERE / "RESULTS.md"), help="the Markdown report to write")
    ap.add_argument("--systems", default="osprey,osprey_grpc,torchserve,fastapi,uvicorn_constant,ceiling",
                    help="comma-separated subset")
    ap.add_argument("--cnn-side", type=int, default=224, help="CNN input is 3xSxS float32")
    ap.add_argument("--no-profile", action="store_true")
    ap.add_argument("--no-digits", action="store_true")
    ap.add_argument("--no-cnn", action="store_true")
    args = ap.parse_args(argv)
    t_start = time.monotonic()
    p = plan(args)
    if args.no_cnn:
        p["with_cnn"] = False
    if args.no_digits:
        p["with_digits"] = False
    systems = set(args.systems.split(","))
    work, out = Path(args.work), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    notes: list[str] = []
    result: dict = {"meta": {"date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                             "command": "python -m benchmarks.run " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])),
                             "mode": "quick" if args.quick else "full", "plan": p, "machine": machine()},
                    "models": {}, "ceiling": {}, "closed": [], "exact_c1": [], "open": [], "startup": [],
                    "startup_single": [], "memory": [], "metrics_toggle": [], "profile": None, "notes": notes,
                    "config": {}}
    log(f"building models in {work} ({result['meta']['mode']} run)")
    models = build_models(work, cnn_side=args.cnn_side, with_cnn=p["with_cnn"], with_digits=p["with_digits"], log=notes)
    result["models"] = {n: m.as_json() for n, m in models.items()}
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

    def guarded(name: str, fn) -> None:
        try:
            fn()
        except Exception as exc:
            traceback.print_exc()
            notes.append(f"{name} failed: {type(exc).__name__}: {str(exc)[:500]}")

    # Osprey (REST, then gRPC against the same process)
    if "osprey" in systems or "osprey_grpc" in systems:
        def osprey_run():
            server = Osprey(work / "osprey", served).start()
            try:
                if "osprey" in systems:
                    drive_system("osprey", server, served, p, result, notes)
                if "osprey_grpc" in systems:
                    result["closed"] += grpc_rows(server, [m for m in served if m.kind == "mlp" and m.batching], p, notes)
            finally:
                server.stop()
        guarded("osprey", osprey_run)

    if ts_bin is not None:
        def ts_run():
            server = TorchServe(work / "torchserve", served, ts_bin).start()
            try:
                result["config"]["torchserve"] = {m.name: {k: server.describe(m.name).get(k) for k in
                                                           ("batchSize", "maxBatchDelay", "minWorkers", "maxWorkers")}
                                                  for m in served}
                drive_system("torchserve", server, served, p, result, notes)
            finally:
                server.stop()
        guarded("torchserve", ts_run)

    if "fastapi" in systems:
        def fastapi_run():
            fm = [models[n] for n in p["fastapi_models"] if n in models]
            server = FastAPIApp(work / "fastapi", fm).start()
            try:
                drive_system("fastapi", server, fm, p, result, notes)
            finally:
                server.stop()
        guarded("fastapi", fastapi_run)

    if "uvicorn_constant" in systems:
        def constant_run():
            server = ConstantApp(work / "constant", [models["mlp"]]).start()
            try:
                rows = closed_rows("uvicorn_constant", server, [models["mlp"]], p)
                result["closed"] += rows
            finally:
                server.stop()
        guarded("uvicorn_constant", constant_run)

    # Osprey with metrics off, where such a setting exists
    if "osprey" in systems:
        cfg = metrics_off_config()
        if cfg is None:
            notes.append("metrics on/off: no metrics switch in server/settings.py yet (candidates: "
                         + ", ".join(METRICS_OFF_CANDIDATES) + ")")
        else:
            def metrics_run():
                mp = dict(p, concurrency=[1, 32])
                server = Osprey(work / "osprey-nometrics", [models["mlp"]], config=cfg, tag="osprey_nometrics").start()
                try:
                    rows = closed_rows("osprey_nometrics", server, [models["mlp"]], mp)
                    for r in rows:
                        r["config"] = cfg
                    result["metrics_toggle"] += rows
                finally:
                    server.stop()
            guarded("metrics off", metrics_run)

    if p["startup_repeats"] and "osprey" in systems:
        guarded("startup", lambda: startup_repeats(work, models["mlp"], ts_bin, p["startup_repeats"], result))

    if p["profile_s"] and not args.no_profile and "osprey" in systems:
        guarded("profile", lambda: profile_osprey(work, models["mlp"], p["profile_s"], out, result))

    result["meta"]["duration_s"] = round(time.monotonic() - t_start, 1)
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
