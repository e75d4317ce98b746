"""Example archives built once per test session and shared by the handler tests.

``example_store("digits_cnn", ...)`` trains and packages the named examples (each at most
once per process) into one shared folder and returns it; ``concurrent_posts`` sends many
requests at once so that the server batches them; ``mean_batch_size`` reads the server's
batch-size histogram.
"""

from __future__ import annotations

import atexit
import fcntl
import os
import re
import shutil
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

__all__ = ["example_store", "concurrent_posts", "mean_batch_size", "variant"]

_lock = threading.Lock()
_built: set[str] = set()
_root: Path | None = None
SHARED_ENV = "OSPREY_TEST_EXAMPLES_SHARED"


def example_store(*names: str) -> Path:
    global _root
    from examples.build import EXAMPLES

    with _lock:
        if _root is None and os.environ.get("OSPREY_TEST_EXAMPLES"):
            # reuse examples built beforehand (`osprey examples --out DIR`), for quick reruns
            _root = Path(os.environ["OSPREY_TEST_EXAMPLES"])
            _built.update(n for n in EXAMPLES if (_root / f"{n}.mar").is_file())
        if _root is None:
            _root = Path(tempfile.mkdtemp(prefix="osprey-test-examples-"))
            atexit.register(shutil.rmtree, _root, True)
        missing = [n for n in names if n not in _built]
        if missing:
            shared = os.environ.get(SHARED_ENV)
            if shared:
                _build_shared(Path(shared), missing, _root)
            else:
                from examples.build import build_one

                for name in missing:
                    build_one(name, _root)
            _built.update(missing)
        return _root


def _build_shared(shared: Path, names: list[str], store: Path) -> None:
    """Train the examples once per test run for every pytest-xdist worker (the folder is made
    and removed by tests/conftest.py), then hard-link them into this process's own store:
    servers write job records and datasets under their store, which workers must not share.
    Each example is built in a folder of its own under its own lock (two workers build two
    examples at once), then its files are linked into the shared folder under a short global
    lock (two examples may write the same sample file)."""
    from examples.build import build_one

    for name in names:
        with open(shared / f".lock-{name}", "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                own = shared / f".build-{name}"
                if not (own / ".done").exists():
                    shutil.rmtree(own, ignore_errors=True)
                    own.mkdir()
                    build_one(name, own)
                    (own / ".done").touch()
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
        with open(shared / ".lock", "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                _link_tree(own, shared)
                _link_tree(shared, store)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)


def _link_tree(src_root: Path, dst_root: Path) -> None:
    """Hard-link every file under ``src_root`` missing under ``dst_root`` (dot names skipped)."""
    for src in src_root.rglob("*"):
        rel = src.relative_to(src_root)
        if any(part.startswith(".") for part in rel.parts):
            continue
        dst = dst_root / rel
        if src.is_dir():
            dst.mkdir(parents=True, exist_ok=True)
        elif not dst.exists():
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.link(src, dst)


def concurrent_posts(url: str, bodies: list, *, headers: dict | None = None, workers: int = 16) -> list[httpx.Response]:
    """POST every body at once (bytes as-is, anything else as JSON); responses in order."""
    with httpx.Client(timeout=60) as client:
        def post(body):
            if isinstance(body, (bytes, bytearray)):
                return client.post(url, content=bytes(body), headers=headers)
            return client.post(url, json=body, headers=headers)

        with ThreadPoolExecutor(workers) as pool:
            return list(pool.map(post, bodies))


def mean_batch_size(metrics_url: str, model: str) -> float:
    text = httpx.get(f"{metrics_url}/metrics", timeout=10).text
    def value(suffix: str) -> float:
        m = re.search(rf'^osprey_batch_size_{suffix}\{{[^}}]*model="{model}"[^}}]*\}} ([0-9.e+]+)$', text, re.M)
        return float(m.group(1)) if m else 0.0
    count = value("count")
    return value("sum") / count if count else 0.0


def variant(archive: Path, store: Path, name: str, **settings) -> str:
    """An unpacked copy of ``archive`` in ``store`` named ``name``, its model-config.yaml
    updated with ``settings`` (top-level keys; ``handler`` is merged). Returns the folder name."""
    import json
    import zipfile

    import yaml

    target = store / name
    if target.exists():
        shutil.rmtree(target)
    with zipfile.ZipFile(archive) as zf:
        zf.extractall(target)
    manifest_path = target / "MAR-INF" / "MANIFEST.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["model"]["modelName"] = name
    cfg_name = manifest["model"].setdefault("configFile", "model-config.yaml")
    cfg_path = target / cfg_name
    cfg = yaml.safe_load(cfg_path.read_text()) if cfg_path.exists() else {}
    for key, value in settings.items():
        if key == "handler":
            cfg.setdefault("handler", {}).update(value)
        else:
            cfg[key] = value
    cfg_path.write_text(yaml.safe_dump(cfg))
    manifest_path.write_text(json.dumps(manifest))
    return name
