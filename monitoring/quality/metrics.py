"""Live quality metrics of a window of labelled predictions, the baseline they are judged
against, and the judgement itself.

Classification (``outputs`` are class probabilities or scores, labels class indices):
accuracy, macro precision / recall / F1, ROC AUC (binary: the positive class's score;
more classes: one-vs-rest, macro over the classes present with both outcomes) and log loss
(only where the outputs are probabilities). Regression: MSE, MAE, R². Computed here with
numpy, scikit-learn's definitions (macro over the classes in labels or predictions, 0 where a
class has no predictions; R² of a constant output 1 when predicted exactly, else 0): the tests
compare every one with scikit-learn's. Not by scikit-learn, because this runs in the monitor
process, which lives as long as the server: importing ``sklearn.metrics`` (and with it
``scipy.stats``) took 1.7 s of CPU and 86 MB there, more than the whole monitor before its
first label, and the first feedback call and status after that label waited for the import
(benchmarks/DRIFT.md, "Feedback while the model serves traffic"). ROC AUC is from ranks
(Mann-Whitney U, ties averaged), as scikit-learn's value, at a tenth of its cost.

``degraded``: a metric worse than its baseline by more than the tolerance, judged only over
at least ``min_labels`` labels. The tolerance is absolute for scores in [0, 1] (accuracy,
precision, recall, F1, ROC AUC, R²: 0.05 means five points) and relative for errors, whose
scale is the model's own (MSE, MAE, log loss: 0.05 means 5 % worse).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["HIGHER_IS_BETTER", "LOWER_IS_BETTER", "binary_auc", "classification_metrics", "regression_metrics",
           "ranks", "macro_prf", "are_probabilities", "judge", "load_baseline", "confidence_estimate"]

HIGHER_IS_BETTER = ("accuracy", "precision", "recall", "f1", "roc_auc", "r2")
LOWER_IS_BETTER = ("log_loss", "mse", "mae")
KNOWN = HIGHER_IS_BETTER + LOWER_IS_BETTER
PROFILE = "osprey-profile.json"
TRAINING = "training.json"


def are_probabilities(outputs: np.ndarray) -> bool:
    """Rows of values in [0, 1] summing to 1 (softmax outputs), not logits or scores."""
    if outputs.ndim != 2 or outputs.shape[1] < 2 or not outputs.size:
        return False
    if not np.all(np.isfinite(outputs)) or outputs.min() < -1e-6 or outputs.max() > 1 + 1e-6:
        return False
    return bool(np.all(np.abs(outputs.sum(axis=1) - 1.0) < 1e-3))


def _round(x: float) -> float | None:
    x = float(x)
    return round(x, 6) if math.isfinite(x) else None


def ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of ``x``, ties given their average rank (``scipy.stats.rankdata``'s
    default): one stable sort and a pass over the runs of equal values."""
    x = np.asarray(x).ravel()
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    run = np.cumsum(np.concatenate([[True], xs[1:] != xs[:-1]])) - 1  # run of equal values of each sorted item
    sizes = np.bincount(run)
    average = np.cumsum(sizes) - (sizes - 1) / 2.0  # the run's last rank, less half its length but one
    out = np.empty(len(x), dtype=np.float64)
    out[order] = average[run]
    return out


