"""Archives made by torch-model-archiver, with TorchServe-style handlers, served by
``osprey serve --ts-config config.properties``, give the same answers as TorchServe 0.12.

The TorchServe side runs only where Java and the ``torchserve`` package are installed
(CI installs both); the Osprey side always runs.
"""

from __future__ import annotations

import importlib.util
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
import pytest
import torch

from tests.conftest import ROOT, free_port

ts = pytest.importorskip("ts", reason="the torchserve package (optional extra) is not installed")

BIN = Path(sys.executable).parent

CLASS_HANDLER = '''
import json
import torch
from ts.torch_handler.base_handler import BaseHandler


class MLPHandler(BaseHandler):
    def preprocess(self, data):
        rows = []
        for row in data:
            body = row.get("data") or row.get("body")
            if isinstance(body, (bytes, bytearray)):
                body = json.loads(body)
            rows.append(torch.tensor(body, dtype=torch.float32).reshape(16))
        return torch.stack(rows).to(self.device)

    def postprocess(self, data):
        return data.tolist()

    def describe_handle(self):  # GET /models/NAME?customized=true shows it as customizedMetadata
        return {"labels": ["a", "b", "c", "d"], "inputs": 16, "nested": {"scale": 1.5}}
'''

FUNCTION_HANDLER = '''
import json
import os
import torch

_model = None


def handle(data, context):
    global _model
    if data is None:
        return None
    if _model is None:
        props = context.system_properties
        _model = torch.jit.load(os.path.join(props["model_dir"], context.manifest["model"]["serializedFile"]))
    out = []
    for row in data:
        body = row.get("data") or row.get("body")
        if isinstance(body, (bytes, bytearray)):
            body = json.loads(body)
        with torch.no_grad():
            y = _model(torch.tensor(body, dtype=torch.float32).reshape(-1, 16))
        out.append(y.reshape(-1).tolist())
    return out
'''

# the same model, answering each request with the output tensor itself: TorchServe's worker
# sends a torch.Tensor as the bytes of torch.save, which clients read with torch.load
TENSOR_HANDLER = FUNCTION_HANDLER.replace("out.append(y.reshape(-1).tolist())", "out.append(y.reshape(-1))")

MODELS = ("cls_script", "cls_eager", "fn_script", "tensor_out")

MODEL_FILE = '''
import torch


class MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(16, 64)
        self.fc2 = torch.nn.Linear(64, 4)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))
'''


