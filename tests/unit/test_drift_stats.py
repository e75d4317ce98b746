"""Drift scores on distributions whose answers are known."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.spatial import distance
from scipy.stats import wasserstein_distance

from monitoring.drift import stats


def _one(ref, counts):
    ref = np.asarray([ref], dtype=float)
    counts = np.asarray([counts], dtype=float)
    return ref, counts, np.ones(ref.shape, dtype=bool)


def test_psi_matches_the_formula_and_is_zero_on_the_same_distribution():
    ref, counts, valid = _one([0.25, 0.25, 0.5], [25, 25, 50])
    assert stats.psi(ref, counts, valid)[0] == pytest.approx(0.0, abs=1e-12)
    ref, counts, valid = _one([0.5, 0.5], [80, 20])
    expected = (0.8 - 0.5) * math.log(0.8 / 0.5) + (0.2 - 0.5) * math.log(0.2 / 0.5)
    assert stats.psi(ref, counts, valid)[0] == pytest.approx(expected, rel=1e-3)


def test_psi_stays_finite_when_a_bin_is_empty_on_either_side():
    ref, counts, valid = _one([0.0, 1.0], [100, 0])
    assert math.isfinite(stats.psi(ref, counts, valid)[0])
    assert stats.psi(ref, counts, valid)[0] > 5


def test_padded_bins_change_nothing_and_rows_are_independent():
    ref = np.array([[0.5, 0.5, 0.0], [0.2, 0.3, 0.5]])
    valid = np.array([[True, True, False], [True, True, True]])
    counts = np.array([[80, 20, 0], [20, 30, 50]])
    got = stats.psi(ref, counts, valid)
    alone = stats.psi(ref[:1, :2], counts[:1, :2], valid[:1, :2])
    assert got[0] == pytest.approx(alone[0])
    assert got[1] == pytest.approx(0.0, abs=1e-9)


def test_jensenshannon_is_scipys_distance():
    ref, counts, valid = _one([0.1, 0.4, 0.5], [30, 30, 40])
    assert stats.jensenshannon(ref, counts, valid)[0] == pytest.approx(
        distance.jensenshannon([0.1, 0.4, 0.5], [0.3, 0.3, 0.4]))


def test_jensenshannon_and_chi_square_match_scipy_on_random_rows():
    """Jensen-Shannon (numpy here) on rows with empty bins on either side, and the chi-square
    p-value (scipy.special here), against scipy.spatial and scipy.stats."""
    from scipy.stats import chi2

    rng = np.random.default_rng(3)
    for _ in range(100):
        k = int(rng.integers(2, 12))
        ref = rng.random((6, k)) * (rng.random((6, k)) > 0.2)
        ref[:, 0] += 0.01
        ref /= ref.sum(axis=1, keepdims=True)
        counts = rng.integers(0, 30, (6, k)) * (rng.random((6, k)) > 0.2)
        counts[:, -1] += 1
        valid = np.ones((6, k), dtype=bool)
        got = stats.jensenshannon(ref, counts, valid)
        assert got == pytest.approx([distance.jensenshannon(r, c) for r, c in zip(ref, counts)], abs=1e-12)
        rows = int(rng.integers(20, 2000))
        p = stats.chi2_pvalues(ref, rows, counts, valid)
        r, c = ref * rows, counts.astype(float)
        total, n = r + c, rows + c.sum(axis=1, keepdims=True)
        er, ec = total * rows / n, total * c.sum(axis=1, keepdims=True) / n
        used = total > 0
        stat = np.sum(np.where(used, (r - er) ** 2 / np.where(used, er, 1) + (c - ec) ** 2 / np.where(used, ec, 1), 0),
                      axis=1)
        assert p == pytest.approx(chi2.sf(stat, np.maximum(used.sum(axis=1) - 1, 1)), rel=1e-9, abs=1e-300)


def test_normed_wasserstein_on_bin_centers_matches_scipy():
    edges = [-np.inf, 0.0, 1.0, 2.0, np.inf]
    pos = stats.centers(edges, std=1.0)
    assert list(pos) == [-0.5, 0.5, 1.5, 2.5]
    ref_p = np.array([0.1, 0.4, 0.4, 0.1])
    cur = np.array([0, 10, 40, 50])
    ref, counts, valid = _one(ref_p, cur)
    got = stats.wasserstein(ref, counts, valid, pos[None, :], np.array([2.0]))[0]
    expected = wasserstein_distance(pos, pos, ref_p, cur / cur.sum()) / 2.0
    assert got == pytest.approx(expected)


def test_chi_square_flags_a_real_shift_and_not_noise():
    rng = np.random.default_rng(0)
    ref = np.full((1, 10), 0.1)
    valid = np.ones((1, 10), dtype=bool)
    same = np.bincount(rng.integers(0, 10, 100), minlength=10)[None, :]
    shifted = np.bincount(rng.integers(0, 5, 100), minlength=10)[None, :]
    assert stats.chi2_pvalues(ref, 5000, same, valid)[0] > 0.01
    assert stats.chi2_pvalues(ref, 5000, shifted, valid)[0] < 1e-6


def test_small_window_rule_and_thresholds():
    assert stats.small_window(100, 10) and not stats.small_window(500, 10)
    assert stats.threshold_for("psi", None) == 0.3 and stats.threshold_for("psi", 0.5) == 0.5
    with pytest.raises(ValueError, match="unknown drift method 'ks'"):
        stats.threshold_for("ks", None)


def test_unchanged_feature_scores_far_below_the_psi_threshold_on_windows_of_500():
    """The noise the default threshold must clear: 10 quantile bins, 200 windows of 500."""
    rng = np.random.default_rng(1)
    ref = np.full((200, 10), 0.1)
    valid = np.ones((200, 10), dtype=bool)
    counts = np.stack([np.bincount(rng.integers(0, 10, 500), minlength=10) for _ in range(200)])
    scores = stats.psi(ref, counts, valid)
    assert scores.mean() == pytest.approx(9 / 500, rel=0.3)
    assert scores.max() < stats.DEFAULT_THRESHOLDS["psi"] * 0.75


def test_wasserstein_scores_categorical_rows_with_jensenshannon():
    ref = np.array([[0.5, 0.5], [0.5, 0.5]])
    valid = np.ones((2, 2), dtype=bool)
    counts = np.array([[90, 10], [90, 10]])
    scores, methods = stats.score("wasserstein", ref, counts, valid, numeric=np.array([True, False]),
                                  positions=np.array([[0.0, 1.0], [0.0, 0.0]]), std=np.array([1.0, 0.0]))
    assert methods == ["wasserstein", "jensenshannon"]
    assert scores[1] == pytest.approx(distance.jensenshannon([0.5, 0.5], [0.9, 0.1]))