def binary_auc(positive: np.ndarray, score: np.ndarray) -> float:
    """ROC AUC from ranks (Mann-Whitney U, ties averaged): the value of scikit-learn's
    ``roc_auc_score`` at a tenth of its cost (it was 90 % of a window's metrics, one-vs-rest)."""
    positive = np.asarray(positive, dtype=bool)
    n_pos = int(positive.sum())
    n_neg = len(positive) - n_pos
    r = ranks(score)
    return float((r[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def macro_prf(y: np.ndarray, pred: np.ndarray) -> tuple[float, float, float]:
    """Macro precision, recall and F1 over the classes in ``y`` or ``pred`` (scikit-learn's
    ``precision_recall_fscore_support(average="macro", zero_division=0)``)."""
    classes, index = np.unique(np.concatenate([y, pred]), return_inverse=True)
    k, n = len(classes), len(y)
    if not k:
        return 0.0, 0.0, 0.0
    yi, pi = index[:n], index[n:]
    tp = np.bincount(yi[yi == pi], minlength=k).astype(np.float64)
    predicted = np.bincount(pi, minlength=k).astype(np.float64)
    actual = np.bincount(yi, minlength=k).astype(np.float64)
    precision = np.divide(tp, predicted, out=np.zeros(k), where=predicted > 0)
    recall = np.divide(tp, actual, out=np.zeros(k), where=actual > 0)
    both = predicted + actual
    f1 = np.divide(2 * tp, both, out=np.zeros(k), where=both > 0)
    return float(precision.mean()), float(recall.mean()), float(f1.mean())


def classification_metrics(y: np.ndarray, outputs: np.ndarray, only: str | None = None) -> dict[str, float | None]:
    """``y``: (n,) class indices; ``outputs``: (n, C) probabilities or scores. ``only``: that one
    metric (the others are not computed: the gate's bootstrap asks for one metric hundreds of times)."""
    y = np.asarray(y, dtype=np.int64)
    outputs = np.asarray(outputs, dtype=np.float64)
    n_classes = outputs.shape[1]
    pred = outputs.argmax(axis=1)
    out: dict[str, float | None] = {}
    if only in (None, "accuracy"):
        out["accuracy"] = _round(np.mean(pred == y)) if len(y) else None
    if only in (None, "precision", "recall", "f1"):
        p, r, f = macro_prf(y, pred)
        out.update(precision=_round(p), recall=_round(r), f1=_round(f))
    if only in (None, "roc_auc"):
        if n_classes == 2:
            out["roc_auc"] = _round(binary_auc(y == 1, outputs[:, 1])) if len(np.unique(y)) == 2 else None
        else:  # one-vs-rest, macro over the classes that have both positives and negatives here
            aucs = [binary_auc(y == c, outputs[:, c]) for c in range(n_classes) if 0 < np.sum(y == c) < len(y)]
            out["roc_auc"] = _round(np.mean(aucs)) if aucs else None
    if only in (None, "log_loss"):
        if are_probabilities(outputs) and len(y) and bool(np.all((y >= 0) & (y < n_classes))):
            probs = np.clip(outputs, 1e-15, 1.0)
            probs /= probs.sum(axis=1, keepdims=True)
            out["log_loss"] = _round(-np.mean(np.log(probs[np.arange(len(y)), y])))
        else:
            out["log_loss"] = None
    return {k: v for k, v in out.items() if only is None or k == only}


def regression_metrics(y: np.ndarray, outputs: np.ndarray, only: str | None = None) -> dict[str, float | None]:
    """``y`` and ``outputs``: (n,) or (n, k) values. ``only``: that one metric."""
    y = np.asarray(y, dtype=np.float64)
    outputs = np.asarray(outputs, dtype=np.float64).reshape(y.shape)
    out: dict[str, float | None] = {}
    error = outputs - y
    if only in (None, "mse"):
        out["mse"] = _round(np.mean(error ** 2)) if error.size else None
    if only in (None, "mae"):
        out["mae"] = _round(np.mean(np.abs(error))) if error.size else None
    if only in (None, "r2"):
        constant = len(y) < 2 or bool(np.all(np.ptp(y, axis=0) == 0))
        if constant:
            out["r2"] = None
        else:  # per output, averaged; an output whose truth is constant: 1 if predicted exactly, else 0
            y2, e2 = y.reshape(len(y), -1), error.reshape(len(y), -1)
            residual = np.sum(e2 ** 2, axis=0)
            total = np.sum((y2 - y2.mean(axis=0)) ** 2, axis=0)
            r2 = np.where(total > 0, 1.0 - residual / np.where(total > 0, total, 1.0),
                          np.where(residual == 0, 1.0, 0.0))
            out["r2"] = _round(np.mean(r2))
    return out


def confidence_estimate(top_probabilities: np.ndarray) -> dict[str, Any] | None:
    """CBPE-style expected accuracy before labels arrive: for a calibrated classifier the mean
    top-class probability is the expected share of right answers."""
    if not len(top_probabilities):
        return None
    return {"accuracy": _round(np.mean(top_probabilities)), "rows": int(len(top_probabilities)),
            "method": "confidence (mean top-class probability; assumes calibrated outputs)"}


def judge(metrics: dict[str, float | None], baseline: dict[str, float], labels: int, min_labels: int,
          tolerance: float) -> tuple[bool, list[dict[str, Any]]]:
    """(degraded, the metrics that are worse than their baseline by more than the tolerance)."""
    if labels < min_labels:
        return False, []
    worse = []
    for name, base in baseline.items():
        value = metrics.get(name)
        if value is None:
            continue
        if name in HIGHER_IS_BETTER:
            limit = base - tolerance
            bad = value < limit
        else:
            limit = base * (1 + tolerance) if base > 0 else base + tolerance
            bad = value > limit
        if bad:
            worse.append({"metric": name, "value": value, "baseline": base, "limit": _round(limit)})
    return bool(worse), worse


def _numeric_metrics(raw: Any) -> dict[str, float]:
    if not isinstance(raw, dict):
        return {}
    out = {}
    for k, v in raw.items():
        # judged_accuracy: a generator's samples recognised as the asked class by the archive's
        # judge (the gate's scorer): the baseline of how often viewers recognise it
        name = {"auc": "roc_auc", "logloss": "log_loss", "judged_accuracy": "accuracy"}.get(str(k).lower(),
                                                                                          str(k).lower())
        if name in KNOWN and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            out[name] = float(v)
    return out


def load_baseline(model_dir: str | Path | None) -> tuple[dict[str, float], str | None]:
    """(held-out metrics, where they came from) from the version's model dir: the profile's
    ``quality``, else the archive's ``training.json`` ``heldout_metrics``; ({}, None) if neither."""
    if model_dir is None:
        return {}, None
    root = Path(model_dir)
    for name, key in ((PROFILE, "quality"), (TRAINING, "heldout_metrics")):
        path = root / name
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        metrics = _numeric_metrics(data.get(key) if isinstance(data, dict) else None)
        if metrics:
            return metrics, f"{name}:{key}"
    return {}, None
