"""TorchServe's ``models`` property: settings per model version for the models loaded at start.

config.properties may hold ``models={"NAME": {"VERSION": {"minWorkers": 2, "batchSize": 4, ...}}}``.
TorchServe applies it to the models it loads at start (``load_models`` / ``--models``), over the
archive's model-config.yaml; Osprey does the same with the keys below (others, such as
``marName``, ``deviceType`` or ``parallelType``, say nothing a start here can use: logged once).
A version not listed takes the model's only entry when it has one.
"""

from __future__ import annotations

import json
import logging
import tarfile
import zipfile
from pathlib import Path
from typing import Any

__all__ = ["parse_models", "archive_identity", "overrides_for", "register_kwargs", "KEYS"]

log = logging.getLogger("osprey.models")

#: the keys applied, and their types
KEYS = {"minWorkers": int, "maxWorkers": int, "batchSize": int, "maxBatchDelay": float, "responseTimeout": float,
        "startupTimeout": float}
_MANIFEST = "MAR-INF/MANIFEST.json"


def parse_models(text: str) -> dict[str, dict[str, dict[str, Any]]]:
    """The ``models`` property as {name: {version: {key: value}}}; ValueError naming what is wrong."""
    try:
        doc = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"setting models is not JSON ({exc}); TorchServe's form is "
                         '{"NAME": {"VERSION": {"minWorkers": 1, "batchSize": 4, ...}}}') from None
    if not isinstance(doc, dict):
        raise ValueError(f"setting models must be a JSON object of models, got {type(doc).__name__}")
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for name, versions in doc.items():
        if not isinstance(versions, dict) or not versions:
            raise ValueError(f"setting models: model {name!r} must map its versions to their settings")
        for version, info in versions.items():
            where = f"setting models: model {name!r} version {version!r}"
            if not isinstance(info, dict):
                raise ValueError(f"{where} must be a JSON object")
            entry = {}
            for key, value in info.items():
                kind = KEYS.get(key)
                if kind is None:
                    _ignored(key)
                    continue
                if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or \
                        (kind is int and value != int(value)):
                    raise ValueError(f"{where}: {key} must be a non-negative {'whole ' if kind is int else ''}"
                                     f"number, got {value!r}")
                entry[key] = kind(value)
            out.setdefault(str(name), {})[str(version)] = entry
    return out


_SAID: set[str] = set()


def _ignored(key: str) -> None:
    if key not in _SAID:
        _SAID.add(key)
        log.info("setting models: key %s is not used here (the keys used: %s)", key, ", ".join(KEYS))


def archive_identity(path: Path) -> tuple[str | None, str | None]:
    """(modelName, modelVersion) from an archive's manifest without extracting it (a .mar, a
    .tar.gz or a folder); (None, None) when it has no readable manifest."""
    try:
        if path.is_dir():
            manifest = json.loads((path / _MANIFEST).read_text("utf-8"))
        elif zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                manifest = json.loads(z.read(_MANIFEST))
        elif tarfile.is_tarfile(path):
            with tarfile.open(path) as t:
                member = next((m for m in t.getmembers() if m.isfile() and m.name.endswith(_MANIFEST)), None)
                handle = t.extractfile(member) if member is not None else None
                if handle is None:
                    return None, None
                manifest = json.loads(handle.read())
        else:
            return None, None
        model = manifest.get("model") or {}
        return model.get("modelName"), (str(model["modelVersion"]) if model.get("modelVersion") else None)
    except (OSError, KeyError, ValueError, zipfile.BadZipFile, tarfile.TarError, AttributeError):
        return None, None


def overrides_for(table: dict[str, dict[str, dict[str, Any]]], name: str | None,
                  version: str | None) -> dict[str, Any] | None:
    versions = table.get(name or "")
    if not versions:
        return None
    if version is not None and version in versions:
        return versions[version]
    return next(iter(versions.values())) if len(versions) == 1 else None


def register_kwargs(entry: dict[str, Any]) -> dict[str, Any]:
    """Registry.register's arguments for an entry (TorchServe's units: ms delay, s timeouts)."""
    names = {"batchSize": "batch_size", "maxBatchDelay": "max_batch_delay", "minWorkers": "initial_workers",
             "responseTimeout": "response_timeout", "startupTimeout": "startup_timeout"}
    return {names[k]: v for k, v in entry.items() if k in names}
