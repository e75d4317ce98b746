"""Archives whose handler needs a package from the archive's requirements.txt
(install_py_dep_per_model), for tests/e2e/test_model_deps.py and the TorchServe recording in
tests/fixtures/torchserve_model_deps/record.py.

The package is a tiny pure-Python wheel written here (a wheel is a zip with a dist-info
folder), shipped inside the archive and named by a relative path in requirements.txt, so pip
installs it offline in about a second: no index, no build backend.
"""

from __future__ import annotations

import base64
import hashlib
import textwrap
import zipfile
from pathlib import Path

import yaml

from server.core.archive import write_archive

__all__ = ["PACKAGE", "WHEEL", "DEPS_HANDLER", "tiny_wheel", "deps_archive"]

PACKAGE = "osprey_tinydep"
WHEEL = f"{PACKAGE}-0.1-py3-none-any.whl"

# imports the package at module level, as a handler with a third-party dependency does
DEPS_HANDLER = f'''
import {PACKAGE}


def handle(data, context):
    if data is None:
        return None
    return [{PACKAGE}.answer() for _ in data]
'''


def tiny_wheel(path: Path, answer: str = "from the tiny package") -> Path:
    """Write ``WHEEL`` (package ``PACKAGE``, whose ``answer()`` returns ``answer``) into folder ``path``."""
    files = {f"{PACKAGE}/__init__.py": f"def answer():\n    return {answer!r}\n".encode(),
             f"{PACKAGE}-0.1.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {PACKAGE}\nVersion: 0.1\n".encode(),
             f"{PACKAGE}-0.1.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: osprey-tests\n"
                                               b"Root-Is-Purelib: true\nTag: py3-none-any\n"}
    record = []
    for name, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{name},sha256={digest},{len(data)}")
    record.append(f"{PACKAGE}-0.1.dist-info/RECORD,,")
    files[f"{PACKAGE}-0.1.dist-info/RECORD"] = ("\n".join(record) + "\n").encode()
    path.mkdir(parents=True, exist_ok=True)
    out = path / WHEEL
    with zipfile.ZipFile(out, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return out


def deps_archive(store: Path, name: str, requirements: str | None, *, config: dict | None = None,
                 version: str = "1.0", handler: str = DEPS_HANDLER, answer: str = "from the tiny package") -> Path:
    """An archive of ``handler`` with the tiny wheel as an extra file and ``requirements`` (e.g.
    ``./<WHEEL>``) as its requirements.txt (none when None)."""
    work = store.parent / f"build-{name}-{version}"
    work.mkdir(parents=True, exist_ok=True)
    (work / f"{name}_handler.py").write_text(textwrap.dedent(handler))
    wheel = tiny_wheel(work, answer)
    reqs = None
    if requirements is not None:
        reqs = work / "requirements.txt"
        reqs.write_text(requirements)
    config_file = None
    if config:
        config_file = work / "model-config.yaml"
        config_file.write_text(yaml.safe_dump(config))
    return write_archive(model_name=name, version=version, handler=str(work / f"{name}_handler.py"),
                         extra_files=[str(wheel)], requirements_file=str(reqs) if reqs else None,
                         config_file=str(config_file) if config_file else None, export_path=str(store), force=True)
