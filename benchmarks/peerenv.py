"""The Python peers (MLServer, LitServe, Ray Serve, BentoML), each in its own virtual environment.

Each peer pins its own web stack (starlette, pydantic, grpcio, protobuf...), so none can share
Osprey's environment or another peer's. ``ensure_peer(name, venv)`` creates
``benchmarks/.work/peer-NAME`` the way ``tsenv.py`` creates TorchServe's: ``torch==2.13.0``
first (the same pin and the same index as TorchServe's venv, so no other torch, and never a CUDA
build, is pulled in by a peer's requirements), then the peer's pinned release with the
benchmark's own needs (numpy, Pillow) and the torch pin again. Nothing is installed when the
environment already answers its probe import.

    python -m benchmarks.peerenv [mlserver litserve rayserve bentoml]   # install ahead of a run
"""

from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .tsenv import TORCH_PIN

__all__ = ["PEERS", "Peer", "ensure_peer", "install_steps"]


@dataclass(frozen=True)
class Peer:
    name: str          # the system's name in the JSON and the report
    label: str         # how the report names it
    packages: tuple[str, ...]
    probe: str         # a module the environment must import
    version_of: str    # the distribution whose version the report prints


# The versions the filer measured (hey, 2 cores, tiny MLP, same batching): the newest
# release of each line on PyPI when this was written.
PEERS: dict[str, Peer] = {
    # MLServer 1.7.1 calls asyncio.get_event_loop() in its inference workers before any loop exists,
    # which uvloop 0.22 and later turn into an error (every worker dies at start): uvloop pinned below.
    "mlserver": Peer("mlserver", "MLServer 1.7", ("mlserver==1.7.1", "uvloop<0.22"), "mlserver", "mlserver"),
    # python-multipart: LitServe parses a multipart form with Starlette, which needs it (not a dependency)
    "litserve": Peer("litserve", "LitServe 0.2", ("litserve==0.2.19", "python-multipart==0.0.20"),
                     "litserve, python_multipart", "litserve"),
    "rayserve": Peer("rayserve", "Ray Serve 2.60", ("ray[serve]==2.60.0",), "ray.serve", "ray"),
    "bentoml": Peer("bentoml", "BentoML 1.4", ("bentoml==1.4.40",), "bentoml", "bentoml"),
}
# what every peer's server file imports besides the peer itself
COMMON = ("numpy", "pillow")


def install_steps(peer: Peer) -> list[list[str]]:
    """The pip install arguments, in order: torch alone first, then the peer with the torch pin kept."""
    return [[TORCH_PIN], [*peer.packages, *COMMON, TORCH_PIN]]


def _python(venv: Path) -> Path:
    return venv / "bin" / "python"


def _ok(venv: Path, peer: Peer) -> bool:
    py = _python(venv)
    if not py.exists():
        return False
    probe = f"import torch, numpy, PIL, {peer.probe}"
    return subprocess.run([str(py), "-c", probe], capture_output=True).returncode == 0


def installed_version(venv: Path, peer: Peer) -> str | None:
    code = f"import importlib.metadata as m; print(m.version({peer.version_of!r}))"
    proc = subprocess.run([str(_python(venv)), "-c", code], capture_output=True, text=True)
    return proc.stdout.strip() if proc.returncode == 0 else None


def ensure_peer(name: str, venv: Path, log=print) -> Path:
    """Create/complete the peer's venv; return its python. Raises RuntimeError when it cannot."""
    peer = PEERS[name]
    if _ok(venv, peer):
        return _python(venv)
    t0 = time.monotonic()
    base = getattr(sys, "_base_executable", None) or sys.executable
    if not _python(venv).exists():
        log(f"creating {venv} with {base}")
        subprocess.run([base, "-m", "venv", str(venv)], check=True)
    pip = [str(_python(venv)), "-m", "pip", "install", "--quiet"]
    for step in install_steps(peer):
        log(f"{name}: pip install " + " ".join(step))
        proc = subprocess.run(pip + step, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"pip install {' '.join(step)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    if not _ok(venv, peer):
        raise RuntimeError(f"{venv}: {' '.join(peer.packages)} installed but `import {peer.probe}, torch` fails")
    log(f"{peer.label} ready in {venv} ({time.monotonic() - t0:.0f} s)")
    return _python(venv)


def main(argv: list[str] | None = None) -> int:
    names = (argv if argv is not None else sys.argv[1:]) or list(PEERS)
    work = Path(__file__).resolve().parent / ".work"
    for name in names:
        if name not in PEERS:
            raise SystemExit(f"unknown peer {name!r}; known: {', '.join(PEERS)}")
        ensure_peer(name, work / f"peer-{name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
