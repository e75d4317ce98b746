"""Shared pieces of the example builders: data splits, metrics, packaging, reference samples.

Every example writes, next to its archive ``DIR/<name>.mar``:

- ``DIR/<name>.metrics.json``: held-out metrics, the training entry point, and how it was trained;

and inside the archive, what later work (drift monitoring, retraining) needs:

- ``reference.npz``: a sample of training inputs (``inputs``, in the units a client sends,
  e.g. natural feature units or 0..16 pixel values), the model's outputs on them
  (``outputs``) and the targets (``targets``);
- ``training.json``: the training entry point (``module:function``: the example's
  ``retrain(ctx)``, see :mod:`server.retraining.training`) and its settings.
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import yaml

__all__ = ["Example", "ExampleResult", "seed_everything", "split", "fit", "predict", "classification_metrics",
           "regression_metrics", "package_example", "write_reference", "reference_sample", "MODEL_FILES"]

#: Python sources of the example networks, copied into archives as ``--model-file``.
MODEL_FILES = Path(__file__).resolve().parent / "networks"


@dataclass(frozen=True)
class Example:
    """One example: its name, model family, builder ``build(out_dir, work_dir) -> ExampleResult``."""

    name: str
    family: str
    handler: str
    build: Callable[[Path, Path], "ExampleResult"]


@dataclass
class ExampleResult:
    archive: Path
    metrics: dict[str, Any]
    extra: dict[str, Any] = field(default_factory=dict)


def seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def split(x: np.ndarray, y: np.ndarray, seed: int = 0, test_size: float = 0.2, stratify: bool = True):
    """A fixed train/held-out split (stratified for classification)."""
    from sklearn.model_selection import train_test_split

    return train_test_split(x, y, test_size=test_size, random_state=seed, stratify=y if stratify else None)


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray, average: str = "macro") -> dict[str, float]:
    from sklearn.metrics import accuracy_score, precision_recall_fscore_support

    p, r, f, _ = precision_recall_fscore_support(y_true, y_pred, average=average, zero_division=0)
    return {"accuracy": round(float(accuracy_score(y_true, y_pred)), 4), "precision": round(float(p), 4),
            "recall": round(float(r), 4), "f1": round(float(f), 4), "n_heldout": int(len(y_true)),
            "average": average}


def regression_metrics(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    err = np.asarray(y_pred, dtype=np.float64).reshape(-1) - np.asarray(y_true, dtype=np.float64).reshape(-1)
    return {"mse": round(float(np.mean(err ** 2)), 4), "mae": round(float(np.mean(np.abs(err))), 4),
            "n_heldout": int(len(err))}


def write_reference(work: Path, inputs: np.ndarray, outputs: np.ndarray, targets: np.ndarray | None = None,
                    limit: int = 500, seed: int = 0) -> Path:
    """``reference.npz``: up to ``limit`` training inputs, the model's outputs and the targets."""
    n = len(inputs)
    idx = np.sort(np.random.default_rng(seed).permutation(n)[:limit])
    arrays = {"inputs": np.asarray(inputs)[idx], "outputs": np.asarray(outputs)[idx]}
    if targets is not None:
        arrays["targets"] = np.asarray(targets)[idx]
    path = work / "reference.npz"
    np.savez_compressed(path, **arrays)
    return path


def reference_sample(inputs: np.ndarray, targets: np.ndarray, outputs: np.ndarray | None = None,
                     limit: int = 1000, seed: int = 0) -> dict[str, np.ndarray]:
    """Up to ``limit`` rows of a retraining's training data (inputs as clients send them, targets,
    the new model's outputs): a retrain entry point's ``"reference"``, the new version's
    reference.npz and drift reference."""
    n = len(inputs)
    idx = np.sort(np.random.default_rng(seed).permutation(n)[:limit])
    out = {"inputs": np.asarray(inputs)[idx], "targets": np.asarray(targets)[idx]}
    if outputs is not None:
        out["outputs"] = np.asarray(outputs)[idx]
    return out


def package_example(*, name: str, out: Path, work: Path, handler: str, serialized_file: Path | None,
                    model_file: Path | None = None, extra_files: list[Path] = (), config: dict | None = None,
                    metrics: dict, training: dict, version: str = "1.0") -> Path:
    """Write ``out/<name>.mar`` (with training.json) and ``out/<name>.metrics.json``."""
    from server.core.archive import write_archive

    extras = list(extra_files)
    training_path = work / "training.json"
    training_path.write_text(json.dumps({**training, "heldout_metrics": metrics}, indent=2))
    extras.append(training_path)
    config_path = None
    if config:
        config_path = work / "model-config.yaml"
        config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    if model_file is not None and model_file.parent != work:
        shutil.copy2(model_file, work / model_file.name)
        model_file = work / model_file.name
    archive = write_archive(model_name=name, version=version, handler=handler,
                            serialized_file=str(serialized_file) if serialized_file else None,
                            model_file=str(model_file) if model_file else None,
                            extra_files=[str(p) for p in extras], config_file=str(config_path) if config_path else None,
                            export_path=str(out), force=True)
    (out / f"{name}.metrics.json").write_text(json.dumps(
        {"model": name, "archive": archive.name, "heldout": metrics,
         "entry_point": training.get("entry_point"), "data": training.get("data")}, indent=2) + "\n")
    return archive


def fit(model: Any, inputs: tuple, target: Any, loss_fn: Callable, *, epochs: int, batch_size: int = 64,
        lr: float = 1e-3, weight_decay: float = 0.0, seed: int = 0,
        on_epoch: Callable[[int, int], Any] | None = None) -> Any:
    """Plain Adam minibatch training on in-memory tensors; returns the model in eval mode.
    ``on_epoch(done, epochs)`` is called after each epoch (a retraining job's progress).

    Runs on one thread: these models are small, and a second OpenMP thread only waits for a
    busy core (measured: 10x slower steps on a loaded 2-core machine).
    """
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _fit(model, inputs, target, loss_fn, epochs=epochs, batch_size=batch_size, lr=lr,
                    weight_decay=weight_decay, seed=seed, on_epoch=on_epoch)
    finally:
        torch.set_num_threads(threads)


def _fit(model: Any, inputs: tuple, target: Any, loss_fn: Callable, *, epochs: int, batch_size: int,
         lr: float, weight_decay: float, seed: int, on_epoch: Callable[[int, int], Any] | None = None) -> Any:
    import torch

    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    n = len(target) if target is not None else len(inputs[0])
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(n, generator=gen)
        for start in range(0, n, batch_size):
            idx = order[start:start + batch_size]
            opt.zero_grad()
            out = model(*(t[idx] for t in inputs))
            loss = loss_fn(out, target[idx] if target is not None else inputs[0][idx])
            loss.backward()
            opt.step()
        if on_epoch is not None:
            on_epoch(epoch + 1, epochs)
    return model.eval()


def predict(model: Any, *inputs: Any, batch_size: int = 512) -> Any:
    """The model's outputs on in-memory tensors, in batches, without gradients."""
    import torch

    outs = []
    n = len(inputs[0])
    with torch.inference_mode():
        for start in range(0, n, batch_size):
            outs.append(model(*(t[start:start + batch_size] for t in inputs)))
    return torch.cat(outs)
