"""Training entry points (``retrain(ctx)``) for the retraining loop tests, on ``cancer_mlp``.

Named in a test archive's model-config.yaml (``retraining: entry_point: tests.retraining_entries:NAME``)
and run by the real pipeline in a job's process. Settings come through the retraining
section's ``hyperparameters``:

- ``dir``: a folder of the test's; each call appends one JSON line to ``{dir}/runs.jsonl``
  (pid, time) and writes ``{dir}/pid-{n}`` (n = the call's number, from 1);
- ``gate``: a file the call waits for before it trains (the test creates it); a cancel
  (SIGTERM, then SIGKILL) ends the wait.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path


def _mark(ctx) -> int:
    d = Path(ctx.hyperparameters["dir"])
    d.mkdir(parents=True, exist_ok=True)
    runs = d / "runs.jsonl"
    n = (len(runs.read_text().splitlines()) if runs.exists() else 0) + 1
    with open(runs, "a") as fh:
        fh.write(json.dumps({"n": n, "pid": os.getpid(), "ts": time.time()}) + "\n")
    (d / f"pid-{n}").write_text(str(os.getpid()))
    return n


def raises(ctx) -> dict:
    """The entry point fails: its traceback must reach the job's log."""
    raise RuntimeError("the feature store is gone (raised on purpose by the test)")


def bad_weights(ctx) -> dict:
    """Weights the handler cannot load (bytes that are no torch file)."""
    path = ctx.out_dir / "cancer_mlp.pt"
    path.write_bytes(b"these bytes are not a torch state_dict\n" * 8)
    return {"weights": path}


def held(ctx) -> dict:
    """Waits for the gate file (if any), then retrains cancer_mlp for real."""
    from examples.tabular import retrain_cancer

    _mark(ctx)
    gate = ctx.hyperparameters.get("gate")
    if gate:
        ctx.log(f"waiting for the gate file {gate}")
        while not os.path.exists(gate):
            time.sleep(0.02)
    return retrain_cancer(ctx)


def flipped(ctx) -> dict:
    """The champion with its last layer negated: it answers the other class, so a client can
    tell which version answered (and the gate, told to accept anything, lets it through)."""
    import torch

    _mark(ctx)
    state = torch.load(ctx.archive_dir / ctx.manifest["model"]["serializedFile"], map_location="cpu")
    last = sorted(k for k in state if k.endswith(".weight"))[-1].rsplit(".", 1)[0]
    state[f"{last}.weight"] = -state[f"{last}.weight"]
    state[f"{last}.bias"] = -state[f"{last}.bias"]
    path = ctx.out_dir / "cancer_mlp.pt"
    torch.save(state, path)
    return {"weights": path}
