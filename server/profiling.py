"""Reference profiles for archives: ``osprey profile`` and ``osprey package --reference-data``.

Reference data is a sample of requests as users send them, in one of four forms:

- a folder of files: each file is one request body (an image, a text, a JSON document);
- ``.jsonl``: one JSON request body per line;
- ``.csv``: one record per row, sent as a JSON object of ``{column: value}`` (numbers parsed);
- ``.npz``: tensors, one request per row of its ``inputs`` array (or of its only array),
  sent as a JSON list (strings as they are).

Each body runs through the archive's own handler, in this process, in batches (the same
code as a serving instance); the monitoring capture turns each batch into the features the
server will watch, and the profile (bins, frequencies, a projection basis, prediction
histograms, the held-out metrics from ``training.json``) goes into the archive as
``osprey-profile.json``. A body the handler rejects fails the command, naming the file and row.

Wiring (above the layers): it uses the instances (to run the handler) and the monitor's
profile builder.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import tarfile
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Iterator

__all__ = ["ReferenceError", "read_reference_data", "write_member", "PROFILE_NAME", "profile_archive"]

PROFILE_NAME = "osprey-profile.json"
MAX_ROWS = 20_000  # a reference sample: more rows than this are not needed for bins and a basis


class ReferenceError(Exception):
    """Reference data that cannot be used: the message names the file (and row)."""


def _number(text: str) -> Any:
    t = text.strip()
    if t == "":
        return None
    try:
        return int(t)
    except ValueError:
        pass
    try:
        return float(t)
    except ValueError:
        return text


def _rows(path: Path) -> Iterator[tuple[str, Any]]:
    """(where, body) for each request in ``path``: where names the file and row."""
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
        if not files:
            raise ReferenceError(f"{path}: the folder has no files")
        for f in files:
            yield str(f), f.read_bytes()
        return
    suffix = "".join(path.suffixes[-1:]).lower()
    if suffix == ".jsonl":
        with open(path, encoding="utf-8") as fh:
            for i, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    yield f"{path}:{i}", json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ReferenceError(f"{path}: line {i} is not JSON ({exc.msg})") from None
    elif suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            if not reader.fieldnames:
                raise ReferenceError(f"{path}: no header row")
            for i, rec in enumerate(reader, 2):
                if None in rec:
                    raise ReferenceError(f"{path}: row {i} has more values than the header has columns")
                yield f"{path}:{i}", {k: _number(v) for k, v in rec.items()}
    elif suffix == ".npz":
        import numpy as np

        try:
            data = np.load(path, allow_pickle=False)
        except (ValueError, OSError) as exc:
            raise ReferenceError(f"{path}: not a readable .npz ({exc})") from None
        names = list(data.files)
        key = "inputs" if "inputs" in names else (names[0] if len(names) == 1 else None)
        if key is None:
            raise ReferenceError(f"{path}: needs an 'inputs' array (or exactly one array), has {', '.join(names)}")
        arr = data[key]
        if arr.ndim == 0:
            raise ReferenceError(f"{path}: '{key}' is a scalar; one request per row is needed")
        for i in range(len(arr)):
            row = arr[i]
            yield f"{path}:{key}[{i}]", (str(row) if row.dtype.kind in "US" else row.tolist())
    else:
        raise ReferenceError(f"{path}: reference data must be a folder of files, .jsonl, .csv or .npz")


def read_reference_data(path: str | os.PathLike, limit: int = MAX_ROWS) -> list[tuple[str, Any]]:
    """Up to ``limit`` request bodies with where each came from: bytes (a file, sent as it is),
    text (sent as text/plain) or a JSON value (sent as application/json)."""
    path = Path(path)
    if not path.exists():
        raise ReferenceError(f"{path}: no such file or folder")
    out = []
    for where, body in _rows(path):
        out.append((where, body))
        if len(out) >= limit:
            break
    if not out:
        raise ReferenceError(f"{path}: holds no requests")
    return out


def write_member(archive: str | os.PathLike, name: str, data: bytes) -> None:
    """Put ``name`` (at the archive's root, beside MAR-INF) into a .mar/zip, .tar.gz or folder
    archive, replacing one of that name; the archive is rewritten beside itself and renamed,
    so a failure leaves the old one whole."""
    path = Path(archive)
    if path.is_dir():
        roots = [p.parent.parent for p in path.rglob("MAR-INF/MANIFEST.json")]
        root = min(roots, key=lambda p: len(p.parts)) if roots else path
        (root / name).write_bytes(data)
        return
    with open(path, "rb") as fh:
        magic = fh.read(4)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        if magic.startswith(b"PK"):
            with zipfile.ZipFile(path) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as dst:
                prefix = ""
                for info in src.infolist():
                    if info.filename.endswith("MAR-INF/MANIFEST.json"):
                        prefix = info.filename[: -len("MAR-INF/MANIFEST.json")]
                        break
                for info in src.infolist():
                    if info.filename != prefix + name:
                        dst.writestr(info, src.read(info.filename))
                dst.writestr(prefix + name, data)
        else:
            with tarfile.open(path, "r:*") as src, tarfile.open(tmp, "w:gz") as dst:
                members = src.getmembers()
                prefix = ""
                for m in members:
                    if m.name.endswith("MAR-INF/MANIFEST.json"):
                        prefix = m.name[: -len("MAR-INF/MANIFEST.json")]
                        break
                for m in members:
                    if m.name == prefix + name:
                        continue
                    dst.addfile(m, src.extractfile(m) if m.isfile() else None)
                info = tarfile.TarInfo(prefix + name)
                info.size = len(data)
                dst.addfile(info, io.BytesIO(data))
        shutil.copymode(path, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _archive_reference(model_dir: Path) -> list[tuple[str, Any]]:
    """The archive's own ``reference.npz`` as request bodies (JSON lists; strings as text)."""
    path = model_dir / "reference.npz"
    if not path.exists():
        raise ReferenceError("the archive has no reference.npz: give --reference-data PATH (a folder of files, "
                             ".jsonl, .csv or .npz of requests as clients send them)")
    return [(f"reference.npz:{where.rsplit(':', 1)[-1]}", body) for where, body in _rows(path)][:MAX_ROWS]


def profile_archive(archive: str | os.PathLike, reference: str | os.PathLike | list[tuple[str, Any]] | None = None,
                    batch_size: int = 64, source: str | None = None) -> dict:
    """Build the archive's reference profile and store it in the archive; returns the profile.

    ``reference``: a path (see the module doc), ``(where, body)`` pairs (a body as a client
    sends it: bytes, str, or JSON-able), or None for the archive's own ``reference.npz``.
    Raises :class:`ReferenceError` naming the file and row the handler refused, or why no
    profile can be built."""
    from monitoring.drift.profile import PROFILE_FILE, ProfileError, build_profile
    from monitoring.quality.metrics import load_baseline
    from server.core.archive import open_archive
    from server.core.errors import OspreyError
    from server.core.model_config import parse_model_config
    from server.instances.capture import run_reference

    assert PROFILE_FILE == PROFILE_NAME
    try:
        opened = open_archive(archive)
    except OspreyError as exc:
        raise ReferenceError(f"{archive}: {exc.message}") from None
    try:
        if reference is None:
            rows, source = _archive_reference(Path(opened.model_dir)), source or "reference.npz (in the archive)"
        elif isinstance(reference, (str, os.PathLike)):
            rows, source = read_reference_data(reference), source or str(reference)
        else:
            rows, source = list(reference), source or "reference requests"
        try:
            config = parse_model_config(opened.config)
        except OspreyError as exc:
            raise ReferenceError(f"{archive}: model-config.yaml: {exc.message}") from None
        try:
            run = run_reference(opened, [b for _, b in rows], config=config, names=[w for w, _ in rows],
                                batch_size=batch_size)
        except OspreyError as exc:
            raise ReferenceError(f"{archive}: the handler could not be loaded: {exc.message}") from None
        if run.errors:
            first = run.errors[0]
            more = f" (and {len(run.errors) - 1} more rows)" if len(run.errors) > 1 else ""
            raise ReferenceError(f"the handler refused {first.name}: {first.message}{more}")
        broken = [o.error for o in run.observations if o.error]
        if broken:
            raise ReferenceError(f"{archive}: the handler's monitoring hook failed: {broken[0]}")
        quality, _ = load_baseline(opened.model_dir)
        try:
            profile = build_profile(run.observations, config.monitoring, source, quality=quality or None)
        except ProfileError as exc:
            raise ReferenceError(f"{archive}: {exc}") from None
        profile["model"], profile["version"] = opened.name, opened.version
        write_member(archive, PROFILE_NAME, json.dumps(profile, indent=1).encode())
        return profile
    finally:
        opened.cleanup()
