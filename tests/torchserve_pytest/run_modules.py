"""Run TorchServe's pytest modules (test/pytest) against a server and record each test's outcome.

    python tests/torchserve_pytest/run_modules.py --server torchserve [--ts-bin DIR] [MODULE ...]
    python tests/torchserve_pytest/run_modules.py --server osprey [MODULE ...]

--server torchserve puts the bin folder of a TorchServe 0.12 install (--ts-bin, default
/work/main/benchmarks/.work/tsvenv/bin) first on PATH; --server osprey puts a folder with
`torchserve` (-> `osprey torchserve`) and `torch-model-archiver` (-> `osprey package`) scripts
first. Each module runs in its own pytest process (Python: this one, which needs pytest, requests,
orjson, grpcio(-tools), torchserve's `ts` package and torch-model-archiver), from test/pytest as
TorchServe's CI runs them, of a copy of this folder made for the run (they write key_file.json,
logs/ and their stand-ins next to themselves), with a private TMPDIR (their model store is
$TMPDIR/workspace).
Writes results/<server>.json: {"module::test": "passed" | "failed" | "skipped" | "error"} plus
seconds per module; --write-baseline also writes baseline_torchserve.json (committed).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

HERE = Path(__file__).resolve().parent
OSPREY_ROOT = HERE.parent.parent
MODULES = [
    "test_url_path.py", "test_model_config.py", "test_send_intermediate_prediction_response.py",
    "test_startup_timeout.py", "test_auto_recover.py", "test_model_control_mode.py",
    "test_token_authorization.py", "test_gRPC_model_control.py", "test_gRPC_token_authorization.py",
    "test_gRPC_management_apis.py", "test_gRPC_inference_api.py", "test_gRPC_allowed_urls.py",
    "test_metrics.py", "test_metrics_kf.py",
]
DEFAULT_TS_BIN = "/work/main/benchmarks/.work/tsvenv/bin"


def osprey_bin(folder: Path, python: str = sys.executable) -> Path:
    """A folder with `torchserve` and `torch-model-archiver` scripts that run this Osprey."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, command in (("torchserve", "torchserve"), ("torch-model-archiver", "package")):
        script = folder / name
        script.write_text(f'#!/bin/sh\nPYTHONPATH="{OSPREY_ROOT}${{PYTHONPATH:+:$PYTHONPATH}}" '
                          f'exec "{python}" -m server.cli {command} "$@"\n')
        script.chmod(0o755)
    return folder


def outcomes(junit: Path, module: str) -> dict[str, str]:
    out: dict[str, str] = {}
    if not junit.exists():
        return {f"{module}::<collection>": "error"}
    for case in ET.parse(junit).getroot().iter("testcase"):
        name = f"{module}::{case.get('name')}"
        kinds = {child.tag for child in case}
        out[name] = ("failed" if "failure" in kinds else "error" if "error" in kinds
                     else "skipped" if "skipped" in kinds else "passed")
    return out


