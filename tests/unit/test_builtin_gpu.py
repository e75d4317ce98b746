"""Built-in handlers on a CUDA GPU (skipped without one): same answers as on the CPU, and
fp16/bf16 autocast and channels_last within the stated loss.

The handlers run in-process here (the server's GPU placement is the runtime's business):
each example archive is opened, its handler initialized with ``gpu_id`` 0, and fed a batch.
Tolerances: probabilities 1e-3 between CPU and GPU fp32 (TF32 and other kernels), accuracy
loss under fp16/bf16 at most 2 points against GPU fp32 on held-out data.
"""

from __future__ import annotations

import json
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

MAX_ACCURACY_LOSS = 0.02


def _open(archive: Path, dest: Path):
    with zipfile.ZipFile(archive) as zf:
        zf.extractall(dest)
    return json.loads((dest / "MAR-INF" / "MANIFEST.json").read_text())


def _handler(archive: Path, tmp: Path, gpu: int | None, **overrides):
    import yaml

    from handlers.builtin import builtin_handler_class
    from handlers.context import Context

    dest = tmp / f"{archive.stem}-{gpu}-{'-'.join(f'{k}{v}' for k, v in overrides.items())}"
    manifest = _open(archive, dest)
    cfg_file = dest / manifest["model"].get("configFile", "model-config.yaml")
    cfg = yaml.safe_load(cfg_file.read_text()) if cfg_file.exists() else {}
    cfg.update(overrides)
    ctx = Context(manifest["model"]["modelName"], str(dest), manifest, 64, gpu, "test", model_yaml_config=cfg)
    handler = builtin_handler_class(manifest["model"]["handler"])()
    handler.initialize(ctx)
    return handler, ctx


def _run(handler, ctx, bodies: list) -> list:
    from handlers.context import RequestProcessor

    ctx.request_ids = {i: str(i) for i in range(len(bodies))}
    ctx.request_processor = [RequestProcessor({}) for _ in bodies]
    return handler.handle([{"body": b} for b in bodies], ctx)


def _top(answers: list[dict]) -> list[str]:
    return [next(iter(a)) for a in answers]


@pytest.fixture(scope="module")
def store():
    from tests.builtin_models import example_store

    return example_store("digits_cnn", "digits_lstm", "text_transformer", "cancer_mlp", "diabetes_mlp",
                         "digits_vae", "digits_autoencoder")


def _digits(store: Path, n: int = 256):
    from examples.digits_cnn import digit_png

    held = np.load(store / "samples" / "digits_heldout.npz")
    return [digit_png(g) for g in held["images"][:n]], [str(y) for y in held["labels"][:n]]


def _workloads(store: Path) -> dict[str, tuple[list, list | None]]:
    pngs, labels = _digits(store)
    texts = json.loads((store / "samples" / "texts_heldout.json").read_text())
    cancer = json.loads((store / "samples" / "cancer_records.json").read_text())
    names = ["malignant", "benign"]
    y = np.load(store / "samples" / "cancer_heldout.npz")["y"]
    return {"digits_cnn": (pngs, labels), "digits_lstm": (pngs, labels),
            "text_transformer": ([{"text": t} for t in texts["texts"][:256]], texts["labels"][:256]),
            "cancer_mlp": (cancer, [names[i] for i in y])}


@pytest.mark.parametrize("name", ["digits_cnn", "digits_lstm", "text_transformer", "cancer_mlp"])
def test_gpu_answers_like_cpu_and_autocast_within_loss(store, tmp_path, name):
    bodies, truth = _workloads(store)[name]
    cpu_h, cpu_ctx = _handler(store / f"{name}.mar", tmp_path, None)
    assert str(cpu_h.device) == "cpu"
    gpu_h, gpu_ctx = _handler(store / f"{name}.mar", tmp_path, 0)
    assert gpu_h.device.type == "cuda"
    cpu = _run(cpu_h, cpu_ctx, bodies)
    gpu = _run(gpu_h, gpu_ctx, bodies)
    for a, b in zip(cpu, gpu):
        for k in a:
            assert abs(a[k] - b[k]) <= 1e-3, (name, k, a[k], b[k])
    acc = {"fp32": float(np.mean([p == t for p, t in zip(_top(gpu), truth)]))}
    timing = {}
    for precision in ("fp16", "bf16"):
        h, ctx = _handler(store / f"{name}.mar", tmp_path, 0, precision=precision)
        _run(h, ctx, bodies[:8])  # warm-up
        t0 = time.perf_counter()
        out = _run(h, ctx, bodies)
        torch.cuda.synchronize()
        timing[precision] = time.perf_counter() - t0
        acc[precision] = float(np.mean([p == t for p, t in zip(_top(out), truth)]))
        assert acc[precision] >= acc["fp32"] - MAX_ACCURACY_LOSS, (name, acc)
        assert any(a != b for a, b in zip(out, gpu)), f"{name} {precision}: autocast changed nothing"
    print(f"\n{name}: held-out accuracy on GPU {acc}; batch of {len(bodies)} in s {timing}")


def test_gpu_channels_last_generator_anomaly_regression(store, tmp_path):
    pngs, _ = _digits(store, 32)
    plain_h, plain_ctx = _handler(store / "digits_cnn.mar", tmp_path, 0)
    cl_h, cl_ctx = _handler(store / "digits_cnn.mar", tmp_path, 0, channels_last=True)
    for a, b in zip(_run(plain_h, plain_ctx, pngs), _run(cl_h, cl_ctx, pngs)):
        assert next(iter(a)) == next(iter(b)) and all(abs(a[k] - b[k]) <= 1e-3 for k in set(a) & set(b))

    for name, bodies, key, tol in (
            ("diabetes_mlp", json.loads((store / "samples" / "diabetes_records.json").read_text()), "progression", 0.05),
            ("digits_autoencoder", [g.reshape(-1).tolist() for g in
                                    np.load(store / "samples" / "digits_heldout.npz")["images"][:32]],
             "reconstruction_error", 1e-4)):
        cpu = _run(*_handler(store / f"{name}.mar", tmp_path, None), bodies)
        gpu = _run(*_handler(store / f"{name}.mar", tmp_path, 0), bodies)
        for a, b in zip(cpu, gpu):
            assert abs(a[key] - b[key]) <= tol, (name, a, b)

    from PIL import Image
    import io

    cpu_h, cpu_ctx = _handler(store / "digits_vae.mar", tmp_path, None)
    gpu_h, gpu_ctx = _handler(store / "digits_vae.mar", tmp_path, 0)
    bodies = [{"seed": s, "class": s % 10} for s in range(16)]
    for a, b in zip(_run(cpu_h, cpu_ctx, bodies), _run(gpu_h, gpu_ctx, bodies)):
        pa = np.asarray(Image.open(io.BytesIO(a)), dtype=np.int16)
        pb = np.asarray(Image.open(io.BytesIO(b)), dtype=np.int16)
        assert np.abs(pa - pb).max() <= 1  # same seed, same image, on either device
