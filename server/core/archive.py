"""Model archives: TorchServe ``.mar`` (zip), ``.tar.gz`` and unpacked folders.

Reading is safe: no member may escape the target folder (absolute paths, ``..``, links),
and the total extracted size and member count are capped. A bad archive raises
:class:`~server.errors.OspreyError` (BAD_INPUT) with a message naming what is wrong.
Writing produces archives that TorchServe 0.12 loads as well.

Extractions go under an :class:`ExtractionArea`: each server owns one folder there, marked
by a lock file it holds for its whole life, so folders left by a crash or SIGKILL are found
(their lock is free) and removed at the next start, while another live server's are kept.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import shutil
import stat
import tarfile
import tempfile
import threading
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

from server.core.errors import ErrorKind, OspreyError

try:
    import fcntl
except ImportError:  # pragma: no cover - not on Linux/macOS: no owner marks, no stale cleanup
    fcntl = None

__all__ = ["ModelArchive", "ExtractionArea", "open_archive", "write_archive", "extract_zip", "ARCHIVER_VERSION",
           "MANIFEST_PATH"]

log = logging.getLogger("osprey.archive")

MANIFEST_PATH = "MAR-INF/MANIFEST.json"
ARCHIVER_VERSION = "0.12.0"
MAX_MEMBERS = 100_000


def download_target_in_store(store: str | os.PathLike, url: str) -> str | None:
    """The file name an http(s) ``url`` would be downloaded as, when a file of that name is
    already in ``store``; else None. TorchServe, given such a URL, refuses a file already there
    with 500 "... already exists NAME" (a FileAlreadyExistsException answered as an internal
    error) before downloading anything: a quirk its own tests (re-registering by URL) expect,
    kept for models and workflows alike. Osprey downloads nothing either way."""
    name = re.split(r"[?#]", url, maxsplit=1)[0].rstrip().rsplit("/", 1)[-1]
    if not name or name in (".", ".."):
        return None
    try:
        return name if (Path(store) / name).exists() else None
    except (OSError, ValueError):
        return None


def _bad(source: str, why: str) -> OspreyError:
    return OspreyError(ErrorKind.BAD_INPUT, f"Invalid model archive {source}: {why}")


@dataclass
class ModelArchive:
    """An archive opened into a folder (``model_dir``) with its manifest and config."""

    source: str
    model_dir: Path
    manifest: dict[str, Any]
    config: dict[str, Any] = field(default_factory=dict)
    owns_dir: bool = False  # True when model_dir is a temporary extraction to delete
    extract_dir: Path | None = None  # the extraction folder (model_dir or its parent)
    # where the archive's requirements.txt was installed (install_py_dep_per_model), else None
    deps_dir: Path | None = None

    @property
    def model(self) -> dict[str, Any]:
        return self.manifest.get("model", {})

    @property
    def name(self) -> str:
        return self.model.get("modelName", "")

    @property
    def version(self) -> str:
        return str(self.model.get("modelVersion") or "1.0")

    @property
    def handler(self) -> str:
        return self.model.get("handler", "")

    @property
    def requirements_file(self) -> str:
        return self.model.get("requirementsFile") or ""

    def cleanup(self) -> None:
        if self.owns_dir:
            shutil.rmtree(self.extract_dir or self.model_dir, ignore_errors=True)


def _check_member(source: str, name: str) -> PurePosixPath:
    p = PurePosixPath(name.replace("\\", "/"))
    if p.is_absolute() or name.startswith(("/", "\\")) or (p.parts and ":" in p.parts[0]):
        raise _bad(source, f"member {name!r} has an absolute path")
    if ".." in p.parts:
        raise _bad(source, f"member {name!r} would escape the target folder")
    return p


def extract_zip(source: str, path: Path, dest: Path, max_size: int) -> None:
    """Extract the zip at ``path`` into ``dest`` safely (no member outside it, no links, at
    most ``max_size`` bytes); BAD_INPUT naming ``source`` and what is wrong."""
    _extract_zip(source, path, dest, max_size)


def _extract_zip(source: str, path: Path, dest: Path, max_size: int) -> None:
    try:
        zf = zipfile.ZipFile(path)
    except zipfile.BadZipFile as exc:
        raise _bad(source, f"not a readable zip file ({exc})") from None
    with zf:
        infos = zf.infolist()
        if len(infos) > MAX_MEMBERS:
            raise _bad(source, f"more than {MAX_MEMBERS} members")
        total = 0
        for info in infos:
            _check_member(source, info.filename)
            if stat.S_ISLNK(info.external_attr >> 16):
                raise _bad(source, f"member {info.filename!r} is a symbolic link")
            total += info.file_size
            if total > max_size:
                raise _bad(source, f"extracts to more than the {max_size} bytes allowed")
        written = 0
        for info in infos:
            target = dest / _check_member(source, info.filename)
            if info.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                with zf.open(info) as src, open(target, "wb") as out:
                    while chunk := src.read(1 << 20):
                        written += len(chunk)
                        if written > max_size:  # sizes in the header may lie
                            raise _bad(source, f"extracts to more than the {max_size} bytes allowed")
                        out.write(chunk)
            except (zipfile.BadZipFile, OSError, EOFError) as exc:
                raise _bad(source, f"member {info.filename!r} is corrupt ({exc})") from None


def _extract_tar(source: str, path: Path, dest: Path, max_size: int) -> None:
    try:
        tf = tarfile.open(path, "r:*")
    except (tarfile.TarError, OSError) as exc:
        raise _bad(source, f"not a readable tar.gz file ({exc})") from None
    with tf:
        total = 0
        members = []
        try:
            for m in tf:
                _check_member(source, m.name)
                if not (m.isfile() or m.isdir()):
                    raise _bad(source, f"member {m.name!r} is a link or special file")
                total += m.size
                if total > max_size:
                    raise _bad(source, f"extracts to more than the {max_size} bytes allowed")
                members.append(m)
                if len(members) > MAX_MEMBERS:
                    raise _bad(source, f"more than {MAX_MEMBERS} members")
            for m in members:
                target = dest / _check_member(source, m.name)
                if m.isdir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                src = tf.extractfile(m)
                with src, open(target, "wb") as out:
                    shutil.copyfileobj(src, out, 1 << 20)
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise _bad(source, f"corrupt tar data ({exc})") from None


def _find_root(dest: Path) -> Path | None:
    if (dest / MANIFEST_PATH).is_file():
        return dest
    subdirs = [p for p in dest.iterdir() if p.is_dir()]
    if len(subdirs) == 1 and (subdirs[0] / MANIFEST_PATH).is_file():
        return subdirs[0]  # tgz: name.tar.gz holds name/...
    return None


def _read_manifest(source: str, root: Path) -> dict[str, Any]:
    try:
        manifest = json.loads((root / MANIFEST_PATH).read_text("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _bad(source, f"{MANIFEST_PATH} is not valid JSON ({exc})") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("model"), dict):
        raise _bad(source, f'{MANIFEST_PATH} has no "model" object')
    model = manifest["model"]
    if not model.get("modelName"):
        raise _bad(source, f"{MANIFEST_PATH} names no modelName")
    if not model.get("handler"):
        raise _bad(source, f"{MANIFEST_PATH} names no handler")
    for key in ("serializedFile", "modelFile", "configFile", "requirementsFile"):
        name = model.get(key)
        if name:
            _check_member(source, name)
            if not (root / name).exists():
                raise _bad(source, f"{key} {name!r} named in the manifest is missing")
    return manifest


def _read_config(source: str, root: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    name = manifest["model"].get("configFile")
    if not name:
        return {}
    try:
        config = yaml.safe_load((root / name).read_text("utf-8")) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise _bad(source, f"{name} is not valid YAML ({exc})") from None
    if not isinstance(config, dict):
        raise _bad(source, f"{name} must be a mapping of settings")
    return config


def open_archive(path: str | os.PathLike, work_root: str | os.PathLike | None = None,
                 max_size: int = 4 * 1024**3) -> ModelArchive:
    """Open a .mar, .tar.gz/.tgz or folder archive; extract archives to a fresh folder."""
    path = Path(path)
    source = path.name
    if not path.exists():
        raise OspreyError(ErrorKind.NOT_FOUND, f"Model archive file not found: {path}")
    if path.is_dir():
        root = _find_root(path)
        if root is None:
            raise _bad(source, f"folder has no {MANIFEST_PATH}")
        manifest = _read_manifest(source, root)
        return ModelArchive(str(path), root, manifest, _read_config(source, root, manifest))
    if work_root is not None:
        Path(work_root).mkdir(parents=True, exist_ok=True)
    dest = Path(tempfile.mkdtemp(prefix="osprey-", dir=work_root))
    try:
        with open(path, "rb") as fh:
            magic = fh.read(4)
        if magic.startswith(b"PK"):
            _extract_zip(source, path, dest, max_size)
        elif magic[:2] == b"\x1f\x8b" or path.name.endswith((".tar", ".tar.gz", ".tgz")):
            _extract_tar(source, path, dest, max_size)
        else:
            raise _bad(source, "not a zip (.mar), tar.gz or folder archive")
        root = _find_root(dest)
        if root is None:
            raise _bad(source, f"has no {MANIFEST_PATH}")
        manifest = _read_manifest(source, root)
        config = _read_config(source, root, manifest)
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)
        raise
    return ModelArchive(str(path), root, manifest, config, owns_dir=True, extract_dir=dest)


class ExtractionArea:
    """``<root>/<owner>/`` holds one server's extractions while it holds ``<root>/<owner>.lock``.

    The kernel drops an ``flock`` when its process ends, however it ends, so a free lock
    means a dead owner: :meth:`clean_stale` removes that owner's folder and lock. A live
    server's lock is held, so two servers sharing a work dir never remove each other's
    folders (pid reuse and pid namespaces do not matter). The lock file is created under a
    temporary name, locked, then renamed, so no cleaner can see it unlocked.
    """

    _TMP = ".lock.tmp"

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self._dir: Path | None = None
        self._lock = None  # the open, flocked lock file
        self._mutex = threading.Lock()

    def folder(self) -> Path:
        """This server's folder (created, and its lock taken, on first use)."""
        with self._mutex:
            if self._dir is None:
                self.root.mkdir(parents=True, exist_ok=True)
                if fcntl is None:
                    self._dir = self.root
                    return self._dir
                owner = f"{os.getpid()}-{secrets.token_hex(4)}"
                tmp = self.root / f"{owner}{self._TMP}"
                fh = open(tmp, "wb")
                try:
                    fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    os.rename(tmp, self.root / f"{owner}.lock")
                    (self.root / owner).mkdir()
                except BaseException:
                    fh.close()
                    tmp.unlink(missing_ok=True)
                    raise
                self._lock, self._dir = fh, self.root / owner
            return self._dir

    def clean_stale(self) -> int:
        """Remove the folders of owners that are gone; the number removed."""
        if fcntl is None or not self.root.is_dir():
            return 0
        removed = 0
        own = self._dir.name if self._lock is not None else None
        for lock in self.root.glob("*.lock"):  # not *.lock.tmp: one may be about to be locked
            owner = lock.stem
            if owner == own:
                continue
            try:
                fh = open(lock, "rb")
            except OSError:
                continue  # gone already (another server cleaned it)
            with fh:
                try:
                    fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    continue  # held: its server is running
                folder = self.root / owner
                if folder.is_dir():
                    shutil.rmtree(folder, ignore_errors=True)
                    removed += 1
                lock.unlink(missing_ok=True)
        if removed:
            log.info("removed %d extraction folder(s) left by servers that are gone, under %s", removed, self.root)
        return removed

    def release(self) -> None:
        """At shutdown: remove this server's folder if it is empty, and its lock."""
        with self._mutex:
            if self._lock is None:
                return
            try:
                self._dir.rmdir()
            except OSError:
                pass  # still holds an extraction: the next start removes it
            else:
                (self.root / f"{self._dir.name}.lock").unlink(missing_ok=True)
            self._lock.close()
            self._lock, self._dir = None, None


