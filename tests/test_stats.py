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


# ------------------------------------------------------------- replicate AUROCs and paired comparisons
from dicomfl.common.stats import (BETTER, UNSEPARABLE, WORSE, hierarchical_difference, replicate_aurocs,  # noqa: E402
                                  replicate_indices, split_seed, verdict)

GROUPS = [f"patient-{i // 2}" for i in range(len(Y))]  # two images per patient (labels may differ within one)


def test_replicates_resample_patients_within_strata_and_do_not_depend_on_their_number():
    seed, sid = split_seed("site-a", Y, GROUPS)
    reps = replicate_indices(Y, GROUPS, 60, seed)
    assert all((a == b).all() for a, b in zip(reps[:10], replicate_indices(Y, GROUPS, 10, seed)))
    g = np.asarray(GROUPS)
    top = {p: Y[g == p].max() for p in set(GROUPS)}
    n_pos_patients = sum(v == 1 for v in top.values())
    for idx in reps:
        drawn = g[idx]
        # whole patients: each drawn patient comes with both of its images, as many times as drawn
        counts = {p: int((drawn == p).sum()) for p in set(drawn)}
        assert all(c % 2 == 0 for c in counts.values())
        # strata kept: as many patients with a positive image as the split has
        assert sum(c // 2 for p, c in counts.items() if top[p] == 1) == n_pos_patients
    # the seed and id are a function of the site and the split's content, nothing else
    assert split_seed("site-a", Y, GROUPS) == (seed, sid)
    assert split_seed("site-b", Y, GROUPS)[0] != seed
    assert split_seed("site-a", Y[::-1], GROUPS)[0] != seed
    assert split_seed("site-a", Y, GROUPS[1:] + GROUPS[:1])[1] != sid
    assert 0 <= sid < 2 ** 36


def test_replicate_aurocs_match_scikit_learn_on_each_resample():
    seed, _ = split_seed("site-a", Y, GROUPS)
    reps = replicate_indices(Y, GROUPS, 40, seed)
    got = replicate_aurocs(Y, P_A, reps)  # P_A has ties on purpose
    assert got == pytest.approx([roc_auc_score(Y[i], P_A[i]) for i in reps], abs=1e-12)
    assert np.isnan(replicate_aurocs(np.zeros(4), np.arange(4.0), [np.arange(4)])).all()


def _two_models(n=300, seed=0):
    """Two models whose scores share most of their noise (they find the same images hard), B a bit worse."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.4).astype(int)
    hard = rng.normal(0, 1, n)
    p_a = y * 1.2 + hard + rng.normal(0, 0.3, n)
    p_b = y * 1.0 + hard + rng.normal(0, 0.3, n)
    return y, p_a, p_b


def test_paired_interval_is_narrower_than_unpaired_on_correlated_models():
    y, p_a, p_b = _two_models()
    groups = [f"p{i}" for i in range(len(y))]
    reps = replicate_indices(y, groups, 1000, split_seed("s", y, groups)[0])
    a, b = replicate_aurocs(y, p_a, reps)[None], replicate_aurocs(y, p_b, reps)[None]
    pa, pb = [roc_auc_score(y, p_a)], [roc_auc_score(y, p_b)]
    paired = hierarchical_difference(a, b, [0], pa, pb)
    unpaired = hierarchical_difference(a, b, [0], pa, pb, paired=False)
    assert paired["diff"] == pytest.approx(pa[0] - pb[0]) == pytest.approx(unpaired["diff"])
    assert paired["hi"] - paired["lo"] < 0.5 * (unpaired["hi"] - unpaired["lo"])
    assert paired["verdict"] == BETTER and unpaired["verdict"] == UNSEPARABLE  # pairing is what separates them
    assert paired["lo"] < paired["diff"] < paired["hi"]


def test_resampling_seeds_carries_the_training_variance():
    """Three seeds whose differences disagree: resampling the seeds widens the interval."""
    y, p_a, p_b = _two_models(seed=1)
    groups = [f"p{i}" for i in range(len(y))]
    reps = replicate_indices(y, groups, 500, split_seed("s", y, groups)[0])
    a = np.stack([replicate_aurocs(y, p_a + k * 0.6 * y, reps) for k in (-1, 0, 1)])  # seed k shifts model A
    b = np.stack([replicate_aurocs(y, p_b, reps)] * 3)
    seeds = [0, 1, 2]
    with_seeds = hierarchical_difference(a, b, seeds)
    test_only = hierarchical_difference(a, b, seeds, resample_seeds=False)
    assert with_seeds["seeds"] == 3 and with_seeds["units"] == 3
    assert (with_seeds["hi"] - with_seeds["lo"]) > 1.5 * (test_only["hi"] - test_only["lo"])
    assert verdict(0.01, 0.2) == BETTER and verdict(-0.2, -0.01) == WORSE and verdict(-0.1, 0.1) == UNSEPARABLE
    assert hierarchical_difference(np.zeros((0, 5)), np.zeros((0, 5)), [])["verdict"] == UNSEPARABLE
