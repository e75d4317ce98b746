"""Per-feature drift scores between a reference and a window, vectorized over features.

Every score works on binned distributions: the reference keeps proportions on its own
quantile bins (never the data) and a window keeps counts on the same bins, so windows from
several replicas add up and memory does not grow with traffic. Inputs are matrices with one
row per feature, padded to the widest feature with a mask (``valid``) saying which bins exist.

Why distances with thresholds and not p-values: on windows of hundreds of rows a test flags
shifts nobody cares about (a 0.1 sigma shift on 5000 rows made KS flag 98% of features while
PSI was 0.01), and serving traffic is autocorrelated, which breaks a test's calibration. A
distance measures how much moved. On small windows the opposite holds: a distance's sampling
noise (PSI of an unchanged feature is about (bins - 1) / n) reaches the threshold, so there a
chi-square test with a Bonferroni correction across features decides (see :func:`small_window`).

Default thresholds (``DEFAULT_THRESHOLDS``), per feature, with the default 5 quantile bins and
a window that drifts when any one feature drifts (``drift_share`` 0, ``prediction_drift`` any),
tuned on the examples by ``benchmarks/drift_offline.py`` (benchmarks/DRIFT.md, "Offline"):

- ``psi`` 0.3. Sampling noise is small: for an unchanged 5-bin feature PSI * n_eff is about
  chi-square with 4 degrees of freedom, n_eff = 1 / (1/window + 1/reference rows); window
  500, reference 500: mean 0.016, and P(PSI >= 0.13) about 1e-4 / 50 features. What in-
  distribution traffic really scores is larger and systematic: a finite held-out sample
  against training rows, a model more confident on its training rows than on new ones (the
  examples' 40 held-out windows: at most 0.18; with 10 bins 0.49, as noise grows with the
  bins while a real shift's PSI barely does: a 0.5 sd mean shift scores 0.22 on 5 bins, 0.24
  on 10). 0.3 is the lowest threshold with 1.5x margin over those 0.18, and catches a mean
  shift of about 0.6 sd of one feature; every shift of issue 11 scored >= 1.1 (3.7x).
- ``jensenshannon`` 0.2 (distance, natural log, as scipy and Evidently compute it): clean at
  most 0.15, shifts at least 0.34 (5 bins); it separates less than PSI (2.3x vs 6.1x end to end).
- ``wasserstein`` 0.3 (normed by the reference std): clean at most 0.23, shifts at least 0.8.
  Categorical features have no order; they are scored with Jensen-Shannon.
"""

from __future__ import annotations

import numpy as np

# scipy.stats and scipy.spatial are imported where used, not here: importing scipy.stats takes
# about 0.7 s, and every server start (and `osprey` command) imports this module

__all__ = ["METHODS", "DEFAULT_THRESHOLDS", "FLOOR", "ALPHA", "psi", "jensenshannon", "wasserstein",
           "chi2_pvalues", "small_window", "score", "threshold_for"]

METHODS = ("psi", "jensenshannon", "wasserstein")
DEFAULT_THRESHOLDS = {"psi": 0.3, "jensenshannon": 0.2, "wasserstein": 0.3}
FLOOR = 1e-4  # smallest proportion: an empty bin on either side keeps PSI finite
# family-wise false-alarm rate of the small-window test (Bonferroni over features): the default
# of monitoring.small_window_alpha. 0.05 let 4.3% of clean windows of 100 rows drift against a
# 500-row profile, and 2 of 3 in 0.6% of trials (a false episode in about 1 of 5 runs of 40
# windows); 0.01: 0.8% and none, with every 1 sd shift of one input still caught
# (benchmarks/small_windows.py, DRIFT.md "Small windows")
ALPHA = 0.01
ROWS_PER_BIN = 30  # below this many rows per bin a window is "small": the test decides


def threshold_for(method: str, threshold: float | None) -> float:
    if method not in METHODS:
        raise ValueError(f"unknown drift method {method!r}: one of {', '.join(METHODS)}")
    return DEFAULT_THRESHOLDS[method] if threshold is None else float(threshold)


def _proportions(counts: np.ndarray, valid: np.ndarray) -> np.ndarray:
    counts = np.where(valid, counts, 0).astype(np.float64)
    total = counts.sum(axis=1, keepdims=True)
    return np.divide(counts, total, out=np.zeros_like(counts), where=total > 0)


def _floored(p: np.ndarray, valid: np.ndarray) -> np.ndarray:
    q = np.where(valid, np.maximum(p, FLOOR), 0.0)
    s = q.sum(axis=1, keepdims=True)
    return np.divide(q, s, out=np.zeros_like(q), where=s > 0)


