"""Bootstrap intervals (common/stats.py) against a reference computation on fixed inputs: the
same resamples scored one by one with scikit-learn, and the percentile taken by hand."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from dicomfl.common.metrics import binary_metrics
from dicomfl.common.stats import bootstrap_auroc, paired_auroc_difference, resample_indices

RNG = np.random.default_rng(42)
Y = np.array([0] * 30 + [1] * 20)
P_A = np.clip(Y * 0.25 + RNG.normal(0.4, 0.2, len(Y)), 0, 1).round(2)  # rounded: ties on purpose
P_B = np.clip(Y * 0.10 + RNG.normal(0.45, 0.2, len(Y)), 0, 1).round(2)


def _reference(y, ps, n_boot, seed):
    idx = resample_indices(y, n_boot, np.random.default_rng(seed))
    return [np.array([roc_auc_score(y[i], p[i]) for i in idx]) for p in ps]


def test_interval_matches_the_reference_computation():
    (ref,) = _reference(Y, [P_A], 300, 7)
    lo, hi = bootstrap_auroc(Y, P_A, n_boot=300, seed=7)
    assert (lo, hi) == pytest.approx(tuple(np.quantile(ref, [0.025, 0.975])), abs=1e-12)
    assert lo < roc_auc_score(Y, P_A) < hi


def test_paired_difference_matches_the_reference_computation():
    a, b = _reference(Y, [P_A, P_B], 300, 3)
    d = a - b
    got = paired_auroc_difference(Y, P_A, P_B, n_boot=300, seed=3)
    assert got["diff"] == pytest.approx(roc_auc_score(Y, P_A) - roc_auc_score(Y, P_B), abs=1e-12)
    assert (got["lo"], got["hi"]) == pytest.approx(tuple(np.quantile(d, [0.025, 0.975])), abs=1e-12)
    assert got["p_value"] == pytest.approx(min(1.0, 2 * min((d <= 0).mean(), (d >= 0).mean())))


def test_resamples_keep_the_class_balance_and_memory_blocks_do_not_change_the_answer(monkeypatch):
    idx = resample_indices(Y, 50, np.random.default_rng(0))
    assert idx.shape == (50, len(Y)) and ((Y[idx] == 1).sum(axis=1) == 20).all()
    whole = bootstrap_auroc(Y, P_A, n_boot=200, seed=1)
    import dicomfl.common.stats as S

    monkeypatch.setattr(S, "_BLOCK_CELLS", len(Y) * 7)  # 7 resamples per block
    assert bootstrap_auroc(Y, P_A, n_boot=200, seed=1) == whole


def test_wider_with_fewer_images_and_undefined_with_one_class():
    few = np.r_[0:30:3, 30:50:2]  # 10 negatives, 10 positives
    assert 0.5 < roc_auc_score(Y[few], P_A[few]) < 1
    small = bootstrap_auroc(Y[few], P_A[few], n_boot=400)
    big = bootstrap_auroc(Y, P_A, n_boot=400)
    assert small[1] - small[0] > big[1] - big[0]
    assert all(np.isnan(bootstrap_auroc(np.zeros(10), np.linspace(0, 1, 10))))
    assert np.isnan(paired_auroc_difference(np.ones(5), np.ones(5), np.ones(5))["p_value"])


def test_site_metrics_carry_the_interval():
    m = binary_metrics(Y, P_A)
    assert m["auroc_lo"] < m["auroc"] < m["auroc_hi"]
