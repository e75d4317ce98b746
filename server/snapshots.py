"""TorchServe 0.12's config snapshots: what models a server had, kept across restarts.

With ``config_snapshots`` on (``osprey torchserve`` turns it on, as TorchServe has it; ``--ncs``
turns it off) the server writes, to ``<log_location, else LOG_LOCATION, else logs>/config/``:

- ``<yyyyMMddHHmmssSSS>-startup.cfg`` once it has loaded its startup models,
- ``<yyyyMMddHHmmssSSS>-snapshot.cfg`` after each management change that succeeded (register,
  unregister, scale, set-default; Osprey's rollback too), workflows' own models left out,
- ``<yyyyMMddHHmmssSSS>-shutdown.cfg`` when it stops, before its models are unloaded.

Each is a Java ``.properties`` file as TorchServe writes it: the configuration the server was
given (its config file's keys, ``tsConfigFile`` naming that file, and what the command line set:
``model_store``, ``enable_model_api``, ...; never what came from the environment, where keys
may live) and ``model_snapshot``, a JSON document
``{"name", "modelCount", "created", "models": {name: {version: {"defaultVersion", "marName",
"minWorkers", "maxWorkers", "batchSize", "maxBatchDelay", "responseTimeout", "startupTimeout",
"runtimeType"}}}}``. TorchServe reads Osprey's snapshots and Osprey reads TorchServe's.

A start without a config file (no ``--ts-config``, no ``TS_CONFIG_FILE``) takes the newest
snapshot there (by the time in its name) as its configuration and registers its models, each
version with its workers and settings, its default version the default again; as in TorchServe,
``--models`` and ``load_models`` are then not loaded (a log line says so). A snapshot naming an
archive that is no longer in the model store refuses the start (TorchServe's rule), naming it.

A file is written whole under a temporary name and renamed into place, so a reader never sees
half of one. It is written on the event loop before the change is answered (TorchServe's
harness reads logs/config right after the answer), on management changes only, never on an
inference request: measured on the 2-core development machine under a load average of 9, about
1 ms for 2 model versions (0.9 kB), 3 ms for 40 (13 kB), 13 ms for 200 (64 kB), most of it
javaproperties' escaping of the JSON.
It never fails the change it records: a folder that cannot be written is logged once (and again
only after a snapshot was written in between); TorchServe logs "Error while saving snapshot"
and answers the call as usual too.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Iterable, Mapping

import javaproperties
import orjson

from server.protocols.management import worker_settings

__all__ = ["snapshot_dir", "last_snapshot", "read_snapshot", "missing_archives", "given_properties",
           "SnapshotModel", "Snapshot", "SnapshotWriter", "restore_models", "MODEL_SNAPSHOT"]

log = logging.getLogger("osprey.snapshots")

MODEL_SNAPSHOT = "model_snapshot"  # TorchServe's key for the models' JSON
TS_CONFIG_FILE = "tsConfigFile"  # TorchServe's key naming the file the configuration came from
COMMENT = "Saving snapshot"  # TorchServe's first line
_NAME = re.compile(r"(\d{17})-[^/]*")  # yyyyMMddHHmmssSSS-<kind>.cfg


def snapshot_dir(settings) -> Path:
    """Where snapshots go: TorchServe's ``$LOG_LOCATION/config`` (``logs/config`` without it);
    settings.log_location already holds LOG_LOCATION when set (server.settings)."""
    return Path(settings.log_location or "logs") / "config"


def _stamp(ms: int) -> str:
    t = datetime.fromtimestamp(ms / 1000)  # local time, as TorchServe's SimpleDateFormat
    return t.strftime("%Y%m%d%H%M%S") + f"{ms % 1000:03d}"


def _time_of(name: str) -> datetime | None:
    m = _NAME.fullmatch(name)
    if m is None:
        return None
    try:
        return datetime.strptime(m.group(1)[:14], "%Y%m%d%H%M%S").replace(microsecond=int(m.group(1)[14:]) * 1000)
    except ValueError:
        return None


def last_snapshot(folder: Path) -> Path | None:
    """The newest snapshot in ``folder`` by the time in its name (TorchServe's choice: startup,
    snapshot and shutdown alike), or None. Files whose names hold no time are not snapshots."""
    try:
        entries = list(os.scandir(folder))
    except OSError:  # none there, or not readable: TorchServe starts without one too
        return None
    dated = [(t, e.name) for e in entries if e.is_file() and (t := _time_of(e.name)) is not None]
    return folder / max(dated)[1] if dated else None


@dataclass(frozen=True)
class SnapshotModel:
    """One model version of a snapshot, in TorchServe's units (ms for the delay, s for timeouts)."""
    name: str
    version: str
    default: bool
    mar_name: str
    min_workers: int
    max_workers: int
    batch_size: int
    max_batch_delay: float
    response_timeout: float | None
    startup_timeout: float | None


