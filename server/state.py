"""Where Osprey keeps its own files (setting ``state_dir``), and the URLs jobs call back.

The state folder holds the embedded queue's job records and every job's work folder
(``jobs/``, ``work/``) and the labelled production rows (``datasets/``). By default it is
``<model_store>/.osprey``, next to the archives (a retrained archive moves from its work
folder into the store with one rename). A model store can be read-only (KServe mounts
``/mnt/models`` so; TorchServe serves from one): then, unless ``state_dir`` names a folder,
``<workdir>/.osprey`` is used and one log line says so. Serving needs nothing more;
retraining, which publishes into the store, fails its jobs with a message naming the store.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from urllib.parse import urlsplit

__all__ = ["resolve_state_dir", "store_writable", "job_url"]

log = logging.getLogger("osprey.state")


def store_writable(folder: Path | str) -> OSError | None:
    """None when a file can be made in ``folder`` (tried, not guessed: permissions, read-only
    mounts and root all count), else the error."""
    try:
        fd, name = tempfile.mkstemp(prefix=".osprey-probe-", dir=folder)
    except OSError as exc:
        return exc
    os.close(fd)
    os.unlink(name)
    return None


def resolve_state_dir(settings):
    """``settings`` with ``state_dir`` set to the folder this process uses (see the module doc)."""
    if settings.state_dir:
        return settings.replace(state_dir=str(Path(settings.state_dir).resolve()))
    default = Path(settings.model_store).resolve() / ".osprey"
    try:
        default.mkdir(parents=True, exist_ok=True)
        problem = store_writable(default)
    except OSError as exc:
        problem = exc
    if problem is None:
        return settings.replace(state_dir=str(default))
    fallback = Path(settings.workdir).resolve() / ".osprey"
    log.warning("model store %s is not writable (%s): Osprey's files (retraining jobs, labelled rows) go to %s "
                "(setting state_dir); models are served as usual, retraining cannot publish into this store",
                settings.model_store, getattr(problem, "strerror", None) or problem, fallback)
    return settings.replace(state_dir=str(fallback))


def job_url(address: str, advertised_host: str = "") -> str:
    """A listen address as the URL a retraining job calls: ``advertised_host`` in place of the
    host when set, else the host, 0.0.0.0 / :: as loopback (a job on this machine)."""
    parts = urlsplit(address if "://" in address else f"http://{address}")
    host = advertised_host.strip("[]") or parts.hostname or "127.0.0.1"
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"{parts.scheme}://{host}:{parts.port}" if parts.port else f"{parts.scheme}://{host}"