def psi(ref: np.ndarray, counts: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Population stability index per row: sum (c - r) ln(c / r), both floored at ``FLOOR``."""
    r = _floored(ref, valid)
    c = _floored(_proportions(counts, valid), valid)
    safe_r, safe_c = np.where(valid, r, 1.0), np.where(valid, c, 1.0)
    return np.sum(np.where(valid, (safe_c - safe_r) * np.log(safe_c / safe_r), 0.0), axis=1)


def _relative_entropy(p: np.ndarray, m: np.ndarray) -> np.ndarray:
    """sum p log(p / m) per row, 0 log 0 = 0 (``m`` is positive wherever ``p`` is)."""
    ok = p > 0
    return np.sum(np.where(ok, p * np.log(np.where(ok, p, 1.0) / np.where(ok, m, 1.0)), 0.0), axis=1)


def jensenshannon(ref: np.ndarray, counts: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Jensen-Shannon distance per row, natural log, in [0, sqrt(ln 2)]: scipy's
    ``distance.jensenshannon`` (each row normalized to sum 1; the tests compare the two),
    written with numpy because the monitor process would otherwise import ``scipy.spatial``
    for it (0.4 s of CPU and 33 MB there)."""
    r = np.where(valid, ref, 0.0)
    c = _proportions(counts, valid)
    out = np.zeros(len(r))
    ok = (c.sum(axis=1) > 0) & (r.sum(axis=1) > 0)
    if ok.any():
        p, q = r[ok] / r[ok].sum(axis=1, keepdims=True), c[ok] / c[ok].sum(axis=1, keepdims=True)
        m = (p + q) / 2
        out[ok] = np.sqrt(np.maximum((_relative_entropy(p, m) + _relative_entropy(q, m)) / 2, 0.0))
    return np.nan_to_num(out)


def centers(edges: list[float], std: float) -> np.ndarray:
    """Bin centers of a numeric feature: midpoints inside, and the open end bins half a
    reference std beyond their finite edge (their mass has no better position)."""
    e = np.asarray(edges, dtype=np.float64)
    inner = e[1:-1]
    if len(inner) == 0:
        return np.zeros(1)
    half = (std if std > 0 else 1.0) / 2
    mids = (inner[:-1] + inner[1:]) / 2
    return np.concatenate([[inner[0] - half], mids, [inner[-1] + half]])


def wasserstein(ref: np.ndarray, counts: np.ndarray, valid: np.ndarray, positions: np.ndarray,
                std: np.ndarray) -> np.ndarray:
    """Wasserstein-1 distance per row between the two binned distributions placed at
    ``positions`` (bin centers), divided by the reference std (Evidently's normed form)."""
    r = np.where(valid, ref, 0.0)
    rs = r.sum(axis=1, keepdims=True)
    r = np.divide(r, rs, out=np.zeros_like(r), where=rs > 0)
    c = _proportions(counts, valid)
    gaps = np.diff(positions, axis=1)
    gaps = np.where(valid[:, 1:], gaps, 0.0)
    cdf_gap = np.abs(np.cumsum(r - c, axis=1))[:, :-1]
    w = np.sum(cdf_gap * gaps, axis=1)
    scale = np.where(std > 0, std, 1.0)
    out = w / scale
    out[c.sum(axis=1) == 0] = 0.0
    return out


def chi2_pvalues(ref: np.ndarray, ref_rows: int, counts: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Two-sample chi-square p-value per row: is the window drawn from the reference's
    distribution? The reference counts are its proportions times its rows, so a reference
    built from few rows (a baseline) is not treated as exact."""
    r = np.where(valid, ref, 0.0) * max(int(ref_rows), 1)
    c = np.where(valid, counts, 0).astype(np.float64)
    nr, nc = r.sum(axis=1, keepdims=True), c.sum(axis=1, keepdims=True)
    total = r + c
    n = nr + nc
    er = np.divide(total * nr, n, out=np.zeros_like(total), where=n > 0)
    ec = np.divide(total * nc, n, out=np.zeros_like(total), where=n > 0)
    used = valid & (total > 0)
    stat = np.sum(np.where(used & (er > 0), (r - er) ** 2 / np.where(er > 0, er, 1), 0.0)
                  + np.where(used & (ec > 0), (c - ec) ** 2 / np.where(ec > 0, ec, 1), 0.0), axis=1)
    dof = np.maximum(used.sum(axis=1) - 1, 1)
    from scipy.special import chdtrc  # (the chi-square survival function: scipy.stats costs 3x its import)

    p = chdtrc(dof, stat)
    p[nc[:, 0] == 0] = 1.0
    return p


def small_window(rows: int, bins: int) -> bool:
    """Fewer than ``ROWS_PER_BIN`` rows per bin: a distance's noise nears its threshold."""
    return rows < ROWS_PER_BIN * max(int(bins), 2)


def score(method: str, ref: np.ndarray, counts: np.ndarray, valid: np.ndarray, *, numeric: np.ndarray,
          positions: np.ndarray, std: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """(scores, method per row): ``method`` for every feature, except that Wasserstein,
    which needs an order, scores categorical features with Jensen-Shannon."""
    if method == "psi":
        return psi(ref, counts, valid), ["psi"] * len(ref)
    if method == "jensenshannon":
        return jensenshannon(ref, counts, valid), ["jensenshannon"] * len(ref)
    if method == "wasserstein":
        out = jensenshannon(ref, counts, valid)
        if numeric.any():
            out[numeric] = wasserstein(ref[numeric], counts[numeric], valid[numeric], positions[numeric], std[numeric])
        return out, ["wasserstein" if n else "jensenshannon" for n in numeric]
    raise ValueError(f"unknown drift method {method!r}: one of {', '.join(METHODS)}")
