"""TorchServe's own Postman API test suite (pytorch/serve v0.12.0 test/postman, run with newman
as its ts_scripts/api_utils.py runs it) against a real ``osprey serve``.

Every test that passed on real TorchServe 0.12 on this machine
(tests/torchserve_postman/torchserve_baseline.json, written by record_torchserve.py) must pass
on Osprey, except those in EXPECTED_FAILURES, each with its reason; an expected failure that
passes fails the run too, so the list is kept true. The archives the collections name are
the small stand-ins tests/torchserve_postman/build_models.py builds (see CHANGES.md there).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.conftest import ROOT, free_port
from tests.torchserve_postman import build_models, runs

pytestmark = pytest.mark.skipif(
    runs.newman_bin() is None,
    reason=f"newman (node) is not installed: `make test` installs it, or "
           f"npm install --prefix {runs.NEWMAN_DIR} newman@{runs.NEWMAN_VERSION}")

# Tests TorchServe 0.12 passes here that Osprey does not (yet), each by its full name (as
# runs.results names it) with its reason. None at present: keep it so, or name the reason.
EXPECTED_FAILURES: dict[str, str] = {}


def _expected_failure(name: str) -> str | None:
    return EXPECTED_FAILURES.get(name)


def test_expected_failures_name_tests_torchserve_passes():
    """The list is reviewed by name: each entry is a test of the baseline that TorchServe passes."""
    passed = {name for run in BASELINE["runs"].values() for name in run["passed"]}
    assert sorted(set(EXPECTED_FAILURES) - passed) == []


BASELINE = json.loads(runs.BASELINE.read_text())


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory) -> dict[str, dict]:
    """Every run of runs.RUNS against its own ``osprey serve``, a few at a time (most of a
    run is waiting: the server's start, its first model load); name -> its outcome."""
    root = tmp_path_factory.mktemp("postman")
    out = build_models.build(root / "built")
    with runs.file_server(out) as files_url, ThreadPoolExecutor(LANES) as pool:
        done = pool.map(lambda run: _run_on_osprey(run, root / run.name, out, files_url), RUNS)
        return {run.name: outcome for run, outcome in zip(RUNS, done)}


# runs at a time: a run is mostly waiting (its server's start, newman's requests one after another,
# the collections' own delays), so 4 overlap well even on 2 cores
LANES = int(os.environ.get("OSPREY_POSTMAN_LANES", "4"))


def _run_on_osprey(run: runs.Run, work: Path, built: Path, files_url: str) -> dict:
    work.mkdir()
    t0 = time.monotonic()
    try:
        store = runs.fresh_store(built, work / "store")
        proc, ports, log = _start_osprey(run, work, store)
        try:
            done = runs.newman(run, ports, files_url, work / "report.json", timeout=300)
        finally:
            _stop(proc)
        if not (work / "report.json").exists():
            return {"error": f"newman wrote no report:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"}
        return {"results": runs.results(run, work / "report.json"), "seconds": time.monotonic() - t0,
                "log": log.read_text(errors="replace")[-2000:]}
    except Exception as exc:  # reported by the run's own test
        return {"error": f"{type(exc).__name__}: {exc}"}


# Osprey's config differs from TorchServe's in one line: TorchServe's register API starts
# default_workers_per_model workers, 0 when it is not set; Osprey's default is 1 (by design,
# server/settings.py) and 0 is how its config says "as TorchServe, unset".
OSPREY_CONFIG = {"default_workers_per_model": "0"}


def _start_osprey(run: runs.Run, work: Path, store: Path) -> tuple[subprocess.Popen, dict[str, int], Path]:
    ports = {k: free_port() for k in ("inference", "management", "metrics", "grpc", "grpc_mgmt")}
    cfg = runs.write_properties(work / "config.properties", {**runs.server_config(run, ports, store), **OSPREY_CONFIG})
    log = work / "osprey.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "server.cli", "serve", "--foreground", "--ts-config", str(cfg),
                                 "--pid-file", str(work / "osprey.pid")],
                                cwd=work, stdout=fh, stderr=subprocess.STDOUT, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    deadline = time.monotonic() + 120
    while "Osprey ready" not in log.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            _stop(proc)
            raise RuntimeError(f"osprey did not start for {run.name}:\n{log.read_text(errors='replace')[-3000:]}")
        time.sleep(0.05)
    return proc, ports, log


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


# The suite (CI) runs every collection; management_kf, the management collection again against a
# server with service_envelope=kserve (which changes no management answer), runs with
# OSPREY_TORCHSERVE_ALL=1 (`make test-torchserve`): the suite is near its time budget.
RUNS = [r for r in runs.RUNS if os.environ.get("OSPREY_TORCHSERVE_ALL") == "1" or r.name != "management_kf"]


@pytest.mark.parametrize("run", RUNS, ids=[r.name for r in RUNS])
def test_collection_passes_what_torchserve_passes(run, outcomes):
    outcome = outcomes[run.name]
    assert "error" not in outcome, outcome.get("error")
    got = outcome["results"]
    baseline = BASELINE["runs"][run.name]
    missing = [name for name in baseline["passed"] if name not in got]
    failed = {name: got[name] for name in baseline["passed"] if name in got and got[name] is not None
              and not _expected_failure(name)}
    now_pass = [name for name in baseline["passed"] if _expected_failure(name) and got.get(name, "") is None]
    problems = []
    if missing:
        problems.append("tests TorchServe ran that did not run here:\n  " + "\n  ".join(missing))
    if failed:
        problems.append("pass on TorchServe 0.12, fail on Osprey:\n  " +
                        "\n  ".join(f"{k}: {v}" for k, v in failed.items()))
    if now_pass:
        problems.append("listed in EXPECTED_FAILURES but pass now (remove them from the list):\n  " + "\n  ".join(now_pass))
    assert not problems, "\n".join(problems) + f"\n--- osprey log tail ---\n{outcome['log']}"
