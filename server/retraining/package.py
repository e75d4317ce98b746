"""A retrained model as the champion's next version: the champion's archive with new weights.

:func:`stage` lays the new version out in a folder (an archive folder Osprey opens as it is:
what search trials and the gate load); :func:`write_version` zips it into a ``.mar`` that
Osprey and TorchServe both load (``MAR-INF/MANIFEST.json`` and the files at the zip's root,
as torch-model-archiver writes them), atomically: it is written under a temporary name beside
``out_path`` and renamed over it, so a killed job never leaves a half-written archive.

What changes from the champion: the manifest's ``modelVersion`` (and ``createdOn``); the
``serializedFile`` (replaced by the new weights, under the champion's file name when the
format's suffix is the same, else under the weights' own name); ``model-config.yaml`` (the
training result's overrides merged in); ``training.json`` (``heldout_metrics``: the new
version's numbers, ``retrained``: where it came from); ``reference.npz`` (replaced by the
training data the entry point reports, when it does); and ``osprey-profile.json``, the drift
reference, rebuilt by :func:`server.profiling.profile_archive` from the new reference.npz so
drift is measured against the data the new version learned from. Every other file (handler,
model file, index_to_name.json, features.json, ...) is kept as it is.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import yaml

from server.core.archive import MANIFEST_PATH, open_archive
from server.core.errors import OspreyError

from .entry import reference_encoder

__all__ = ["PackageError", "stage", "write_version", "next_version", "PROFILE_NAME"]

log = logging.getLogger("osprey.retraining")

PROFILE_NAME = "osprey-profile.json"
CONFIG_NAME = "model-config.yaml"


class PackageError(Exception):
    """The new version cannot be written: the message says why."""


def _merge(base: dict, over: Mapping) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), dict) else v
    return out


def stage(champion: str | os.PathLike, weights: str | os.PathLike, dest: str | os.PathLike, *,
          version: str | None = None, config_overrides: Mapping | None = None, metrics: Mapping | None = None,
          reference: Mapping[str, np.ndarray] | None = None, info: Mapping | None = None,
          files: Mapping[str, str | os.PathLike] | None = None) -> Path:
    """Lay out the new version in the empty (or new) folder ``dest``; returns it.

    ``champion``: the champion's archive (folder or file); ``weights``: the serialized model
    the training entry point wrote; ``metrics``: the new version's held-out numbers (for
    training.json); ``reference``: arrays for a new reference.npz (``inputs``, and
    ``targets`` / ``outputs`` when known); ``info``: extra facts for training.json
    ``retrained`` (rows, entry point, hyperparameters...); ``files``: other files of the new
    version (plain name -> file), replacing the champion's."""
    weights = Path(weights)
    if not weights.is_file() or weights.stat().st_size == 0:
        raise PackageError(f"weights file {weights} does not exist or is empty")
    try:
        opened = open_archive(champion)
    except OspreyError as exc:
        raise PackageError(f"champion archive {champion}: {exc.message}") from None
    dest = Path(dest)
    try:
        if dest.exists() and any(dest.iterdir()):
            raise PackageError(f"{dest} is not empty")
        shutil.copytree(opened.model_dir, dest, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__"))
    finally:
        opened.cleanup()
    manifest = json.loads((dest / MANIFEST_PATH).read_text())
    model = manifest["model"]
    old_version = str(model.get("modelVersion") or "1.0")
    old = model.get("serializedFile")
    name = old if old and Path(old).suffix.lower() == weights.suffix.lower() else weights.name
    if old and name != old:
        (dest / old).unlink(missing_ok=True)
    shutil.copyfile(weights, dest / name)
    model["serializedFile"] = name
    for fname, src in (files or {}).items():
        if Path(fname).name != fname or fname in ("", ".", "..", name, MANIFEST_PATH.split("/")[0]):
            raise PackageError(f"file name {fname!r} must be a plain name other than the weights' and MAR-INF")
        if not Path(src).is_file():
            raise PackageError(f"file {fname!r}: {src} is not a file")
        shutil.copyfile(src, dest / fname)
    if version is not None:
        model["modelVersion"] = str(version)
    manifest["createdOn"] = time.strftime("%d/%m/%Y %H:%M:%S")
    if config_overrides:
        cfg_name = model.get("configFile") or CONFIG_NAME
        path = dest / cfg_name
        current = (yaml.safe_load(path.read_text()) or {}) if path.is_file() else {}
        path.write_text(yaml.safe_dump(_merge(current, config_overrides), sort_keys=False))
        model["configFile"] = cfg_name
    (dest / MANIFEST_PATH).write_text(json.dumps(manifest, indent=2))
    training_path = dest / "training.json"
    try:
        training = json.loads(training_path.read_text()) if training_path.is_file() else {}
    except ValueError:
        training = {}
    if metrics is not None or info is not None or version is not None:
        training = dict(training)
        if metrics is not None:
            training["heldout_metrics"] = dict(metrics)
        training["retrained"] = {"from_version": old_version, "version": model.get("modelVersion"),
                                 "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **dict(info or {})}
        training_path.write_text(json.dumps(training, indent=2, default=str))
    if reference is not None:
        arrays = {k: np.asarray(v) for k, v in reference.items() if v is not None}
        if "inputs" not in arrays:
            raise PackageError("the new reference data has no 'inputs' array")
        np.savez_compressed(dest / "reference.npz", **arrays)
    return dest


def _zip(folder: Path, target: Path) -> None:
    with zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as zf:
        for file in sorted(folder.rglob("*")):
            if file.is_file():
                zf.write(file, file.relative_to(folder).as_posix())


def _profile(archive: Path, folder: Path, say: Callable[[str], Any]) -> bool:
    """Rebuild the drift profile of ``archive`` from its reference.npz; False when it cannot."""
    from server.profiling import ReferenceError, profile_archive

    ref = folder / "reference.npz"
    if not ref.is_file():
        return False
    try:
        training = json.loads((folder / "training.json").read_text())
    except (OSError, ValueError):
        training = {}
    to_request = reference_encoder(folder, training)
    with np.load(ref, allow_pickle=False) as data:
        if "inputs" not in data.files:
            return False
        inputs = data["inputs"]
    rows = []
    for i, row in enumerate(inputs):
        body = to_request(row) if to_request else (str(row) if row.dtype.kind in "US" else row.tolist())
        rows.append((f"reference.npz:inputs[{i}]", body))
    try:
        profile_archive(archive, rows, source="reference.npz: training data of this version")
    except ReferenceError as exc:
        say(f"package: no drift profile for the new version: {exc}")
        return False
    return True


def write_version(champion_archive: str | os.PathLike, weights: str | os.PathLike, new_version: str,
                  out_path: str | os.PathLike, config_overrides: Mapping | None = None, *,
                  metrics: Mapping | None = None, reference: Mapping[str, np.ndarray] | None = None,
                  info: Mapping | None = None, profile: bool = True, files: Mapping | None = None,
                  log: Callable[[str], Any] | None = None) -> Path:
    """Write the champion's next version to ``out_path`` (a .mar); returns ``out_path``.

    The drift profile is rebuilt from the version's reference.npz when the reference changed
    or the champion had a profile (it then also takes the new held-out metrics as its quality
    baseline); a profile that cannot be built is left out, and said in ``log``."""
    say = log or log_info
    if not new_version or any(c in str(new_version) for c in "/\\ "):
        raise PackageError(f"version {new_version!r} must be a plain non-empty string")
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".osprey-version-", dir=out.parent) as tmp:
        folder = stage(champion_archive, weights, Path(tmp) / "archive", version=new_version,
                       config_overrides=config_overrides, metrics=metrics, reference=reference, info=info,
                       files=files)
        had_profile = (folder / PROFILE_NAME).is_file()
        rebuild = profile and (reference is not None or had_profile)
        if rebuild:
            (folder / PROFILE_NAME).unlink(missing_ok=True)  # its quality baseline is the champion's
        fd, part = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".part", dir=out.parent)
        os.close(fd)
        try:
            _zip(folder, Path(part))
            if rebuild:
                _profile(Path(part), folder, say)
            os.chmod(part, 0o644)
            os.replace(part, out)
        except BaseException:
            Path(part).unlink(missing_ok=True)
            raise
    return out


def next_version(current: str, taken: Any = ()) -> str:
    """The version after ``current`` not in ``taken``: its leading number plus one, ``.0``
    (``1.0`` -> ``2.0``, ``3`` -> ``4.0``, ``v2-beta`` -> ``v2-beta.1``)."""
    taken = {str(v) for v in taken}
    head = str(current).split(".", 1)[0]
    if head.isdigit():
        n = int(head) + 1
        while f"{n}.0" in taken:
            n += 1
        return f"{n}.0"
    i = 1
    while f"{current}.{i}" in taken:
        i += 1
    return f"{current}.{i}"


def log_info(msg: str) -> None:
    log.info("%s", msg)
