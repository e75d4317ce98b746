"""One closed window judged against the reference: scores per feature and the window's verdict.

When a window closes (``window`` rows, or ``window_seconds`` with at least ``min_window``
rows: the store decides which, atomically across replicas) its bin counts are scored here.

Per feature: drifted when its distance reaches the threshold. On a small window (fewer than
``stats.ROWS_PER_BIN`` rows per bin) the distance's own noise nears the threshold, so there a
two-sample chi-square test decides instead, at ``small_window_alpha`` (default
``stats.ALPHA``, 0.01) with a Bonferroni correction over the features scored (many features
must not multiply false alarms).

The window drifted (``drifted_window``):
- ``predictions="any"`` (default): any prediction feature drifted, or at least ``drift_share``
  of the input features did (and at least one: ``drift_share`` 0, the default, means any one
  input). The model's outputs are the cheapest strong signal (Failing Loudly: softmax + per-
  dimension test detected best) and a shift visible only in them is the most common real one.
  One input alone is enough by default too: a shift of a single feature (cancer_mlp's
  ``mean texture`` x 1.3) moves neither the predictions nor a share of the inputs, and the
  default threshold sits far enough above what unchanged features score that one drifted
  feature is evidence (Failing Loudly's per-dimension tests with a correction, in distance
  form). benchmarks/DRIFT.md ("Offline") compares the rules: with half the inputs, that shift
  is never detected.
- ``predictions="share"``: prediction features count in the share like inputs (Evidently's
  dataset drift: at least half of the columns).
- ``predictions="ignore"``: only inputs (e.g. a model whose output distribution is expected to
  move with seasons).
A model with no input features is judged on its predictions alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import stats
from .layout import Layout

__all__ = ["FeatureScore", "WindowResult", "analyze", "drifted_window", "PREDICTION_RULES"]

PREDICTION_RULES = ("any", "share", "ignore")


@dataclass
class FeatureScore:
    name: str
    kind: str
    method: str
    score: float
    threshold: float
    drifted: bool
    rows: int
    pvalue: float | None = None  # small windows: the chi-square p-value that decided


@dataclass
class WindowResult:
    rows: int
    ended: float
    method: str
    drifted: bool
    score: float  # the largest feature score (in the method's unit)
    small: bool  # decided by the chi-square test (small window)
    features: list[FeatureScore] = field(default_factory=list)  # ranked: most drifted first
    current: dict[str, list[float]] = field(default_factory=dict)  # proportions per feature


def drifted_window(input_flags: list[bool], prediction_flags: list[bool], drift_share: float,
                   predictions: str = "any") -> bool:
    if predictions not in PREDICTION_RULES:
        raise ValueError(f"prediction rule must be one of {', '.join(PREDICTION_RULES)}, got {predictions!r}")
    def enough(flags: list[bool]) -> bool:  # at least one drifted, and at least drift_share of them
        drifted = sum(flags)
        return drifted > 0 and drifted / len(flags) >= drift_share

    if predictions == "share":
        return enough(list(input_flags) + list(prediction_flags))
    if predictions == "any" and any(prediction_flags):
        return True
    return enough(list(input_flags))


def analyze(layout: Layout, flat: np.ndarray, rows: int, ended: float, config: Any) -> WindowResult:
    """Score a closed window's flat counts (``layout``) under a ``MonitoringConfig``."""
    method = config.method
    counts = layout.matrix(np.asarray(flat, dtype=np.int64))
    scores, methods = stats.score(method, layout.ref, counts, layout.valid, numeric=layout.numeric,
                                  positions=layout.positions, std=layout.std)
    per_feature_rows = counts.sum(axis=1)
    small = stats.small_window(rows, layout.max_bins)
    pvalues = stats.chi2_pvalues(layout.ref, layout.profile["rows"], counts, layout.valid) if small else None
    scored = max(int((per_feature_rows > 0).sum()), 1)
    alpha = float(getattr(config, "small_window_alpha", stats.ALPHA))
    out: list[FeatureScore] = []
    current: dict[str, list[float]] = {}
    for i, name in enumerate(layout.names):
        m = methods[i]
        threshold = stats.threshold_for(m, config.threshold if m == method else None)
        n = int(per_feature_rows[i])
        s = float(scores[i]) if n and math.isfinite(scores[i]) else 0.0
        if n == 0:
            drifted, p = False, None
        elif small:
            p = float(pvalues[i])
            drifted = p < alpha / scored
        else:
            drifted, p = s >= threshold, None
        out.append(FeatureScore(name, layout.kinds[i], m, s, threshold, bool(drifted), n, p))
        size = layout.sizes[i]
        current[name] = [float(c) / n if n else 0.0 for c in counts[i, :size]]
    rule = getattr(config, "prediction_drift", "any")
    verdict = drifted_window([f.drifted for f in out if f.kind == "input" and f.rows],
                             [f.drifted for f in out if f.kind == "prediction" and f.rows],
                             float(config.drift_share), rule)
    out.sort(key=lambda f: (not f.drifted, -(f.score / f.threshold if f.threshold else f.score)))
    top = max((f.score for f in out), default=0.0)
    return WindowResult(rows=int(rows), ended=float(ended), method=method, drifted=verdict, score=top,
                        small=small, features=out, current=current)