def private_network() -> list[str]:
    """A command prefix that runs in a network namespace of its own with only loopback up, when this
    machine allows one (`unshare -rn`): the modules' fixed ports (8080-8082, 7070-7071) are then
    free whatever else runs here. Empty when it does not: they use the machine's ports."""
    prefix = ["unshare", "-rn", "sh", "-c", 'ip link set lo up && exec "$@"', "netns"]
    try:
        ok = subprocess.run([*prefix, "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        ok = False
    return prefix if ok else []


def wheelhouse(dest: Path) -> Path:
    """The packages the examples' requirements.txt files name (the stateful example's lru-dict),
    downloaded from PyPI into ``dest`` here, where PyPI is reachable: the modules run in a network
    namespace without it, where the server's pip (install_py_dep_per_model) installs them from
    this folder (PIP_NO_INDEX, PIP_FIND_LINKS), as from an offline mirror."""
    dest.mkdir(parents=True, exist_ok=True)
    files = sorted((HERE / "examples").rglob("requirements.txt"))
    for req in files:
        out = subprocess.run([sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "--no-input",
                              "-q", "-d", str(dest), "-r", str(req)], capture_output=True, text=True, timeout=300)
        if out.returncode != 0:
            raise RuntimeError(f"pip download -r {req.relative_to(HERE)} failed (PyPI is needed once, as for "
                               f"`make setup`):\n{out.stdout[-1500:]}{out.stderr[-1500:]}")
    return dest


def build_mars(path_first: Path, work: Path) -> Path:
    """The archives ts_scripts/marsgen.py builds (with the archiver first on ``path_first``), built
    once into ``work``/mars for every module to link (run_module's ``mars``), as TorchServe's CI
    builds them once in the one pytest process that runs every module (each module here runs in
    a process of its own, and building them took about 7 s of CPU each time)."""
    suite = suite_copy(work)
    store = work / "mars"
    store.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PATH": f"{path_first}{os.pathsep}{os.environ['PATH']}", "MARSGEN_STORE": str(store),
           "PYTHONPATH": f"{suite / 'standins'}{os.pathsep}{suite}"}
    code = ("from ts_scripts import marsgen as mg\n"
            "mg.generate_mars(model_store_dir=mg.MODEL_STORE_DIR)\n"
            "assert len(mg.mar_set) == len(mg.MODELS), sorted(mg.mar_set)\n"
            "open(mg.os.path.join(mg.MODEL_STORE_DIR, mg.COMPLETE), 'w').close()\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=suite, env=env, capture_output=True, text=True, timeout=300)
    if out.returncode != 0:
        raise RuntimeError(f"building the modules' archives failed:\n{out.stdout[-2000:]}{out.stderr[-2000:]}")
    return store


def suite_copy(work: Path) -> Path:
    """A copy of this folder under ``work`` to run from: the modules write next to themselves
    (key_file.json, logs/, the stand-ins), so two runs never share those files."""
    dest = work / "suite"
    if not dest.exists():
        shutil.copytree(HERE, dest, ignore=shutil.ignore_patterns(
            "results", "grpc_generated", "model_store_gen", "__pycache__", "logs", "key_file.json", "*.pt",
            "kitten.jpg", "index_to_name.json"))
    return dest


def run_module(module: str, path_first: Path, work: Path, timeout: float, netns: list[str] = (),
               deselect: list[str] = (), wheels: Path | None = None,
               mars: Path | None = None) -> tuple[dict[str, str], float, str]:
    """Run one module from a copy of this folder in ``work``; ``deselect``: test ids (module::name) not to run;
    ``wheels``: a :func:`wheelhouse` the server's pip installs from instead of PyPI."""
    suite = suite_copy(work)
    tests = suite / "test" / "pytest"
    junit = work / f"{module}.xml"
    tmp = work / "tmp"
    # the modules' model store: some start the server without making it (in TorchServe's CI a
    # module before them has), so a module run alone would stop at "--model-store directory not found"
    (tmp / "workspace" / "model_store").mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PATH": f"{path_first}{os.pathsep}{os.environ['PATH']}", "TMPDIR": str(tmp),
           # built by this run's archiver, or once for every module (build_mars)
           "MARSGEN_STORE": str(mars or work / "model_store_gen"),
           # no third-party pytest plugins (hypothesis and schemathesis take ~10 s to import; unused here)
           "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1",
           # the examples' handlers import standin_vision (no torchvision here): on the servers' path
           "PYTHONPATH": str(suite / "standins")}
    for key in [k for k in env if k.startswith(("TS_", "LOG_LOCATION", "METRICS_LOCATION"))]:
        del env[key]
    if wheels is not None:
        env.update(PIP_NO_INDEX="1", PIP_FIND_LINKS=str(wheels))
    cmd = [*netns, sys.executable, "-m", "pytest", "-c", str(suite / "pytest.ini"), "--rootdir", str(tests),
           f"--junitxml={junit}", "-q", module, *(f"--deselect={t}" for t in deselect)]
    t0 = time.monotonic()
    try:
        proc = subprocess.run(cmd, cwd=tests, env=env, capture_output=True, text=True, timeout=timeout)
        log = proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as exc:
        log = f"timed out after {timeout} s\n{exc.stdout or ''}"
    finally:
        subprocess.run(["torchserve", "--stop", "--foreground"], cwd=tests, env=env, capture_output=True)
    return outcomes(junit, module), time.monotonic() - t0, log


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--server", choices=["torchserve", "osprey"], required=True)
    p.add_argument("--ts-bin", default=DEFAULT_TS_BIN)
    p.add_argument("--out", default=str(HERE / "results"))
    p.add_argument("--timeout", type=float, default=900.0, help="seconds one module may take")
    p.add_argument("--write-baseline", action="store_true")
    p.add_argument("modules", nargs="*", default=MODULES)
    args = p.parse_args(argv)
    out = Path(args.out)
    work = Path(tempfile.mkdtemp(prefix=f"ts-pytest-{args.server}-"))
    path_first = Path(args.ts_bin) if args.server == "torchserve" else osprey_bin(work / "bin")
    netns = private_network()
    wheels = wheelhouse(work / "wheels") if netns and args.server == "osprey" else None
    results: dict[str, str] = {}
    seconds: dict[str, float] = {}
    for module in args.modules:
        got, took, log = run_module(module, path_first, work, args.timeout, netns, wheels=wheels)
        results.update(got)
        seconds[module] = round(took, 1)
        (work / f"{module}.log").write_text(log)
        print(f"{module}: {sum(v == 'passed' for v in got.values())}/{len(got)} passed in {took:.0f} s "
              f"(log {work / (module + '.log')})", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    record = {"server": args.server, "private_network": bool(netns), "tests": dict(sorted(results.items())), "seconds": seconds}
    (out / f"{args.server}.json").write_text(json.dumps(record, indent=1) + "\n")
    if args.write_baseline:  # merged into what is there: a module run again replaces its own tests
        path = HERE / "baseline_torchserve.json"
        old = json.loads(path.read_text()) if path.exists() else {"tests": {}, "seconds": {}}
        old_tests = {t: o for t, o in old["tests"].items() if t.split("::")[0] not in seconds}
        record = {**record, "tests": dict(sorted({**old_tests, **results}.items())),
                  "seconds": {**old["seconds"], **seconds}}
        path.write_text(json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
