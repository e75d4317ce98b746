"""Per-instance torch settings: TorchScript's optimizing executor off on CPU unless asked for;
torch's OpenMP threads wait passively (they do not spin on the cores the server needs) after a
short spin that covers the gaps inside one forward pass.

Under dynamic batching every batch size is a new input shape, and TorchScript's profiling
executor recompiles a scripted model for each one (milliseconds each, holding the whole
batch); Osprey runs instance threads without it on CPU, and ``jit_optimize: true`` in
model-config.yaml brings it back.
"""

from __future__ import annotations

import os

import httpx
import pytest

from server.core.model_config import parse_model_config
from server.core.errors import OspreyError
from server.core.osthread import instance_thread_name
from tests.models import handler_archive, mlp_archive

FLAG_HANDLER = '''
import gc
import os
import torch

def handle(data, context):
    if data is None:
        return None
    from threadpoolctl import threadpool_info
    blas = [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas" and "numpy" in i["filepath"]]
    return [{"jit_optimize": torch._C._get_graph_executor_optimize(),
             "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "omp_spin": os.environ.get("GOMP_SPINCOUNT"),
             "numpy_blas": blas, "gc": gc.isenabled()} for _ in data]
'''


@pytest.fixture(scope="module")
def srv(osprey_module, tmp_path_factory):
    store = tmp_path_factory.mktemp("store")
    cpu = {"deviceType": "cpu"}  # the default differs on GPU instances
    handler_archive(store, "flag_default", FLAG_HANDLER, config=cpu)
    handler_archive(store, "flag_on", FLAG_HANDLER, config={**cpu, "jit_optimize": True})
    handler_archive(store, "flag_off", FLAG_HANDLER, config={**cpu, "jit_optimize": False})
    handler_archive(store, "flag_bad", FLAG_HANDLER, config={**cpu, "jit_optimize": "sometimes"})
    handler_archive(store, "flag_process", FLAG_HANDLER, config={**cpu, "isolation": "process"})
    mlp_archive(store, config={"batchSize": 32, "maxBatchDelay": 5})
    server = osprey_module(["flag_default.mar", "flag_on.mar", "flag_off.mar", "flag_process.mar", "mlp.mar"], store)
    server.store = store
    return server


def _flag(srv, name: str, key: str = "jit_optimize"):
    r = httpx.post(f"{srv.inference}/predictions/{name}", json={"x": 1}, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()[key]


def test_the_openmp_wait_policy_reaches_thread_and_process_instances(srv):
    # omp_wait_policy's default, passive with a short spin, is exported as ACTIVE with that spin
    # (server.serve.apply_omp_wait_policy); an OMP_WAIT_POLICY the user exported wins
    expected = os.environ.get("OMP_WAIT_POLICY", "PASSIVE" if "GOMP_SPINCOUNT" in os.environ else "ACTIVE")
    assert _flag(srv, "flag_default", "omp_wait_policy") == expected
    assert _flag(srv, "flag_process", "omp_wait_policy") == expected  # the child inherits it


def test_the_garbage_collector_runs_once_the_server_serves(srv):
    """The server holds the collector off while it starts (server.core.heap.hold); once the
    startup models are loaded it runs again, in the server and in process instances' children."""
    assert _flag(srv, "flag_default", "gc") is True
    assert _flag(srv, "flag_process", "gc") is True


def test_passive_openmp_threads_spin_briefly_before_they_sleep(srv):
    """omp_spin_count's default (1,000 loops, about 10 us) as GOMP_SPINCOUNT: the regions of one
    forward pass do not each wake a sleeping thread; an exported GOMP_SPINCOUNT or policy wins."""
    if "OMP_WAIT_POLICY" in os.environ or "GOMP_SPINCOUNT" in os.environ:
        pytest.skip("the environment sets the OpenMP wait, which wins")
    assert _flag(srv, "flag_default", "omp_spin") == "1000"
    assert _flag(srv, "flag_process", "omp_spin") == "1000"


def test_numpy_blas_runs_one_thread_in_the_server_process(srv):
    """numpy's OpenBLAS workers spin after each threaded product on the cores the event loop needs:
    the server limits numpy's own BLAS to numpy_blas_threads (1) for its thread instances and the
    monitor, unless the environment sets a BLAS thread count."""
    if any(k in os.environ for k in ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "OMP_NUM_THREADS")):
        pytest.skip("the environment sets a BLAS thread count, which wins")
    assert set(_flag(srv, "flag_default", "numpy_blas")) <= {1}
    assert _flag(srv, "flag_default", "numpy_blas")  # numpy's wheel brings its OpenBLAS: it is found


def test_cpu_instances_run_torchscript_without_the_optimizing_executor(srv):
    assert _flag(srv, "flag_default") is False
    assert _flag(srv, "flag_off") is False


def test_jit_optimize_true_brings_the_executor_back_for_that_model_only(srv):
    assert _flag(srv, "flag_on") is True
    assert _flag(srv, "flag_default") is False  # thread-local: the other model is untouched


