"""TorchServe 0.12 in its own virtual environment (``benchmarks/.work/tsvenv``).

torch is installed first and pinned (``torch==2.13.0``, the CPU build on this machine's
disk), so that torchserve's own requirements never pull another torch. Nothing is
installed when the environment already answers ``import ts, torch``.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

__all__ = ["ensure_torchserve", "TS_PACKAGES", "TORCH_PIN"]

TORCH_PIN = "torch==2.13.0"
# numpy and pillow: the benchmark's handlers use them (torch 2.13 does not pull numpy in)
TS_PACKAGES = ["torchserve==0.12.0", "torch-model-archiver==0.12.0", "pyyaml", "psutil", "packaging", "wheel",
               "numpy", "pillow"]


def _ok(venv: Path) -> bool:
    py = venv / "bin" / "python"
    if not (py.exists() and (venv / "bin" / "torchserve").exists()):
        return False
    probe = "import ts, torch, model_archiver, numpy, PIL; print(torch.__version__)"
    return subprocess.run([str(py), "-c", probe], capture_output=True).returncode == 0


def ensure_torchserve(venv: Path, log=print) -> Path:
    """Create/complete the venv; return its bin/ folder. Raises RuntimeError when it cannot."""
    if _ok(venv):
        return venv / "bin"
    t0 = time.monotonic()
    base = getattr(sys, "_base_executable", None) or sys.executable
    if not (venv / "bin" / "python").exists():
        log(f"creating {venv} with {base}")
        subprocess.run([base, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet"]
    for step in ([TORCH_PIN], [*TS_PACKAGES, TORCH_PIN]):
        log("pip install " + " ".join(step))
        proc = subprocess.run(pip + step, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"pip install {' '.join(step)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    if not _ok(venv):
        raise RuntimeError(f"{venv}: torchserve installed but `import ts, torch` fails")
    log(f"TorchServe ready in {venv} ({time.monotonic() - t0:.0f} s)")
    return venv / "bin"
