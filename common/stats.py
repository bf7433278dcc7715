"""Bootstrap intervals for AUROC, alone and paired (two models scored on the same images).

With 50 test images one AUROC has a 95% interval about 0.2 wide, so a difference between two
configurations means something only with its interval. Both functions resample images with
replacement *within each class* (stratified: every resample keeps the class balance of the
sample, so AUROC is always defined), ``n_boot`` times from a seeded generator, and report the
percentile interval. The paired version resamples the same images for both models, so what the
two models share (which images are hard) cancels in the difference.

AUROC of a resample is the Mann-Whitney statistic from average ranks (ties count one half), the
same number as ``sklearn.metrics.roc_auc_score``; resamples are scored in blocks so memory stays
bounded for large test sets.

When only numbers may leave a site, the two models of a paired comparison are never scored in one
place. The replicate AUROCs below make the pairing work anyway: a site scores every model on the
same resamples of its test split (seeded by the split, not by the model), sends the B numbers, and
:func:`hierarchical_difference` pairs them replicate by replicate, across sites and training seeds.
"""

from __future__ import annotations

import hashlib

import numpy as np
from scipy.stats import rankdata

from .protocol import REPLICATES_ID_BITS

N_BOOT = 1000
_BLOCK_CELLS = 4_000_000  # resamples x images scored at once


def resample_indices(y: np.ndarray, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """(n_boot, n) indices into ``y``: each row draws n1 positives and n0 negatives with replacement."""
    y = np.asarray(y)
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y != 1)
    ip = pos[rng.integers(0, len(pos), size=(n_boot, len(pos)))]
    ineg = neg[rng.integers(0, len(neg), size=(n_boot, len(neg)))]
    return np.concatenate([ip, ineg], axis=1)


