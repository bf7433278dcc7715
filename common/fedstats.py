"""Metadata the sites agree on: continuous features standardized the same way at every site, from
federated statistics, and features a run drops.

The feature schema (:mod:`~dicomfl.common.features`) gives each numeric feature a value column
(already transformed to a small fixed scale) and a missing indicator. Before round 1 the
coordinator asks every site for three numbers per numeric feature over the site's *training*
split only (never validation or test), on the images where the feature is present:

* ``count.<f>``: how many training images have the feature;
* ``sum.<f>``: the sum of ``u = (clip(x, lo, hi) - lo) / (hi - lo)``, the value clipped to the
  feature's documented range (:data:`RANGES`) and mapped to [0, 1];
* ``sumsq.<f>``: the sum of ``u**2``.

One image changes each of these numbers by at most 1, so the whole vector (3 numbers for each of
``d`` released features) has L2 sensitivity ``sqrt(3 d)``; that is what the Gaussian mechanism
of a site under DP is calibrated to (:mod:`dicomfl.client.fedstats`).

The coordinator adds the sites' numbers (:func:`combine`), turns them into a mean and a standard
deviation per feature in the feature's own units (:func:`global_standardization`; a feature no
site reports falls back to the middle of its range and half its width, and a standard deviation
is never below 1% of the range), and sends both lists with every train and evaluate message.
Every site then maps each value the same way (:class:`FeatureTransform`)::

    z = clip((clip(x, lo, hi) - mean) / std, -Z_CLIP, Z_CLIP), and z = 0 where the feature is missing

Dropping features: a run may name schema features (``model.drop_features``: numeric names such as
``pixel_spacing_mm`` or categorical groups such as ``modality``) that act as site proxies or
confounders; their columns, value and missing indicator or every one-hot column, are zero at every
site, in training, evaluation and prediction alike, and their statistics are never computed or
released.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np

from .cache import LazyRows, take_rows
from .features import CATEGORICAL, NUMERIC, feature_names

#: The documented range of each numeric feature, in the schema's transformed units (see
#: :data:`~dicomfl.common.features.NUMERIC`): values are clipped to it before anything is summed
#: or standardized. It bounds what one image can add to a released sum.
RANGES: dict[str, tuple[float, float]] = {
    "patient_age_years": (0.0, 1.2),  # years / 100
    "pixel_spacing_mm": (0.0, 2.0),  # mm
    "slice_thickness_mm": (0.0, 5.0),  # cm
    "kvp": (0.0, 2.0),  # kVp / 100
    "exposure_mas": (0.0, 2.4),  # log1p(mAs) / 5
    "bits_stored": (0.0, 2.0),  # bits / 16
    "rows": (0.0, 4.0),  # pixels / 4096
    "columns": (0.0, 4.0),
    "frames": (0.0, 2.5),  # log1p(frames) / 5
    "pixel_signed": (0.0, 1.0),
    "rescale_intercept": (-4.0, 4.0),  # / 1024
    "rescale_slope": (-4.0, 4.0),
}
NUMERIC_NAMES: tuple[str, ...] = tuple(n.name for n in NUMERIC)
Z_CLIP = 5.0  # standardized values are clipped to +-Z_CLIP
STD_FLOOR = 0.01  # the smallest standard deviation, as a fraction of the feature's range
STAT_KINDS = ("count", "sum", "sumsq")

assert set(RANGES) == set(NUMERIC_NAMES), "every numeric feature needs a documented range"


def feature_groups() -> dict[str, list[int]]:
    """Schema feature name -> its columns in the feature vector (what ``drop_features`` names)."""
    names = feature_names()
    groups: dict[str, list[int]] = {}
    for n in NUMERIC:
        groups[n.name] = [names.index(n.name), names.index(f"{n.name}__missing")]
    for c in CATEGORICAL:
        groups[c.name] = [i for i, col in enumerate(names) if col.startswith(f"{c.name}=")]
    return groups


def check_drop_features(names: Iterable[str]) -> list[str]:
    """The names, sorted and unique, if every one is a schema feature; else ValueError naming the first
    unknown one (schema v1's names are letters, digits and '_', so the name is safe to show)."""
    groups = feature_groups()
    out = []
    for name in names:
        if name not in groups:
            shown = name if isinstance(name, str) and name.isidentifier() and len(name) <= 64 else "(a name)"
            raise ValueError(f"unknown feature {shown}; schema features: {', '.join(groups)}")
        out.append(name)
    return sorted(set(out))


def released(drop: Iterable[str] = ()) -> tuple[str, ...]:
    """The numeric features whose statistics a run exchanges (every one it does not drop), in schema order."""
    dropped = set(drop)
    return tuple(n for n in NUMERIC_NAMES if n not in dropped)


def stat_key(kind: str, feature: str) -> str:
    return f"{kind}.{feature}"


def stat_keys(features: Iterable[str]) -> frozenset[str]:
    """The metric keys of a stats reply for ``features``."""
    return frozenset(stat_key(k, f) for f in features for k in STAT_KINDS)


def _unit(x: np.ndarray, feature: str) -> np.ndarray:
    lo, hi = RANGES[feature]
    return (np.clip(x, lo, hi) - lo) / (hi - lo)


def sums(rows: Iterable[np.ndarray], features: Iterable[str]) -> dict[str, float]:
    """Exact ``count``/``sum``/``sumsq`` of each feature over the feature rows given (blocks of an
    (N, F) array: the training split), in float64."""
    features = tuple(features)
    groups = feature_groups()
    acc = {f: [0.0, 0.0, 0.0] for f in features}
    for block in rows:
        block = np.asarray(block, dtype=np.float64)
        for f in features:
            value, missing = groups[f]
            present = block[:, missing] < 0.5
            u = _unit(block[present, value], f)
            a = acc[f]
            a[0] += float(present.sum())
            a[1] += float(u.sum())
            a[2] += float((u * u).sum())
    return {stat_key(k, f): acc[f][i] for f in features for i, k in enumerate(STAT_KINDS)}


@dataclass(frozen=True)
class Pooled:
    """Combined statistics of one feature, in its own units."""

    count: float
    mean: float
    std: float


def combine(site_stats: Iterable[Mapping[str, float]], features: Iterable[str]) -> dict[str, Pooled]:
    """The sites' (already audited) statistics added up, per feature: count, mean and (population)
    standard deviation in the feature's units. A feature with no count has mean and std NaN."""
    features = tuple(features)
    tot = {f: [0.0, 0.0, 0.0] for f in features}
    for st in site_stats:
        for f in features:
            for i, k in enumerate(STAT_KINDS):
                tot[f][i] += float(st[stat_key(k, f)])
    out = {}
    for f in features:
        c, s, ss = tot[f]
        lo, hi = RANGES[f]
        if c <= 0:
            out[f] = Pooled(0.0, math.nan, math.nan)
            continue
        mu = s / c
        var = max(ss / c - mu * mu, 0.0)
        out[f] = Pooled(c, lo + (hi - lo) * mu, (hi - lo) * math.sqrt(var))
    return out


def global_standardization(pooled: Mapping[str, Pooled]) -> tuple[list[float], list[float]]:
    """The (mean, std) lists the coordinator sends, one entry per numeric feature in schema order.

    A feature without statistics (dropped, or reported by no site) gets the middle of its range and
    half its width; every mean is within the range and every std within
    [``STD_FLOOR`` x range, range], which is what a site accepts (:func:`check_standardization`).
    """
    means, stds = [], []
    for f in NUMERIC_NAMES:
        lo, hi = RANGES[f]
        p = pooled.get(f)
        if p is None or p.count <= 0 or not math.isfinite(p.mean):
            means.append((lo + hi) / 2)
            stds.append((hi - lo) / 2)
            continue
        means.append(min(max(p.mean, lo), hi))
        stds.append(min(max(p.std, STD_FLOOR * (hi - lo)), hi - lo))
    return means, stds


def check_standardization(mean, std) -> tuple[np.ndarray, np.ndarray]:
    """The mean and std lists as a site accepts them: one finite number per numeric feature, each
    mean within the feature's range, each std within [STD_FLOOR x range, range]. ValueError (naming
    the list and the feature, never the value) otherwise."""
    n = len(NUMERIC_NAMES)
    out = []
    from .protocol import FEATURE_MEAN, FEATURE_STD

    for key, values in ((FEATURE_MEAN, mean), (FEATURE_STD, std)):
        if not isinstance(values, (list, tuple)) or len(values) != n:
            raise ValueError(f"{key}: not a list of {n} numbers")
        arr = []
        for f, v in zip(NUMERIC_NAMES, values):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(float(v)):
                raise ValueError(f"{key}: {f} is not a finite number")
            lo, hi = RANGES[f]
            tol = 1e-9 * (hi - lo)
            if key == FEATURE_MEAN and not lo - tol <= v <= hi + tol:
                raise ValueError(f"{key}: {f} is outside the feature's range")
            if key == FEATURE_STD and not STD_FLOOR * (hi - lo) - tol <= v <= (hi - lo) + tol:
                raise ValueError(f"{key}: {f} is outside [{STD_FLOOR:g}, 1] x the feature's range")
            arr.append(float(v))
        out.append(np.asarray(arr, dtype=np.float32))
    return out[0], out[1]


@dataclass(frozen=True)
class FeatureTransform:
    """What every site does to a feature row before the model sees it: standardize the numeric
    values with the run's global mean and std (when given) and zero the dropped features' columns.
    """

    mean: "np.ndarray | None" = None  # one per numeric feature (schema order), the features' units
    std: "np.ndarray | None" = None
    drop: tuple[str, ...] = ()

    @property
    def identity(self) -> bool:
        return self.mean is None and not self.drop

    def apply(self, features: np.ndarray) -> np.ndarray:
        """A transformed copy of an (N, F) block of feature rows (float32)."""
        x = np.array(features, dtype=np.float32, copy=True)
        if x.ndim != 2 or len(x) == 0:
            return x
        groups = feature_groups()
        if self.mean is not None:
            for i, f in enumerate(NUMERIC_NAMES):
                value, missing = groups[f]
                lo, hi = RANGES[f]
                z = (np.clip(x[:, value], lo, hi) - self.mean[i]) / self.std[i]
                x[:, value] = np.where(x[:, missing] >= 0.5, 0.0, np.clip(z, -Z_CLIP, Z_CLIP))
        for f in self.drop:
            x[:, groups[f]] = 0.0
        return x


class TransformedRows(LazyRows):
    """A lazy (N, F) feature view with a :class:`FeatureTransform` applied to the rows read."""

    def __init__(self, base, transform: FeatureTransform) -> None:
        super().__init__(len(base), tuple(base.shape[1:]))
        self.base = base
        self.transform = transform

    def take(self, idx: np.ndarray) -> np.ndarray:
        return self.transform.apply(take_rows(self.base, idx))


def iter_blocks(rows, block: int = 65536):
    """Blocks of at most ``block`` rows of an (N, F) array or lazy view (bounded memory)."""
    n = len(rows)
    for at in range(0, n, block):
        yield take_rows(rows, np.arange(at, min(n, at + block)))
