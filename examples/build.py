"""``osprey examples``: train and package the example models, with a progress bar.

Each example has a builder ``build(out_dir, work_dir) -> ExampleResult`` in its module
(``examples/<name>.py``; the two tabular ones share ``examples/tabular.py``) and a training
entry point it names in its metrics; the table below lists them, with their families, in
build order. All data comes from packages installed with Osprey (scikit-learn's bundled data
sets, the MiniLM package, text generated here): nothing is downloaded.
"""

from __future__ import annotations

import importlib
import json
import sys
import tempfile
import time
from pathlib import Path

__all__ = ["EXAMPLES", "list_examples", "build_examples", "build_one"]

#: name -> ("module:builder", family), in build order; a builder is build(out_dir, work_dir) -> ExampleResult
EXAMPLES: dict[str, tuple[str, str]] = {
    "digits_cnn": ("examples.digits_cnn:build", "CNN image classifier (image_classifier)"),
    "digits_lstm": ("examples.digits_lstm:build", "RNN/LSTM sequence model (image_classifier)"),
    "text_transformer": ("examples.text_transformer:build", "Transformer text classifier (text_classifier)"),
    "minilm_embedding": ("examples.minilm_embedding:build", "Transformer sentence embedding (text_embedding)"),
    "cancer_mlp": ("examples.tabular:build_cancer", "MLP tabular classification (tabular)"),
    "diabetes_mlp": ("examples.tabular:build_diabetes", "MLP tabular regression (tabular)"),
    "digits_vae": ("examples.digits_vae:build", "VAE decoder / generator (generator)"),
    "digits_autoencoder": ("examples.digits_autoencoder:build", "Autoencoder anomaly detection (anomaly)"),
}


def list_examples() -> list[tuple[str, str]]:
    return [(name, family) for name, (_, family) in EXAMPLES.items()]


class Progress:
    """A one-line progress bar on stderr (plain lines when stderr is not a terminal)."""

    def __init__(self, total: int, width: int = 24):
        self.total, self.width, self.done = total, width, 0
        self.tty = sys.stderr.isatty()
        self.t0 = time.monotonic()

    def show(self, label: str, final: bool = False) -> None:
        filled = int(self.width * self.done / max(self.total, 1))
        line = f"[{'#' * filled}{'.' * (self.width - filled)}] {self.done}/{self.total} {label} ({time.monotonic() - self.t0:.1f} s)"
        if self.tty:
            sys.stderr.write("\r\x1b[2K" + line + ("\n" if final else ""))
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()


def build_one(name: str, out: Path) -> dict:
    """Build one example into ``out``; return its metrics."""
    module, _, func = EXAMPLES[name][0].partition(":")
    build = getattr(importlib.import_module(module), func)
    with tempfile.TemporaryDirectory(prefix=f"osprey-example-{name}-") as tmp:
        result = build(out, Path(tmp))
        add_profile(result.archive, Path(tmp) / "reference.npz", getattr(importlib.import_module(module),
                                                                           "reference_request", None))
    return result.metrics


def add_profile(archive: Path, reference: Path, to_request=None) -> None:
    """The archive's drift reference profile (osprey-profile.json), from its reference.npz
    inputs sent the way a client sends them (``to_request(row)``, else the row as JSON / text),
    so the example is monitored against its training data from its first request."""
    import numpy as np

    from server.profiling import profile_archive

    if not reference.exists():
        return
    with np.load(reference, allow_pickle=False) as data:
        inputs = data["inputs"]
    rows = []
    for i, row in enumerate(inputs):
        body = to_request(row) if to_request else (str(row) if row.dtype.kind in "US" else row.tolist())
        rows.append((f"reference.npz:inputs[{i}]", body))
    profile_archive(archive, rows, source="reference.npz: training inputs")


def build_examples(out_dir: str | Path, only: list[str] | None = None) -> int:
    """Train and package the examples (all, or ``only`` these) into ``out_dir``; exit code."""
    names = list(only) if only else list(EXAMPLES)
    unknown = [n for n in names if n not in EXAMPLES]
    if unknown:
        print(f"osprey examples: unknown example(s) {', '.join(unknown)}; known: {', '.join(EXAMPLES)}", file=sys.stderr)
        return 2
    import torch

    torch.set_num_threads(max(1, torch.get_num_threads()))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    bar = Progress(len(names))
    failed = []
    summary = {}
    for name in names:
        bar.show(f"training {name}")
        t0 = time.monotonic()
        try:
            metrics = build_one(name, out)
        except Exception as exc:  # report and go on with the others
            failed.append(name)
            print(f"\nosprey examples: {name} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
            bar.done += 1
            continue
        bar.done += 1
        summary[name] = {"seconds": round(time.monotonic() - t0, 1), **metrics}
        bar.show(f"{name} done", final=bar.done == bar.total)
    for name, info in summary.items():
        shown = {k: v for k, v in info.items() if k not in ("n_heldout", "average") and isinstance(v, (int, float))}
        print(f"{name:20s} {json.dumps(shown)}")
    print(f"archives in {out.resolve()}")
    return 1 if failed else 0
