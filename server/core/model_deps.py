"""A model archive's requirements.txt, installed for that model (``install_py_dep_per_model``).

TorchServe 0.12 (``ModelManager.setupModelDependencies``) runs ``python -m pip install -U -t
<model dir> -r requirements.txt`` in the archive's extraction folder on every registration, and
its worker processes find the packages there (the model folder is on their PYTHONPATH).

Osprey installs with ``pip install --target`` too, but into
``<state_dir>/deps/<model>/<version>/<key>/``, where ``key`` is a hash of requirements.txt, of
the archive files it names by relative path (a wheel shipped in the archive) and of the Python
that runs pip. A folder that is complete (its ``.complete`` marker written after pip succeeded)
is reused: registering the same archive again, after an unregister or a restart, installs
nothing. pip writes into a fresh temporary folder that is renamed into place only when it
succeeds, so a failed or interrupted install never leaves a half-filled folder that a later
registration would take for complete, and two servers sharing the state folder never write
into the same one.

pip runs as a child process (asyncio, off the event loop) with a time limit; its failure is an
:class:`~server.core.errors.OspreyError` naming pip's own ``ERROR:`` lines (which name the
requirement that failed). Where the folder goes on ``sys.path`` is the instances' business
(:mod:`server.instances`).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

from server.core import cpus
from server.core.errors import ErrorKind, OspreyError

__all__ = ["dependency_key", "install_requirements", "COMPLETE"]

log = logging.getLogger("osprey.registry")
_TS_TYPE = "ModelException"  # TorchServe's type for a failed requirements install (its 400)

COMPLETE = ".complete"  # written into a deps folder once pip has installed everything into it
_OUTPUT_LINES = 12  # pip output lines kept in a failure message when it printed no ERROR: line


def _local_files(model_dir: Path, requirements: str) -> list[Path]:
    """Files and folders inside ``model_dir`` that requirement lines name by path (``./x.whl``)."""
    found = []
    root = model_dir.resolve()
    for raw in requirements.splitlines():
        line = raw.split(" #", 1)[0].strip()
        if not line or line.startswith(("#", "-")):
            continue
        candidate = (model_dir / line.split(";", 1)[0].strip()).resolve()
        if candidate.is_relative_to(root) and candidate != root and candidate.exists():
            found.append(candidate)
    return found


def dependency_key(model_dir: Path, requirements_file: str) -> str:
    """The hash a deps folder is kept under: requirements.txt, the local files it names, the Python."""
    text = (model_dir / requirements_file).read_bytes()
    h = hashlib.sha256()
    h.update(f"{sys.implementation.cache_tag} {sys.platform}\n".encode())
    h.update(text)
    for path in _local_files(model_dir, text.decode("utf-8", "replace")):
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for f in files:
            h.update(f"\n{f.relative_to(model_dir.resolve())}\n".encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:24]


def _failure(name: str, version: str, output: str, model_dir: Path) -> str:
    lines = [ln.strip() for ln in output.replace(str(model_dir.resolve()), ".").replace(str(model_dir), ".")
             .splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("ERROR:")]
    detail = "; ".join(errors) if errors else " | ".join(lines[-_OUTPUT_LINES:])
    return (f"Custom pip package installation failed for model {name} (version {version}): "
            f"{detail or 'pip printed nothing'}")


async def install_requirements(name: str, version: str, model_dir: Path, requirements_file: str,
                               deps_root: Path, timeout: float) -> Path:
    """The folder holding ``requirements_file``'s packages for this model version: an existing
    complete one, else a new one pip installs (in ``model_dir``, so relative paths in the file
    are the archive's files). OspreyError (400, TorchServe's answer: its ModelException) when pip fails or takes
    longer than ``timeout`` seconds."""
    key = dependency_key(model_dir, requirements_file)
    target = deps_root / name / version / key
    if (target / COMPLETE).is_file():
        log.info("model %s version %s: its requirements are installed already in %s", name, version, target)
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=target.parent))
    cmd = [sys.executable, "-m", "pip", "install", "--target", str(work), "--no-input", "--disable-pip-version-check",
           "--no-warn-script-location", "-r", str((model_dir / requirements_file).resolve())]
    log.info("model %s version %s: installing its requirements (%s) into %s", name, version, requirements_file, target)
    try:
        with cpus.unpinned():  # not on the event loop's one CPU (server/core/cpus.py)
            proc = await asyncio.create_subprocess_exec(*cmd, cwd=str(model_dir), stdin=asyncio.subprocess.DEVNULL,
                                                        stdout=asyncio.subprocess.PIPE,
                                                        stderr=asyncio.subprocess.STDOUT,
                                                        env={**os.environ, "PYTHONNOUSERSITE": "1"})
        try:
            out, _ = await asyncio.wait_for(proc.communicate(), timeout)
        except asyncio.TimeoutError:
            proc.kill()
            await proc.wait()
            raise OspreyError(ErrorKind.BAD_INPUT, f"Custom pip package installation failed for model {name} (version "
                                                  f"{version}): pip took longer than {timeout:g} s "
                                                  "(setting py_dep_install_timeout)", type_name=_TS_TYPE) from None
        except asyncio.CancelledError:  # the registration was abandoned: pip goes with it
            proc.kill()
            await proc.wait()
            raise
        output = out.decode("utf-8", "replace")
        if proc.returncode != 0:
            log.error("model %s version %s: pip failed (exit status %s):\n%s", name, version, proc.returncode, output)
            raise OspreyError(ErrorKind.BAD_INPUT, _failure(name, version, output, model_dir), type_name=_TS_TYPE)
        (work / COMPLETE).write_text(requirements_file + "\n")
        try:
            os.rename(work, target)
        except OSError:
            if not (target / COMPLETE).is_file():  # neither another server's finished copy nor ours
                raise
            log.info("model %s version %s: another server installed the same requirements meanwhile", name, version)
        else:
            work = None
        log.info("model %s version %s: installed its requirements into %s", name, version, target)
        return target
    finally:
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)
