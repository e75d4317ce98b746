"""How each of TorchServe's Postman collections is run: the server config (as
ts_scripts/api_utils.py in pytorch/serve v0.12.0 writes it), the collection, its data file and
newman's flags; and reading newman's JSON report into one pass/fail per test.

Shared by record_torchserve.py (the TorchServe 0.12 baseline) and
tests/e2e/test_torchserve_postman.py (the same runs against ``osprey serve``). The servers
listen on free loopback ports; newman gets them as environment overrides, and the archives
the data files download ({{mar_files_url}}) come from a loopback HTTP server.
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import json
import os
import shutil
import subprocess
import threading
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
POSTMAN = HERE / "postman"
ROOT = HERE.parent.parent
BASELINE = HERE / "torchserve_baseline.json"

# newman from npm, pinned; `make test` installs it here (see the Makefile)
NEWMAN_VERSION = "6.2.2"
NEWMAN_DIR = Path(os.environ.get("OSPREY_NEWMAN_DIR", ROOT / ".newman"))


@dataclass(frozen=True)
class Run:
    name: str
    collection: str
    data: str | None
    config: dict = field(default_factory=dict)
    https: bool = False
    workflow_store: bool = False


_BASE = {"disable_token_authorization": "true", "enable_model_api": "true"}
_PROM = {"metrics_mode": "prometheus", **_BASE}
# test/resources/config*.properties: https addresses (ports filled in) and the TLS pair
_HTTPS = {"install_py_dep_per_model": "true", **_BASE}

RUNS = [
    Run("management", "management_api_test_collection.json", "management_data.json", _BASE),
    Run("inference", "inference_api_test_collection.json", "inference_data.json", _PROM),
    Run("increased_timeout_inference", "inference_api_test_collection.json", "increased_timeout_inference.json",
        {"default_response_timeout": "300", **_PROM}),
    Run("https", "https_test_collection.json", None, _HTTPS, https=True),
    Run("management_kf", "management_api_test_collection.json", "management_data.json",
        {**_BASE, "service_envelope": "kserve"}),
    Run("inference_kf", "kf_api_test_collection.json", "kf_inference_data.json", {"service_envelope": "kserve", **_PROM}),
    Run("https_kf", "kf_https_test_collection.json", None, {"service_envelope": "kserve", **_BASE}, https=True),
    Run("inference_kfv2", "kfv2_api_test_collection.json", "kfv2_inference_data.json",
        {"service_envelope": "kservev2", **_PROM}),
    Run("https_kfv2", "kfv2_https_test_collection.json", None, {"service_envelope": "kservev2", **_BASE}, https=True),
    Run("explanation", "explanation_api_test_collection.json", "explanation_data.json", _PROM),
    Run("workflow", "workflow_api_test_collection.json", "workflow_data.json",
        {"disable_token_authorization": "true"}, workflow_store=True),
]
# Not run: workflow_inference_collection.json (api_utils.py skips it: "this test is flaky";
# its .war files need densenet161 from the internet), large_model_inference_data.json (GPU
# and multi-GB models), inference_stream*_data.json and kf_inference_api_test_collection.json
# (read by gRPC/KServe tests of pytorch/serve, not by any newman run).


def server_config(run: Run, ports: dict[str, int], store: Path) -> dict[str, str]:
    scheme = "https" if run.https else "http"
    cfg = {
        "inference_address": f"{scheme}://127.0.0.1:{ports['inference']}",
        "management_address": f"{scheme}://127.0.0.1:{ports['management']}",
        "metrics_address": f"{scheme}://127.0.0.1:{ports['metrics']}",
        "grpc_inference_port": str(ports["grpc"]),
        "grpc_management_port": str(ports["grpc_mgmt"]),
        "model_store": str(store),
        **run.config,
    }
    if run.https:
        cfg["private_key_file"] = str(HERE / "resources" / "key.pem")
        cfg["certificate_file"] = str(HERE / "resources" / "certs.pem")
    if run.workflow_store:
        cfg["workflow_store"] = str(store)
    return cfg


def write_properties(path: Path, cfg: dict[str, str]) -> Path:
    path.write_text("".join(f"{k}={v}\n" for k, v in cfg.items()))
    return path


def fresh_store(built: Path, into: Path) -> Path:
    """A model store of its own for one run (a run's downloads land in it)."""
    shutil.copytree(built / "store", into)
    return into


def newman_bin() -> Path | None:
    path = NEWMAN_DIR / "node_modules" / ".bin" / "newman"
    return path if path.exists() and shutil.which("node") else None


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@contextlib.contextmanager
def file_server(root: Path):
    """Serves root over HTTP on a free loopback port (the data files' download URLs)."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def newman(run: Run, ports: dict[str, int], files_url: str, report: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    overrides = {
        "hostname": "127.0.0.1",  # node resolves localhost to ::1 first; the servers listen on 127.0.0.1
        "pred-port": ports["inference"], "mgmt-port": ports["management"], "metric-port": ports["metrics"],
        "sec-pred-port": ports["inference"], "sec-mgmt-port": ports["management"], "sec-metric-port": ports["metrics"],
        "mar_files_url": f"{files_url}/mar_files", "war_files_url": f"{files_url}/war_files",
    }
    args = [str(newman_bin()), "run", "-e", "environment.json", run.collection]
    if run.data:
        args += ["-d", run.data]
    for key, value in overrides.items():
        args += ["--env-var", f"{key}={value}"]
    if run.https:
        args.append("--insecure")
    args += ["--timeout-request", "120000", "-r", "json", "--reporter-json-export", str(report)]
    return subprocess.run(args, cwd=POSTMAN, capture_output=True, text=True, timeout=timeout)


def results(run: Run, report: Path) -> dict[str, str | None]:
    """One entry per assertion of each request of each iteration: its name -> None when it
    passed, else newman's message and the response code."""
    rows = json.loads((POSTMAN / run.data).read_text()) if run.data else []
    out: dict[str, str | None] = {}
    for ex in json.loads(report.read_text())["run"]["executions"]:
        i = ex["cursor"]["iteration"]
        row = rows[i] if i < len(rows) else {}
        label = row.get("test") or row.get("model_name") or row.get("workflow_name") or "-"
        prefix = f"{run.name} #{i:02d} {label} | {ex['item']['name']}"
        code = (ex.get("response") or {}).get("code")
        for a in ex.get("assertions") or []:
            name = f"{prefix} | {a['assertion']}"
            if "error" in a or a.get("skipped"):
                out[name] = f"{(a.get('error') or {}).get('message', 'skipped')} (response {code})"
            else:
                out[name] = None
    return out