@dataclass(frozen=True)
class Snapshot:
    path: Path
    properties: dict[str, str]  # the configuration, model_snapshot left out, tsConfigFile = path
    models: list[SnapshotModel]


def _field(where: str, info: Mapping[str, Any], key: str, kind: type, default: Any = None) -> Any:
    value = info.get(key, default)
    if value is None and default is None and kind is not bool:
        return None
    if kind is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{where}: {key} must be true or false, got {value!r}")
        return value
    if kind is str:
        if not isinstance(value, str) or not value:
            raise ValueError(f"{where}: {key} must be a non-empty string, got {value!r}")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{where}: {key} must be a number, got {value!r}")
    return kind(value)


def read_snapshot(path: Path) -> Snapshot:
    """Read a snapshot TorchServe or Osprey wrote; ValueError naming the file and what is wrong."""
    try:
        with open(path, encoding="latin-1") as f:  # Java's Properties.load reads ISO 8859-1 (\\uXXXX escapes)
            props = dict(javaproperties.load(f))
    except (OSError, ValueError) as exc:
        raise ValueError(f"config snapshot {path} cannot be read: {exc}") from None
    models: list[SnapshotModel] = []
    text = props.pop(MODEL_SNAPSHOT, None)
    if text is not None:
        try:
            doc = json.loads(text)
        except ValueError as exc:
            raise ValueError(f"config snapshot {path}: {MODEL_SNAPSHOT} is not JSON ({exc})") from None
        entries = doc.get("models") if isinstance(doc, dict) else None
        if not isinstance(entries, dict):
            raise ValueError(f"config snapshot {path}: {MODEL_SNAPSHOT} has no \"models\" object")
        for name, versions in entries.items():
            if not isinstance(versions, dict):
                raise ValueError(f"config snapshot {path}: model {name!r} must map versions to their settings")
            for version, info in versions.items():
                where = f"config snapshot {path}, model {name} version {version}"
                if not isinstance(info, dict):
                    raise ValueError(f"{where}: must be a JSON object")
                models.append(SnapshotModel(
                    name, str(version), _field(where, info, "defaultVersion", bool, False),
                    _field(where, info, "marName", str), _field(where, info, "minWorkers", int, 0),
                    _field(where, info, "maxWorkers", int, 0), _field(where, info, "batchSize", int, 1),
                    _field(where, info, "maxBatchDelay", float, 100), _field(where, info, "responseTimeout", float),
                    _field(where, info, "startupTimeout", float)))
    props[TS_CONFIG_FILE] = str(path)  # as TorchServe: the configuration came from this file
    return Snapshot(path, props, models)


def _archive_path(model_store: str, mar_name: str) -> Path:
    return Path(mar_name[7:]) if mar_name.lower().startswith("file://") else Path(model_store) / mar_name


def missing_archives(snapshot: Snapshot, model_store: str) -> list[SnapshotModel]:
    """The model versions whose archive is not there (TorchServe refuses the start then)."""
    return [m for m in snapshot.models if not _archive_path(model_store, m.mar_name).exists()]


def given_properties(config: Mapping[str, str], overrides: Mapping[str, Any],
                     config_file: str | None = None) -> dict[str, str]:
    """The configuration a snapshot records: the config file's keys, ``tsConfigFile`` naming it,
    and the settings the command line gave (TorchServe's model_store, enable_model_api, ...)."""
    props = {k: v for k, v in config.items() if k != MODEL_SNAPSHOT}
    if config_file:
        props[TS_CONFIG_FILE] = str(config_file)
    for key, value in overrides.items():
        if value is None:
            continue
        if isinstance(value, (list, tuple)):
            value = ",".join(map(str, value))
        props[key] = ("true" if value else "false") if isinstance(value, bool) else str(value)
    return props


