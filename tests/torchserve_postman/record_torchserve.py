"""Runs every collection of runs.RUNS against real TorchServe 0.12 (configured as
pytorch/serve's ts_scripts/api_utils.py does, on free loopback ports) and writes the per-test
pass/fail list to torchserve_baseline.json, which tests/e2e/test_torchserve_postman.py holds
Osprey to: every test TorchServe passes here must pass on Osprey.

Run once, by hand (needs Java 17, TorchServe 0.12 and newman):
  python tests/torchserve_postman/record_torchserve.py /path/to/venv/bin/torchserve
Each TorchServe runs in the foreground in its own session and TMPDIR (its pid file lives
there, so it never meets another TorchServe on the machine) and is stopped by its own
process group at the end of its run.
"""

from __future__ import annotations

import json
import os
import signal
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.conftest import free_port  # noqa: E402
from tests.torchserve_postman import build_models, runs  # noqa: E402


def wait_ready(url: str, proc: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    ctx = ssl._create_unverified_context()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"torchserve exited:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/models", timeout=3, context=ctx) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(log.read_text()[-3000:])


def record(torchserve: str, work: Path, only: set[str] | None = None) -> dict:
    built = build_models.build(work / "built")
    out: dict = {"torchserve": "0.12.0", "runs": {}}
    with runs.file_server(built) as files_url:
        for run in runs.RUNS:
            if only and run.name not in only:
                continue
            rdir = work / run.name
            (rdir / "tmp").mkdir(parents=True)
            store = runs.fresh_store(built, rdir / "store")
            ports = {k: free_port() for k in ("inference", "management", "metrics", "grpc", "grpc_mgmt")}
            cfg = runs.write_properties(rdir / "config.properties", runs.server_config(run, ports, store))
            args = [torchserve, "--start", "--foreground", "--ncs", "--model-store", str(store), "--ts-config", str(cfg)]
            if run.workflow_store:
                args += ["--workflow-store", str(store)]
            log = rdir / "ts.log"
            with open(log, "wb") as fh:
                proc = subprocess.Popen(args, cwd=rdir, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True,
                                        env={**os.environ, "TMPDIR": str(rdir / "tmp")})
            try:
                scheme = "https" if run.https else "http"
                wait_ready(f"{scheme}://127.0.0.1:{ports['management']}", proc, log)
                t0 = time.monotonic()
                done = runs.newman(run, ports, files_url, rdir / "report.json", timeout=900)
                took = time.monotonic() - t0
            finally:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(60)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(10)
            res = runs.results(run, rdir / "report.json")
            passed = sum(v is None for v in res.values())
            print(f"{run.name}: {passed}/{len(res)} passed in {took:.1f} s (newman rc {done.returncode})", flush=True)
            out["runs"][run.name] = {
                "passed": sorted(k for k, v in res.items() if v is None),
                "failed": {k: v for k, v in sorted(res.items()) if v is not None},
            }
    return out


def main() -> None:
    if len(sys.argv) not in (2, 3):
        sys.exit("usage: record_torchserve.py PATH/TO/torchserve [RUN,RUN...: re-record only these runs]")
    if runs.newman_bin() is None:
        sys.exit(f"newman is not installed: npm install --prefix {runs.NEWMAN_DIR} newman@{runs.NEWMAN_VERSION}")
    only = set(sys.argv[2].split(",")) if len(sys.argv) == 3 else None
    with tempfile.TemporaryDirectory(prefix="ts-postman-") as work:
        result = record(sys.argv[1], Path(work), only)
    if only:
        kept = json.loads(runs.BASELINE.read_text())
        kept["runs"].update(result["runs"])
        result = {**kept, "runs": {r.name: kept["runs"][r.name] for r in runs.RUNS if r.name in kept["runs"]}}
    runs.BASELINE.write_text(json.dumps(result, indent=1) + "\n")
    total = sum(len(r["passed"]) + len(r["failed"]) for r in result["runs"].values())
    print(f"wrote {runs.BASELINE}: {sum(len(r['passed']) for r in result['runs'].values())}/{total} passed")


if __name__ == "__main__":
    main()