def test_a_torchscript_model_answers_every_batch_size_the_same(srv):
    import concurrent.futures as cf

    import torch

    model = torch.jit.load(str(srv.store.parent / "build-mlp-1.0" / "mlp.pt"))
    rows = [[float(i + j) / 10 for j in range(16)] for i in range(64)]
    with torch.inference_mode():
        expected = model(torch.tensor(rows)).tolist()

    def one(i):
        r = httpx.post(f"{srv.inference}/predictions/mlp", json=rows[i], timeout=30)
        assert r.status_code == 200, r.text
        return r.json()

    with cf.ThreadPoolExecutor(32) as pool:
        got = list(pool.map(one, range(64)))
    for g, e in zip(got, expected):
        assert g == pytest.approx(e, abs=1e-5)


def test_a_bad_jit_optimize_value_is_refused_at_registration_naming_the_key(srv):
    r = httpx.post(f"{srv.management}/models", params={"url": "flag_bad.mar"}, timeout=60)
    assert r.status_code == 400
    assert "jit_optimize" in r.text


def test_jit_optimize_parses_booleans_only():
    assert parse_model_config({}).jit_optimize is None
    assert parse_model_config({"jit_optimize": True}).jit_optimize is True
    with pytest.raises(OspreyError, match="jit_optimize must be true or false"):
        parse_model_config({"jit_optimize": "yes"})


GPU_MLP_HANDLER = '''
import os
import torch

model = device = None

def handle(data, context):
    global model, device
    if data is None:
        gpu = context.system_properties.get("gpu_id")
        device = torch.device("cpu" if gpu is None else f"cuda:{gpu}")
        model = torch.jit.load(os.path.join(context.system_properties["model_dir"], "mlp.pt"), map_location=device)
        return None
    x = torch.tensor([row["body"]["x"] for row in data], dtype=torch.float32, device=device)
    with torch.inference_mode():
        y = model(x).cpu().tolist()
    return [{"y": r, "device": str(device), "jit_optimize": torch._C._get_graph_executor_optimize()} for r in y]
'''


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.mark.skipif(not _cuda(), reason="needs a CUDA GPU")
def test_gpu_instances_keep_the_optimizing_executor_and_answer_like_cpu(osprey, tmp_path):
    """On a GPU the profiling executor fuses kernels, so GPU instances keep it by default; a scripted
    model served there under dynamic batching answers every batch size like the CPU model."""
    import concurrent.futures as cf

    import torch

    from tests.models import make_mlp

    store = tmp_path / "gpu-store"
    store.mkdir()
    weights = make_mlp(tmp_path / "mlp.pt").read_bytes()
    batching = {"batchSize": 16, "maxBatchDelay": 5}
    handler_archive(store, "on_gpu", GPU_MLP_HANDLER, config={**batching, "deviceType": "gpu"},
                    extra={"mlp.pt": weights})
    handler_archive(store, "on_gpu_off", GPU_MLP_HANDLER,
                    config={**batching, "deviceType": "gpu", "jit_optimize": False}, extra={"mlp.pt": weights})
    srv = osprey(["on_gpu.mar", "on_gpu_off.mar"], store)
    rows = [[float((i * 7 + j) % 13) / 5 for j in range(16)] for i in range(96)]
    with torch.inference_mode():
        expected = torch.jit.load(str(tmp_path / "mlp.pt"))(torch.tensor(rows)).tolist()

    def one(args):
        name, i = args
        r = httpx.post(f"{srv.inference}/predictions/{name}", json={"x": rows[i]}, timeout=60)
        assert r.status_code == 200, r.text
        return r.json()

    for name, flag in (("on_gpu", True), ("on_gpu_off", False)):
        with cf.ThreadPoolExecutor(32) as pool:
            got = list(pool.map(one, [(name, i) for i in range(len(rows))]))
        assert {g["device"] for g in got} == {"cuda:0"}
        assert {g["jit_optimize"] for g in got} == {flag}
        for g, e in zip(got, expected):
            assert g["y"] == pytest.approx(e, abs=1e-3)


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="thread names are read from Linux's /proc")
def test_server_threads_carry_their_role_in_the_system_thread_name(srv):
    """``top -H``, ``ps -L`` and per-thread CPU counters tell an instance's thread (``i:`` model,
    index), the thread driving a process instance (``p:``) and the monitor's apart."""
    _flag(srv, "flag_default")  # answered: every instance is running
    pid = srv.proc.pid
    names = set()
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/comm") as f:
                names.add(f.read().strip())
        except OSError:  # a thread that ended meanwhile
            pass
    expected = {"i:flag_defaul:0", "i:mlp:0", "p:flag_proces:0", "osprey-monitor"}  # 15 bytes at most
    assert expected == {instance_thread_name("flag_default", 0), instance_thread_name("mlp", 0),
                        instance_thread_name("flag_process", 0, "p"), "osprey-monitor"}
    assert expected <= names, sorted(names)
