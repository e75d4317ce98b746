"""``cancer_mlp`` and ``diabetes_mlp``: MLPs on scikit-learn's tabular data, served by ``tabular``.

Clients send features by name in their natural units (``load_diabetes(scaled=False)``);
standardization (and, for regression, the target's scale) lives in the archive's
``features.json``. ``cancer_mlp`` is an eager state_dict; ``diabetes_mlp`` a ``torch.export``
program (``.pt2``) with a dynamic batch dimension of at most ``MAX_RECORDS``, declared to the
handler as ``handler.max_examples`` (more records per request are a 400; a batch holding more
runs in chunks).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .common import (ExampleResult, classification_metrics, fit, package_example, predict, reference_sample,
                     regression_metrics, seed_everything, split, write_reference)
from .networks import cancer_mlp as cancer_net
from .networks import diabetes_mlp as diabetes_net

__all__ = ["CANCER", "DIABETES", "train_cancer", "train_diabetes", "retrain_cancer", "retrain_diabetes",
           "build_cancer", "build_diabetes"]

SEED = 0
CANCER = "cancer_mlp"
DIABETES = "diabetes_mlp"
MAX_RECORDS = 4096  # the exported program's largest batch


def _standardize(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean = x.mean(0)
    scale = x.std(0)
    scale[scale == 0] = 1.0
    return mean.astype(np.float32), scale.astype(np.float32)


def _sample(out: Path, name: str, features: list[str], rows: np.ndarray) -> None:
    (out / "samples").mkdir(parents=True, exist_ok=True)
    records = [{f: round(float(v), 6) for f, v in zip(features, row)} for row in rows]
    (out / "samples" / f"{name}_record.json").write_text(json.dumps(records[0], indent=1))
    (out / "samples" / f"{name}_records.json").write_text(json.dumps(records))


def train_cancer(x: np.ndarray, y: np.ndarray, *, seed: int = SEED, epochs: int = 60):
    """Training entry point: standardized features (N x 30) and labels -> a CancerMLP."""
    import torch

    seed_everything(seed)
    return fit(cancer_net.CancerMLP(), (torch.from_numpy(x).float(),), torch.from_numpy(y).long(),
               torch.nn.functional.cross_entropy, epochs=epochs, batch_size=32, lr=1e-3, weight_decay=1e-4, seed=seed)


def train_diabetes(x: np.ndarray, y: np.ndarray, *, seed: int = SEED, epochs: int = 20):
    """Training entry point: standardized features (N x 10) and standardized target -> a DiabetesMLP."""
    import torch

    seed_everything(seed)
    return fit(diabetes_net.DiabetesMLP(), (torch.from_numpy(x).float(),), torch.from_numpy(y).float().reshape(-1, 1),
               torch.nn.functional.mse_loss, epochs=epochs, batch_size=32, lr=1e-3, weight_decay=1e-2, seed=seed)


def _retraining_data(ctx) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict]:
    """(natural-unit inputs, targets, standardized inputs, row-weighted index, features.json)
    of the archive's reference rows plus the labelled production rows (decoded and
    standardized by the archive's own handler: ``ctx.dataset``). The archive's features.json
    (mean, scale) is kept, so the new weights fit its handler as they are."""
    spec = json.loads((ctx.archive_dir / "features.json").read_text())
    mean, scale = np.asarray(spec["mean"], np.float32), np.asarray(spec["scale"], np.float32)
    x = np.asarray(ctx.reference["inputs"], np.float32)
    y = np.asarray(ctx.reference["targets"])
    n_ref = len(x)
    if ctx.rows:
        xs, ys = ctx.dataset(ctx.rows)  # standardized features, labels (class indices or values)
        x = np.concatenate([x, xs.numpy() * scale + mean])
        y = np.concatenate([y, ys.numpy().reshape(-1).astype(y.dtype)])
    weight = max(1, int(ctx.hyperparameters.get("row_weight", 2)))
    repeat = np.concatenate([np.arange(n_ref)] + [np.arange(n_ref, len(x))] * weight)
    ctx.log(f"{ctx.manifest['model']['modelName']}: training on {n_ref} reference rows and {len(x) - n_ref} "
            f"production rows (x{weight})")
    return x, y, (x - mean) / scale, repeat, spec


def retrain_cancer(ctx) -> dict:
    """Retraining entry point (``server.retraining.training``) of ``cancer_mlp``: a fresh
    CancerMLP on the reference rows plus the production rows (``row_weight`` times each);
    hyperparameters ``epochs`` (60), ``lr`` (1e-3), ``weight_decay`` (1e-4), ``row_weight`` (2).
    Writes a state_dict (the archive's model file is kept)."""
    import torch

    hp = ctx.hyperparameters
    x, y, xs, repeat, _ = _retraining_data(ctx)
    epochs, seed = int(hp.get("epochs", 60)), int(hp.get("seed", ctx.seed))
    seed_everything(seed)
    model = fit(cancer_net.CancerMLP(), (torch.from_numpy(xs[repeat]).float(),), torch.from_numpy(y[repeat]).long(),
                torch.nn.functional.cross_entropy, epochs=epochs, batch_size=32, lr=float(hp.get("lr", 1e-3)),
                weight_decay=float(hp.get("weight_decay", 1e-4)), seed=seed,
                on_epoch=lambda done, total: ctx.progress(done / total, f"epoch {done}/{total}"))
    path = ctx.out_dir / "cancer_mlp.pt"
    torch.save(model.state_dict(), path)
    probs = torch.softmax(predict(model, torch.from_numpy(xs).float()), 1).numpy()
    return {"weights": path, "reference": reference_sample(x, y, probs, seed=seed)}


def retrain_diabetes(ctx) -> dict:
    """Retraining entry point of ``diabetes_mlp``: a fresh DiabetesMLP on the reference rows
    plus the production rows, the target standardized with features.json's ``target``;
    hyperparameters ``epochs`` (20), ``lr`` (1e-3), ``weight_decay`` (1e-2), ``row_weight`` (2).
    Writes a ``torch.export`` program (.pt2, dynamic batch up to ``MAX_RECORDS``)."""
    import torch

    hp = ctx.hyperparameters
    x, y, xs, repeat, spec = _retraining_data(ctx)
    t_mean, t_scale = float(spec["target"]["mean"]), float(spec["target"]["scale"])
    ys = ((y.astype(np.float32) - t_mean) / t_scale).reshape(-1, 1)
    epochs, seed = int(hp.get("epochs", 20)), int(hp.get("seed", ctx.seed))
    seed_everything(seed)
    model = fit(diabetes_net.DiabetesMLP(), (torch.from_numpy(xs[repeat]).float(),), torch.from_numpy(ys[repeat]),
                torch.nn.functional.mse_loss, epochs=epochs, batch_size=32, lr=float(hp.get("lr", 1e-3)),
                weight_decay=float(hp.get("weight_decay", 1e-2)), seed=seed,
                on_epoch=lambda done, total: ctx.progress(0.9 * done / total, f"epoch {done}/{total}"))
    batch = torch.export.Dim("batch", min=1, max=MAX_RECORDS)
    program = torch.export.export(model, (torch.zeros(2, xs.shape[1]),), dynamic_shapes=({0: batch},))
    path = ctx.out_dir / "diabetes_mlp.pt2"
    torch.export.save(program, str(path))
    fitted = predict(model, torch.from_numpy(xs).float()).numpy().reshape(-1) * t_scale + t_mean
    return {"weights": path, "reference": reference_sample(x, y.astype(np.float32), fitted, seed=seed)}


def build_cancer(out: Path, work: Path) -> ExampleResult:
    import torch
    from sklearn.datasets import load_breast_cancer

    d = load_breast_cancer()
    features = [str(f) for f in d.feature_names]
    x_tr, x_te, y_tr, y_te = split(d.data.astype(np.float32), d.target.astype(np.int64), seed=SEED)
    mean, scale = _standardize(x_tr)
    model = train_cancer((x_tr - mean) / scale, y_tr)
    pred = predict(model, torch.from_numpy((x_te - mean) / scale).float()).argmax(1).numpy()
    metrics = classification_metrics(y_te, pred)
    torch.save(model.state_dict(), work / "cancer_mlp.pt")
    (work / "features.json").write_text(json.dumps({"features": features, "mean": mean.tolist(),
                                                   "scale": scale.tolist(), "task": "classification"}))
    (work / "index_to_name.json").write_text(json.dumps({str(i): str(n) for i, n in enumerate(d.target_names)}))
    probs = torch.softmax(predict(model, torch.from_numpy((x_tr - mean) / scale).float()), 1).numpy()
    write_reference(work, x_tr, probs, y_tr)
    _sample(out, "cancer", features, x_te)
    np.savez_compressed(out / "samples" / "cancer_heldout.npz", x=x_te, y=y_te)
    archive = package_example(
        name=CANCER, out=out, work=work, handler="tabular", serialized_file=work / "cancer_mlp.pt",
        model_file=Path(cancer_net.__file__),
        extra_files=[work / "features.json", work / "index_to_name.json", work / "reference.npz"],
        config={"batchSize": 32, "maxBatchDelay": 5}, metrics=metrics,
        training={"entry_point": "examples.tabular:retrain_cancer", "data": "sklearn.datasets.load_breast_cancer",
                  "seed": SEED, "heldout_fraction": 0.2, "format": "eager state_dict",
                  "inputs": "standardized with features.json mean/scale"})
    return ExampleResult(archive, metrics)


def build_diabetes(out: Path, work: Path) -> ExampleResult:
    import torch
    from sklearn.datasets import load_diabetes

    d = load_diabetes(scaled=False)
    features = [str(f) for f in d.feature_names]
    x_tr, x_te, y_tr, y_te = split(d.data.astype(np.float32), d.target.astype(np.float32), seed=SEED, stratify=False)
    mean, scale = _standardize(x_tr)
    t_mean, t_scale = float(y_tr.mean()), float(y_tr.std())
    model = train_diabetes((x_tr - mean) / scale, (y_tr - t_mean) / t_scale)
    pred = predict(model, torch.from_numpy((x_te - mean) / scale).float()).numpy().reshape(-1) * t_scale + t_mean
    metrics = regression_metrics(y_te, pred)
    metrics["baseline_mse_predict_mean"] = round(float(np.mean((y_te - t_mean) ** 2)), 4)

    batch = torch.export.Dim("batch", min=1, max=MAX_RECORDS)
    program = torch.export.export(model, (torch.zeros(2, len(features)),), dynamic_shapes=({0: batch},))
    torch.export.save(program, str(work / "diabetes_mlp.pt2"))
    (work / "features.json").write_text(json.dumps({
        "features": features, "mean": mean.tolist(), "scale": scale.tolist(), "task": "regression",
        "target": {"name": "progression", "mean": t_mean, "scale": t_scale}}))
    fitted = predict(model, torch.from_numpy((x_tr - mean) / scale).float()).numpy().reshape(-1) * t_scale + t_mean
    write_reference(work, x_tr, fitted, y_tr)
    _sample(out, "diabetes", features, x_te)
    np.savez_compressed(out / "samples" / "diabetes_heldout.npz", x=x_te, y=y_te)
    archive = package_example(
        name=DIABETES, out=out, work=work, handler="tabular", serialized_file=work / "diabetes_mlp.pt2",
        extra_files=[work / "features.json", work / "reference.npz"],
        config={"batchSize": 32, "maxBatchDelay": 5, "handler": {"max_examples": MAX_RECORDS}}, metrics=metrics,
        training={"entry_point": "examples.tabular:retrain_diabetes", "data": "sklearn.datasets.load_diabetes(scaled=False)",
                  "seed": SEED, "heldout_fraction": 0.2, "format": "torch.export (.pt2)",
                  "inputs": "natural units, standardized with features.json mean/scale; target likewise"})
    return ExampleResult(archive, metrics)
