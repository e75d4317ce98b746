"""Keeps a copy of Osprey's management key in a file of its own, for Alertmanager.

Osprey writes its keys to ``key_file.json`` (JSON, mode 0600) when it starts and again when a
key is rotated with ``/token``. Alertmanager's webhook sends a bearer token read from a file
that holds the token alone (``http_config.authorization.credentials_file``), and reads it on
each notification. This copies the management key into such a file whenever the key file
changes, so alerts keep reaching ``/alerts`` across Osprey restarts and key rotations.

    python management_token.py KEY_FILE OUT [--interval SECONDS]

The copy is written atomically and readable by other users (Alertmanager's image runs as
``nobody``); the key file, with the API key that makes new keys, stays 0600. deploy/compose.yaml
writes the copy next to the key file, on the volume Alertmanager mounts read-only.
It runs until SIGTERM; it is standard library only, so any Python image can run it.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path


class Stopped(Exception):
    """Raised by the SIGTERM/SIGINT handler to end the loop wherever it is.

    The handler raises rather than setting a threading.Event: Event.set takes the event's lock,
    which the main thread may already hold inside Event.wait when the signal is handled there,
    and then the process never exits."""


def management_key(key_file: Path) -> str:
    """The management key in Osprey's key file; ValueError naming what is wrong."""
    try:
        data = json.loads(key_file.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{key_file} is not JSON: {exc}") from None
    key = data.get("management", {}).get("key") if isinstance(data, dict) else None
    if not isinstance(key, str) or not key:
        raise ValueError(f"{key_file} has no management key (expected {{\"management\": {{\"key\": ...}}}})")
    return key


def write_token(out: Path, token: str) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    with os.fdopen(fd, "w") as fh:
        fh.write(token)
    os.chmod(tmp, 0o644)  # whatever the umask
    os.replace(tmp, out)


def _stamp(path: Path):
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


def run(key_file: Path, out: Path, interval: float) -> None:
    """Copies the management key whenever the key file changes; returns only by an exception."""
    seen, problem = None, None
    while True:
        stamp = _stamp(key_file)
        if stamp is None:
            message = f"waiting for {key_file} (Osprey writes it when it starts)"
        elif stamp != seen:
            try:
                write_token(out, management_key(key_file))
                print(f"management key from {key_file} copied to {out}", flush=True)
                seen, message = stamp, None
            except (OSError, ValueError) as exc:
                message = str(exc)
        else:
            message = None
        if message and message != problem:
            print(message, file=sys.stderr, flush=True)
        problem = message
        time.sleep(interval)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("key_file", type=Path, help="Osprey's key file (its key_file setting)")
    parser.add_argument("out", type=Path, help="where the management key is kept")
    parser.add_argument("--interval", type=float, default=2.0, help="seconds between checks (default 2)")
    args = parser.parse_args(argv)
    if args.interval <= 0:
        parser.error(f"--interval must be a positive number of seconds, got {args.interval}")
    def stop(signum, frame):
        raise Stopped()
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        run(args.key_file, args.out, args.interval)
    except Stopped:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