@pytest.fixture(scope="module")
def archives(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("ts-build")
    store = work / "store"
    store.mkdir()
    (work / "model.py").write_text(textwrap.dedent(MODEL_FILE))
    spec = importlib.util.spec_from_file_location("ts_compat_model", work / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    torch.manual_seed(1)
    model = module.MLP()
    torch.save(model.state_dict(), work / "mlp_state.pth")
    torch.jit.script(model).save(str(work / "mlp.pt"))
    (work / "cls_handler.py").write_text(CLASS_HANDLER)
    (work / "fn_handler.py").write_text(FUNCTION_HANDLER)
    (work / "tensor_handler.py").write_text(TENSOR_HANDLER)
    (work / "model-config.yaml").write_text("minWorkers: 1\nmaxWorkers: 1\nbatchSize: 4\nmaxBatchDelay: 20\n")
    archiver = str(BIN / "torch-model-archiver")
    common = ["--version", "1.0", "--export-path", str(store), "--force"]
    runs = [
        ["--model-name", "cls_script", "--serialized-file", str(work / "mlp.pt"), "--handler", str(work / "cls_handler.py"),
         "--config-file", str(work / "model-config.yaml")],
        ["--model-name", "cls_eager", "--model-file", str(work / "model.py"), "--serialized-file", str(work / "mlp_state.pth"),
         "--handler", str(work / "cls_handler.py")],
        ["--model-name", "fn_script", "--serialized-file", str(work / "mlp.pt"), "--handler", str(work / "fn_handler.py")],
        ["--model-name", "tensor_out", "--serialized-file", str(work / "mlp.pt"),
         "--handler", str(work / "tensor_handler.py")],
    ]
    for args in runs:
        subprocess.run([archiver, *args, *common], check=True, capture_output=True, timeout=120)
    return store


def write_config(path: Path, store: Path) -> dict[str, int]:
    ports = {k: free_port() for k in ("inf", "mgmt", "met", "grpc", "grpcm")}
    path.write_text(
        f"inference_address=http://127.0.0.1:{ports['inf']}\n"
        f"management_address=http://127.0.0.1:{ports['mgmt']}\n"
        f"metrics_address=http://127.0.0.1:{ports['met']}\n"
        f"grpc_inference_port={ports['grpc']}\ngrpc_management_port={ports['grpcm']}\n"
        f"model_store={store}\n"
        "load_models=cls_script.mar,cls_eager.mar,fn_script.mar,tensor_out.mar\n"
        "disable_token_authorization=true\n"
        "enable_model_api=true\n"
        "default_workers_per_model=1\n")
    return ports


def wait_for(url: str, proc: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited:\n{log.read_text()[-4000:]}")
        try:
            if all(httpx.post(f"{url}/predictions/{m}", json=[0.0] * 16, timeout=5).status_code == 200
                   for m in MODELS):
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise TimeoutError(log.read_text()[-4000:])


INPUTS = [[float(i) for i in range(16)], [0.5] * 16, [(-1) ** i * i / 7 for i in range(16)]]


def _answer(url: str, model: str, x: list) -> list:
    r = httpx.post(f"{url}/predictions/{model}", json=x, timeout=30)
    assert r.status_code == 200, r.text
    if model == "tensor_out":  # torch.save's bytes: read back as the client would
        import io

        return torch.load(io.BytesIO(r.content)).tolist()
    return r.json()


def _described(mgmt: str, model: str, query: str) -> tuple:
    """(status, customizedMetadata or the error's type) of a customized describe."""
    r = httpx.get(f"{mgmt}/models/{model}{query}", timeout=30)
    body = r.json()
    return r.status_code, body[0].get("customizedMetadata", "absent") if r.status_code == 200 else body.get("type")


def answers(url: str, mgmt: str) -> dict:
    out = {(m, i): _answer(url, m, x) for m in MODELS for i, x in enumerate(INPUTS)}
    # the handler's describe_handle, run by its worker (a function handler gets the describe's
    # empty row, and this one fails on it: 503 on both servers)
    for query in ("?customized=true", "/1.0?customized=true", "?customized=false", "/all?customized=true"):
        for m in ("cls_script", "cls_eager", "fn_script"):
            out[("describe" + query, m)] = _described(mgmt, m, query)
    return out


@pytest.fixture(scope="module")
def osprey_answers(archives, tmp_path_factory) -> dict:
    work = tmp_path_factory.mktemp("osprey-ts-config")
    ports = write_config(work / "config.properties", archives)
    log = work / "osprey.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "server.cli", "serve", "--foreground", "--ts-config",
                                 str(work / "config.properties"), "--pid-file", str(work / "pid")],
                                cwd=work, stdout=fh, stderr=subprocess.STDOUT, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    try:
        url = f"http://127.0.0.1:{ports['inf']}"
        wait_for(url, proc, log)
        return answers(url, f"http://127.0.0.1:{ports['mgmt']}")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:  # never leave a server holding its ports
            proc.kill()
            proc.wait(5)


def test_osprey_serves_torch_model_archiver_archives(osprey_answers):
    described = {"labels": ["a", "b", "c", "d"], "inputs": 16, "nested": {"scale": 1.5}}
    for (model, i), out in osprey_answers.items():
        if model.startswith("describe"):
            expected = {"?customized=false": (200, "absent"), "/all?customized=true": (200, "absent")}.get(model[8:], (
                503, "InternalServerException") if i == "fn_script" else (200, described))
            assert out == expected, (model, i, out)
            continue
        assert isinstance(out, list) and len(out) == 4, (model, out)
    # TorchScript and eager archives of the same weights agree
    for i in range(len(INPUTS)):
        assert osprey_answers[("cls_script", i)] == pytest.approx(osprey_answers[("cls_eager", i)], rel=1e-5)
        assert osprey_answers[("fn_script", i)] == pytest.approx(osprey_answers[("cls_script", i)], rel=1e-5)
        assert osprey_answers[("tensor_out", i)] == pytest.approx(osprey_answers[("fn_script", i)], rel=1e-6)


@pytest.mark.skipif(shutil.which("java") is None or not (BIN / "torchserve").exists(),
                    reason="TorchServe needs Java 17 and the torchserve package")
def test_same_answers_as_torchserve(archives, osprey_answers, tmp_path):
    ports = write_config(tmp_path / "config.properties", archives)
    log = tmp_path / "ts.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen([str(BIN / "torchserve"), "--start", "--foreground", "--ncs", "--model-store", str(archives),
                                 "--ts-config", str(tmp_path / "config.properties"), "--disable-token-auth"],
                                cwd=tmp_path, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{ports['inf']}"
        wait_for(url, proc, log, timeout=180)
        ts_answers = answers(url, f"http://127.0.0.1:{ports['mgmt']}")
    finally:
        subprocess.run([str(BIN / "torchserve"), "--stop"], cwd=tmp_path, capture_output=True, timeout=60)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            import os
            os.killpg(proc.pid, signal.SIGKILL)
    assert set(ts_answers) == set(osprey_answers)
    for key, expected in ts_answers.items():
        if key[0].startswith("describe"):
            assert osprey_answers[key] == expected, key
        else:
            assert osprey_answers[key] == pytest.approx(expected, rel=1e-6, abs=1e-7), key
