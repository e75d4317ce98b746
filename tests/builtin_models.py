"""Example archives built once per test session and shared by the handler tests.

``example_store("digits_cnn", ...)`` trains and packages the named examples (each at most
once per process) into one shared folder and returns it; ``concurrent_posts`` sends many
requests at once so that the server batches them; ``mean_batch_size`` reads the server's
batch-size histogram.
"""

from __future__ import annotations

import atexit
import re
import shutil
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

__all__ = ["example_store", "concurrent_posts", "mean_batch_size"]

_lock = threading.Lock()
_built: set[str] = set()
_root: Path | None = None


def example_store(*names: str) -> Path:
    global _root
    from examples.build import build_one

    with _lock:
        if _root is None:
            _root = Path(tempfile.mkdtemp(prefix="osprey-test-examples-"))
            atexit.register(shutil.rmtree, _root, True)
        for name in names:
            if name not in _built:
                build_one(name, _root)
                _built.add(name)
        return _root


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