def _copy_into(src: Path, dest_dir: Path) -> str:
    if not src.exists():
        raise FileNotFoundError(f"{src} does not exist")
    target = dest_dir / src.name
    if src.is_dir():
        shutil.copytree(src, target, dirs_exist_ok=True)
    else:
        shutil.copy2(src, target)
    return src.name


def write_archive(*, model_name: str, version: str = "1.0", handler: str,
                  serialized_file: str | None = None, model_file: str | None = None,
                  extra_files: list[str] | None = None, requirements_file: str | None = None,
                  config_file: str | None = None, export_path: str = ".",
                  archive_format: str = "default", force: bool = False, runtime: str = "python") -> Path:
    """Write an archive like torch-model-archiver 0.12 does; return its path. ``zip-store`` is its
    uncompressed .mar; ``runtime`` python or python3 (LSP, its C++ backend, is refused)."""
    if not model_name or any(c in model_name for c in "/\\") or model_name.startswith("."):
        raise ValueError(f"model name {model_name!r} must be a plain name")
    if archive_format not in ("default", "zip", "zip-store", "tgz", "no-archive"):
        raise ValueError(f"archive format {archive_format!r}: use default, zip-store, tgz or no-archive")
    if runtime not in ("python", "python3"):
        raise ValueError(f"runtime {runtime!r}: Osprey serves Python handlers (python or python3); LSP is "
                         "TorchServe's C++ backend, which Osprey does not run")
    export = Path(export_path)
    export.mkdir(parents=True, exist_ok=True)
    target = {"tgz": export / f"{model_name}.tar.gz", "no-archive": export / model_name}.get(
        archive_format, export / f"{model_name}.mar")
    if target.exists():
        if not force:
            raise FileExistsError(f"{target} already exists; use --force to overwrite it")
        shutil.rmtree(target) if target.is_dir() else target.unlink()

    with tempfile.TemporaryDirectory(prefix="osprey-pkg-") as tmp:
        staging = Path(tmp) / model_name
        staging.mkdir()
        model: dict[str, Any] = {"modelName": model_name}
        if serialized_file:
            model["serializedFile"] = _copy_into(Path(serialized_file), staging)
        handler_path, _, func = handler.partition(":")
        if Path(handler_path).is_file():
            model["handler"] = _copy_into(Path(handler_path), staging) + (f":{func}" if func else "")
        elif handler_path.endswith(".py"):
            raise FileNotFoundError(f"handler file {handler_path} does not exist")
        else:
            model["handler"] = handler  # a built-in handler name or module:function
        if model_file:
            model["modelFile"] = _copy_into(Path(model_file), staging)
        model["modelVersion"] = version
        for extra in extra_files or []:
            _copy_into(Path(extra), staging)
        if requirements_file:
            model["requirementsFile"] = _copy_into(Path(requirements_file), staging)
        if config_file:
            model["configFile"] = _copy_into(Path(config_file), staging)
        manifest = {
            "createdOn": time.strftime("%d/%m/%Y %H:%M:%S"),
            "runtime": runtime,
            "model": model,
            "archiverVersion": ARCHIVER_VERSION,
        }
        (staging / "MAR-INF").mkdir()
        (staging / MANIFEST_PATH).write_text(json.dumps(manifest, indent=2))

        if archive_format == "no-archive":
            shutil.copytree(staging, target)
        elif archive_format == "tgz":
            with tarfile.open(target, "w:gz") as tf:
                tf.add(staging, arcname=model_name)
        else:
            compression = zipfile.ZIP_STORED if archive_format == "zip-store" else zipfile.ZIP_DEFLATED
            with zipfile.ZipFile(target, "w", compression) as zf:
                for file in sorted(staging.rglob("*")):
                    if file.is_file():
                        zf.write(file, file.relative_to(staging).as_posix())
    return target