def _auroc_rows(scores: np.ndarray, n_pos: int) -> np.ndarray:
    """AUROC of each row of ``scores`` whose first ``n_pos`` columns are the positives."""
    n_neg = scores.shape[1] - n_pos
    ranks = rankdata(scores, axis=1)
    return (ranks[:, :n_pos].sum(axis=1) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def _boot_aurocs(y: np.ndarray, p_list: list[np.ndarray], n_boot: int, seed: int) -> list[np.ndarray]:
    idx = resample_indices(y, n_boot, np.random.default_rng(seed))
    n_pos = int((np.asarray(y) == 1).sum())
    block = max(1, _BLOCK_CELLS // max(1, idx.shape[1]))
    out = [np.empty(n_boot) for _ in p_list]
    for at in range(0, n_boot, block):
        rows = idx[at:at + block]
        for k, p in enumerate(p_list):
            out[k][at:at + block] = _auroc_rows(np.asarray(p, dtype=np.float64)[rows], n_pos)
    return out


def _defined(y: np.ndarray) -> bool:
    y = np.asarray(y)
    return len(y) > 0 and (y == 1).any() and (y != 1).any()


def bootstrap_auroc(y, p, n_boot: int = N_BOOT, seed: int = 0, alpha: float = 0.05) -> tuple[float, float]:
    """The (1 - alpha) percentile interval of AUROC, (lo, hi); (nan, nan) without both classes."""
    if not _defined(y):
        return float("nan"), float("nan")
    (a,) = _boot_aurocs(np.asarray(y), [p], n_boot, seed)
    lo, hi = np.quantile(a, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)


def paired_auroc_difference(y, p_a, p_b, n_boot: int = N_BOOT, seed: int = 0, alpha: float = 0.05) -> dict[str, float]:
    """AUROC(a) - AUROC(b) on the same images: the difference, its percentile interval, and the
    two-sided bootstrap p-value (twice the smaller share of resamples on either side of 0)."""
    nan = float("nan")
    if not _defined(y):
        return {"diff": nan, "lo": nan, "hi": nan, "p_value": nan}
    from sklearn.metrics import roc_auc_score

    y = np.asarray(y)
    diff = float(roc_auc_score(y == 1, p_a) - roc_auc_score(y == 1, p_b))
    a, b = _boot_aurocs(y, [p_a, p_b], n_boot, seed)
    d = a - b
    lo, hi = np.quantile(d, [alpha / 2, 1 - alpha / 2])
    p_value = min(1.0, 2 * min(float((d <= 0).mean()), float((d >= 0).mean())))
    return {"diff": diff, "lo": float(lo), "hi": float(hi), "p_value": p_value}


# --------------------------------------------------------------------- replicate AUROCs
# Paired comparisons across models, runs and seeds when only numbers leave a site.
#
# A site scores every model it is asked to evaluate on the same ``B`` resamples of its test split:
# replicate ``r`` resamples the split's patients with a generator seeded by (the split's seed, r),
# and the split's seed comes from the site's name and the split's own content (its labels and
# pseudonymous patient ids, in order): never from the model, the run or the job. So replicate r of
# model A and replicate r of model B, in one run or in two, are the same images, and the difference
# of the two numbers is a paired bootstrap replicate of the difference of the two AUROCs. The
# coordinator never learns the resamples (the pseudonyms are keyed by the site's secret).
#
# Resampling is by patient (the unit the splits are drawn by; a patient's images are not
# independent), stratified by the patient's highest label (for binary labels: whether the patient has
# a positive image), so every replicate has both classes whenever the split has.

REPLICATE_TAG = "dicomfl-auroc-replicates-v1"


def split_seed(site: str, labels, groups) -> tuple[int, int]:
    """(seed, id) of a test split's resamples: a 64-bit generator seed and a 36-bit id of the split.

    Both are digests of the site's name, the split's labels and its patient ids in order: the same
    split gives the same pair in every run, a changed split (a re-ingest) a different one. The id
    lets a comparison check that two sets of replicates were drawn from the same split.
    """
    y = np.asarray(labels, dtype=np.int64)
    h = hashlib.sha256(f"{REPLICATE_TAG}\0{site}\0{len(y)}\0".encode())
    h.update(y.tobytes())
    for g in groups:
        h.update(str(g).encode() + b"\0")
    d = h.digest()
    return int.from_bytes(d[:8], "big"), int.from_bytes(d[8:16], "big") >> (64 - REPLICATES_ID_BITS)


def replicate_indices(labels, groups, n_boot: int, seed: int) -> list[np.ndarray]:
    """``n_boot`` resamples of a split: replicate r draws, with replacement and with a generator seeded
    by ``(seed, r)``, as many patients as the split has in each stratum (patients grouped by their
    highest label) and takes all their images. Replicate r does not depend on ``n_boot``."""
    y = np.asarray(labels, dtype=np.int64)
    g = np.asarray([str(x) for x in groups])
    if len(g) != len(y):
        raise ValueError("labels and groups differ in length")
    if len(y) == 0:
        return [np.zeros(0, np.int64) for _ in range(n_boot)]
    _, inv = np.unique(g, return_inverse=True)
    order = np.argsort(inv, kind="stable")
    counts = np.bincount(inv)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    top = np.full(len(counts), np.iinfo(np.int64).min)
    np.maximum.at(top, inv, y)
    strata = [np.flatnonzero(top == s) for s in np.unique(top)]
    out = []
    for r in range(n_boot):
        rng = np.random.default_rng([seed, r])
        pick = np.concatenate([s[rng.integers(0, len(s), size=len(s))] for s in strata])
        sizes = counts[pick]
        offs = np.repeat(starts[pick] - np.concatenate([[0], np.cumsum(sizes)[:-1]]), sizes)
        out.append(order[offs + np.arange(int(sizes.sum()))])
    return out


def replicate_aurocs(y, p, indices: list[np.ndarray]) -> np.ndarray:
    """Binary AUROC (positives: label 1) of scores ``p`` on each resample; NaN where a resample
    lacks a class.

    The Mann-Whitney statistic from each resample's multiplicities: with the images sorted by score
    and grouped by tied scores, U = sum over groups of (positives in the group) x (negatives below it
    + half the negatives in it), so a resample costs O(n) however it is drawn."""
    y = np.asarray(y) == 1
    p = np.asarray(p, dtype=np.float64)
    out = np.full(len(indices), np.nan)
    n = len(p)
    if n == 0 or not len(indices):
        return out
    order = np.argsort(p, kind="stable")
    ps, ys = p[order], y[order]
    starts = np.flatnonzero(np.r_[True, ps[1:] != ps[:-1]])  # first position of each tie group
    rank_of = np.empty(n, np.int64)
    rank_of[order] = np.arange(n)
    block = max(1, _BLOCK_CELLS // n)
    for at in range(0, len(indices), block):
        rows = indices[at:at + block]
        w = np.zeros((len(rows), n))
        for k, idx in enumerate(rows):
            w[k] = np.bincount(rank_of[np.asarray(idx, dtype=np.int64)], minlength=n)
        pos = np.add.reduceat(w * ys, starts, axis=1)
        neg = np.add.reduceat(w * ~ys, starts, axis=1)
        below = np.cumsum(neg, axis=1) - neg
        u = (pos * (below + 0.5 * neg)).sum(axis=1)
        n_pos, n_neg = pos.sum(axis=1), neg.sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            out[at:at + len(rows)] = np.where((n_pos > 0) & (n_neg > 0), u / (n_pos * n_neg), np.nan)
    return out


# ---------------------------------------------------------------------- paired comparisons
BETTER, WORSE, UNSEPARABLE = "better", "worse", "not separable"


def verdict(lo: float, hi: float) -> str:
    """``better`` when the whole interval of A - B is above 0, ``worse`` when below, else ``not separable``."""
    if not (np.isfinite(lo) and np.isfinite(hi)):
        return UNSEPARABLE
    return BETTER if lo > 0 else WORSE if hi < 0 else UNSEPARABLE


def _seed_means(values: np.ndarray, seeds) -> tuple[np.ndarray, np.ndarray]:
    """Rows of ``values`` averaged per seed: (K, ...) and the K seeds (sorted)."""
    seeds = np.asarray(seeds)
    ks = np.unique(seeds)
    return np.stack([values[seeds == k].mean(axis=0) for k in ks]), ks


def hierarchical_difference(a, b, seeds, point_a=None, point_b=None, *, alpha: float = 0.05,
                            resample_seeds: bool = True, paired: bool = True, rng_seed: int = 0) -> dict:
    """Mean AUROC(A) - AUROC(B) over sites and training seeds, with a hierarchical bootstrap interval.

    Parameters
    ----------
    a, b : array (U, B)
        Replicate AUROCs of models A and B for U units (one site and one training seed each): row u,
        column r of both is the same resample of the same test split (:func:`replicate_indices`).
    seeds : array (U,)
        Each unit's training seed. Units of one seed are one training outcome per configuration.
    point_a, point_b : array (U,), optional
        The AUROCs on the whole test splits (the point estimate; default: the replicates' means).
    resample_seeds : bool
        Replicate r also draws the seeds with replacement (so the interval carries the training
        variance between seeds, not only the test-set sampling); the sites are fixed strata.
    paired : bool
        False pairs replicate r of A with a random other replicate of B: what an unpaired
        comparison (independent test resamples) would give. For comparison only.

    Returns
    -------
    dict
        ``diff`` (mean over seeds of the mean over sites), ``lo``, ``hi`` (percentile interval),
        ``units``, ``seeds``, ``verdict``; NaNs and ``not separable`` without units.
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    nan = float("nan")
    if a.ndim != 2 or a.shape != b.shape or a.shape[0] == 0 or a.shape[1] == 0:
        return {"diff": nan, "lo": nan, "hi": nan, "units": 0, "seeds": 0, "verdict": UNSEPARABLE}
    rng = np.random.default_rng([rng_seed, 0x5EED])
    if not paired:
        b = b[:, rng.permutation(b.shape[1])]
    d = a - b
    per_seed, ks = _seed_means(d, seeds)  # (K, B)
    K, B = per_seed.shape
    if resample_seeds and K > 1:
        w = np.stack([np.bincount(rng.integers(0, K, size=K), minlength=K) for _ in range(B)], axis=1)  # (K, B)
        reps = (per_seed * w).sum(axis=0) / K
    else:
        reps = per_seed.mean(axis=0)
    if point_a is not None and point_b is not None:
        pd, _ = _seed_means(np.asarray(point_a, np.float64) - np.asarray(point_b, np.float64), seeds)
        diff = float(pd.mean())
    else:
        diff = float(per_seed.mean())
    reps = reps[np.isfinite(reps)]
    if len(reps) == 0:
        return {"diff": diff, "lo": nan, "hi": nan, "units": int(a.shape[0]), "seeds": int(K), "verdict": UNSEPARABLE}
    lo, hi = (float(x) for x in np.quantile(reps, [alpha / 2, 1 - alpha / 2]))
    return {"diff": diff, "lo": lo, "hi": hi, "units": int(a.shape[0]), "seeds": int(K), "verdict": verdict(lo, hi)}