def model_state(registry) -> dict[str, dict[str, dict[str, Any]]]:
    """TorchServe's Model.getModelState for every version of every model (workflow nodes left
    out, as TorchServe leaves them out)."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for name, model in list(registry.models.items()):
        versions: dict[str, dict[str, Any]] = {}
        for version, mv in list(model.versions.items()):
            if mv.workflow is not None:
                continue
            versions[version] = {
                "defaultVersion": version == model.default,
                "marName": mv.url,
                **worker_settings(mv.config),
                "runtimeType": mv.archive.manifest.get("runtime", "python"),
            }
        if versions:
            out[name] = versions
    return out


class SnapshotWriter:
    """Writes the snapshots of one server. :meth:`changed` is the registry's ``on_change``; it
    writes only between :meth:`start` (the startup snapshot, after the startup models loaded)
    and :meth:`stop` (the shutdown snapshot)."""

    def __init__(self, folder: Path, properties: Mapping[str, str], registry):
        self.folder = Path(folder)
        self.properties = dict(properties)
        self.registry = registry
        self.active = False
        self.written: list[Path] = []  # newest last (the tests read it)
        self._failing = False
        self._last_ms = 0

    def start(self) -> Path | None:
        self.active = True
        return self.write("startup")

    def changed(self) -> None:
        if self.active:
            self.write("snapshot")

    def stop(self) -> Path | None:
        if not self.active:
            return None
        path = self.write("shutdown")
        self.active = False
        return path

    def _name(self, kind: str) -> tuple[str, int]:
        # one name per millisecond, later than the last one: TorchServe drops a second snapshot
        # within the same millisecond ("already exists"); here it takes the next millisecond, so
        # the newest file always holds the latest state
        ms = max(int(time.time() * 1000), self._last_ms + 1)
        while (self.folder / f"{_stamp(ms)}-{kind}.cfg").exists():
            ms += 1
        self._last_ms = ms
        return f"{_stamp(ms)}-{kind}.cfg", ms

    def write(self, kind: str) -> Path | None:
        """Write one snapshot; None (logged) when it could not be written."""
        try:
            models = model_state(self.registry)
            self.folder.mkdir(parents=True, exist_ok=True)
            name, ms = self._name(kind)
            doc = {"name": name, "modelCount": sum(len(v) for v in models.values()), "created": ms, "models": models}
            # Gson's pretty printing, as TorchServe writes it (orjson: the stdlib's indenting encoder is pure Python)
            props = {**self.properties, MODEL_SNAPSHOT: orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode()}
            text = javaproperties.dumps(props, comments=COMMENT, timestamp=ms / 1000)
            path = self.folder / name
            fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=self.folder)
            try:
                with os.fdopen(fd, "w", encoding="latin-1") as f:  # javaproperties escapes the rest as \\uXXXX
                    f.write(text)
                os.replace(tmp, path)
            except BaseException:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass
                raise
        except OSError as exc:
            if not self._failing:
                log.error("config snapshot (%s) not written to %s: %s; the server goes on without it (this is "
                          "logged once until a snapshot is written again; --ncs / config_snapshots=false "
                          "turns snapshots off)", kind, self.folder, exc.strerror or exc)
            else:
                log.debug("config snapshot (%s) not written to %s: %s", kind, self.folder, exc)
            self._failing = True
            return None
        if self._failing:
            log.info("config snapshots are written to %s again", self.folder)
            self._failing = False
        self.written.append(path)
        log.info("config snapshot written: %s", path)
        return path


async def restore_models(registry, snapshot: Snapshot) -> tuple[int, int]:
    """Register the model versions of ``snapshot``: each with its workers and settings, the
    default version of each model first (so it is the default, even with no workers). A version
    that fails is logged and the others go on. Returns (loaded, listed)."""
    import asyncio

    log.info("Started restoring models from snapshot %s", snapshot.path)

    async def one_model(versions: Iterable[SnapshotModel]) -> int:
        done = 0
        for m in sorted(versions, key=lambda m: not m.default):
            try:
                mv = await registry.register(m.mar_name, model_name=m.name, batch_size=m.batch_size,
                                             max_batch_delay=m.max_batch_delay, initial_workers=m.min_workers,
                                             response_timeout=m.response_timeout,
                                             startup_timeout=m.startup_timeout or None)
                # the maximum as it was (register makes it at least the archive's maxWorkers)
                await registry.scale(mv.name, mv.version, m.min_workers, max(m.max_workers, m.min_workers))
                done += 1
            except Exception as exc:
                message = getattr(exc, "message", None) or f"{type(exc).__name__}: {exc}"
                log.error("model %s version %s (%s) from snapshot %s not restored: %s", m.name, m.version,
                          m.mar_name, snapshot.path.name, message)
        return done

    by_model: dict[str, list[SnapshotModel]] = {}
    for m in snapshot.models:
        by_model.setdefault(m.name, []).append(m)
    if not by_model:
        log.warning("Model snapshot is empty. Starting without initial models.")  # TorchServe's words
        return 0, 0
    loaded = await asyncio.gather(*(one_model(v) for v in by_model.values()))
    return sum(loaded), len(snapshot.models)
