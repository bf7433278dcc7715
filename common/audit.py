"""The cross-site shortcut audit, at one site: how each feature goes with the label *here*.

A model that fuses pixels with acquisition metadata can learn how a hospital acquires its images
instead of the disease. The audit finds such fields the way a multicenter meta-analysis does: each
site estimates, on its own training split, the association of every audited feature with the
label (an effect size with its standard error), and the coordinator combines the sites' estimates
(:mod:`dicomfl.server.audit`): a feature strong at some sites and absent or reversed at others is
a site-specific shortcut; one that tells the sites apart while their label rates differ is a site
proxy. Nothing here names a feature to drop; the data decide.

Audited features (:func:`audit_features`):

* every numeric feature of the schema (:data:`~dicomfl.common.features.NUMERIC`), on the images
  where it is present, in the schema's transformed units clipped to its documented range
  (:data:`~dicomfl.common.fedstats.RANGES`); effect: the standardized mean difference of
  positives minus negatives, Hedges' g (small-sample corrected), with its usual large-sample
  standard error ``sqrt((n1 + n0) / (n1 n0) + g^2 / (2 (n1 + n0)))``;
* every one-hot level of every categorical group (``modality=CR``, ``view_position=AP``, ...; a
  space in a level becomes ``_``); effect: the log odds ratio of the label with and without the
  level, with the Haldane-Anscombe correction (0.5 added to every cell) and its Woolf standard
  error ``sqrt(1/a + 1/b + 1/c + 1/d)``;
* four image statistics a shortcut can ride on, from what the ingest cache already holds (nothing
  is read from the DICOM files again): ``image_mean`` (the mean of the cached image in
  modality-LUT units, before robust scaling), ``image_range`` (its p99 - p1, the cache's scaling
  statistic: the stored-value range after the modality LUT, robust to outliers), ``image_noise``
  (Immerkaer's Laplacian noise estimate of the cached image divided by that range) and
  ``field_of_view_mm`` (rows x pixel spacing, from the two features). The cache holds images
  resized to ``preprocess.image_size``, so the noise is that of the resized image, and the raw
  stored min/max (before the modality LUT) is not cached: it is not audited. These four are not
  model inputs: a flag on them is a warning, never a dropped feature.

What a site sends, per audited feature ``f`` (:func:`audit_key`): ``audit.<f>.effect``,
``audit.<f>.se``, ``audit.<f>.n`` (labelled training images with the feature present),
``audit.<f>.mean`` and ``audit.<f>.var`` (the feature's mean and population variance over those
images, in the feature's own units: what the coordinator's between-site share needs), plus
``audit.label.n`` and ``audit.label.mean`` (labelled training images and their positive rate). A
site where a feature does not vary within a class pair (constant, or one class without it) cannot
estimate its effect: it sends ``effect`` 0 and ``se`` 0, which the coordinator reads as "not
estimable here" and leaves out of the meta-analysis (its mean and var still count).

Everything is computed from per-class sufficient statistics (:func:`site_sums`: for each feature
and each class, the count, sum and sum of squares of the value mapped to [0, 1]); the released
numbers are a function of them alone (:func:`summarize`), which is what makes the DP release
(:func:`noisy_sums`) a post-processed Gaussian mechanism.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np

from .cache import take_rows
from .features import CATEGORICAL, NUMERIC, feature_names
from .fedstats import RANGES, feature_groups
from .splits import TRAIN

KINDS = ("effect", "se", "n", "mean", "var")
LABEL = "label"
#: The image statistics audited, with the range each is clipped to (their own units).
IMAGE_RANGES: dict[str, tuple[float, float]] = {
    "image_mean": (-4096.0, 65536.0),  # modality-LUT units
    "image_range": (0.0, 65536.0),  # p99 - p1, modality-LUT units
    "image_noise": (0.0, 1.0),  # noise / (p99 - p1)
    "field_of_view_mm": (0.0, 1000.0),  # rows x pixel spacing
}
IMAGE_STATS: tuple[str, ...] = tuple(IMAGE_RANGES)
_BLOCK = 256  # rows read from the cache at a time
#: Within-class variance (of values mapped to [0, 1]) below which a feature counts as constant:
#: sums of n equal float64 values leave a rounding residue far above 0 and far below this.
_VAR_FLOOR = 1e-10


def _level_id(group: str, level: str) -> str:
    return f"{group}={level.replace(' ', '_')}"


def _levels() -> list[tuple[str, str, int]]:
    """(feature id, schema group, column) of every categorical one-hot level."""
    names = feature_names()
    out = []
    for c in CATEGORICAL:
        for level in (*c.categories, "other", "missing"):
            out.append((_level_id(c.name, level), c.name, names.index(f"{c.name}={level}")))
    return out


def audit_features() -> tuple[str, ...]:
    """Every audited feature id, in a fixed order: numeric schema features, categorical levels,
    image statistics."""
    return tuple(n.name for n in NUMERIC) + tuple(f for f, _, _ in _levels()) + IMAGE_STATS


def schema_feature(feature: str) -> str | None:
    """The schema feature (what ``model.drop_features`` names) an audited feature belongs to:
    a numeric name, a categorical group, or None for an image statistic (not a model input)."""
    if feature in RANGES:
        return feature
    for f, group, _ in _levels():
        if f == feature:
            return group
    return None


def is_binary(feature: str) -> bool:
    """A categorical level (effect: log odds ratio) rather than a continuous value (Hedges' g)."""
    return "=" in feature


def feature_range(feature: str) -> tuple[float, float]:
    if feature in RANGES:
        return RANGES[feature]
    if feature in IMAGE_RANGES:
        return IMAGE_RANGES[feature]
    return (0.0, 1.0)


def audit_key(feature: str, kind: str) -> str:
    """``audit.<feature>.<kind>``, kind one of :data:`KINDS` (``label`` has only n and mean)."""
    return f"audit.{feature}.{kind}"


def audit_keys(features: Iterable[str] | None = None) -> frozenset[str]:
    """Every metric key of a site's audit reply (for the protocol's list of what may leave a site)."""
    features = audit_features() if features is None else tuple(features)
    keys = {audit_key(f, k) for f in features for k in KINDS}
    return frozenset(keys | {audit_key(LABEL, "n"), audit_key(LABEL, "mean")})


# ------------------------------------------------------------------------------ the values


def _immerkaer(block: np.ndarray) -> np.ndarray:
    """Immerkaer's (1996) noise standard deviation of each image of an (B, S, S) block: the mean
    absolute response to the Laplacian difference mask [[1,-2,1],[-2,4,-2],[1,-2,1]] (which
    cancels smooth structure) times sqrt(pi/2) / 6."""
    x = block.astype(np.float64)
    r = (x[:, :-2, :-2] - 2 * x[:, :-2, 1:-1] + x[:, :-2, 2:]
         - 2 * x[:, 1:-1, :-2] + 4 * x[:, 1:-1, 1:-1] - 2 * x[:, 1:-1, 2:]
         + x[:, 2:, :-2] - 2 * x[:, 2:, 1:-1] + x[:, 2:, 2:])
    return math.sqrt(math.pi / 2) / 6.0 * np.abs(r).mean(axis=(1, 2))


def feature_values(features: np.ndarray, stats: np.ndarray | None = None,
                   images: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(values, present) of every audited feature for a block of rows, (B, A) each, values in the
    feature's own units clipped to its range (NaN where absent). An image statistic whose input is
    not given (``stats`` or ``images`` None) is absent everywhere."""
    f = np.asarray(features, dtype=np.float64)
    b = f.shape[0]
    groups = feature_groups()
    cols: list[np.ndarray] = []
    for n in NUMERIC:
        value, missing = groups[n.name]
        lo, hi = RANGES[n.name]
        cols.append(np.where(f[:, missing] < 0.5, np.clip(f[:, value], lo, hi), np.nan))
    for _, _, col in _levels():
        cols.append((f[:, col] > 0.5).astype(np.float64))
    nan = np.full(b, np.nan)
    rng_ = nan
    if stats is not None:
        s = np.asarray(stats, dtype=np.float64)
        rng_ = np.where(np.isfinite(s[:, 1]) & (s[:, 1] > 0), s[:, 1], np.nan)
    if images is not None:
        im = np.asarray(images, dtype=np.float64)
        mean = im.reshape(b, -1).mean(axis=1)
        noise = _immerkaer(im) / rng_ if im.shape[-1] >= 3 else nan
    else:
        mean, noise = nan, nan
    rows, rmiss = groups["rows"]
    sp, smiss = groups["pixel_spacing_mm"]
    fov = np.where((f[:, rmiss] < 0.5) & (f[:, smiss] < 0.5), f[:, rows] * 4096.0 * f[:, sp], np.nan)
    for name, v in (("image_mean", mean), ("image_range", rng_), ("image_noise", noise), ("field_of_view_mm", fov)):
        lo, hi = IMAGE_RANGES[name]
        cols.append(np.where(np.isfinite(v), np.clip(v, lo, hi), np.nan))
    values = np.stack(cols, axis=1)
    return values, np.isfinite(values)


# ------------------------------------------------------------------- sufficient statistics


@dataclass(frozen=True)
class ClassSums:
    """Per audited feature and class (index 0 negatives, 1 positives): count, sum and sum of
    squares of the value mapped to [0, 1] by its range; and the labelled images per class."""

    features: tuple[str, ...]
    count: np.ndarray  # (A, 2)
    sum: np.ndarray  # (A, 2)
    sumsq: np.ndarray  # (A, 2)
    labels: np.ndarray  # (2,)


def site_sums(features, labels, stats=None, images=None, rows: np.ndarray | None = None) -> ClassSums:
    """The exact per-class sums over ``rows`` (default: every labelled row) of a site's cache views
    (lazy rows or arrays: read ``_BLOCK`` rows at a time). Unlabelled rows (label < 0) never count."""
    labels = np.asarray(labels).reshape(-1)
    rows = np.flatnonzero(labels >= 0) if rows is None else np.asarray(rows, dtype=np.int64)
    rows = rows[labels[rows] >= 0]
    names = audit_features()
    a = len(names)
    lo = np.array([feature_range(f)[0] for f in names])
    width = np.array([feature_range(f)[1] - feature_range(f)[0] for f in names])
    count, tot, totsq = np.zeros((a, 2)), np.zeros((a, 2)), np.zeros((a, 2))
    nlab = np.zeros(2)
    for start in range(0, len(rows), _BLOCK):
        idx = rows[start:start + _BLOCK]
        y = (labels[idx] > 0).astype(int)
        vals, present = feature_values(take_rows(features, idx),
                                       None if stats is None else take_rows(stats, idx),
                                       None if images is None else take_rows(images, idx))
        u = np.where(present, (np.nan_to_num(vals) - lo) / width, 0.0)
        for c in (0, 1):
            m = y == c
            nlab[c] += m.sum()
            count[:, c] += present[m].sum(axis=0)
            tot[:, c] += u[m].sum(axis=0)
            totsq[:, c] += (u[m] ** 2).sum(axis=0)
    return ClassSums(names, count, tot, totsq, nlab)


def sensitivity(n_features: int) -> float:
    """L2 sensitivity of the sums vector of ``n_features`` audited features: one image is in one
    class, so it changes its class's label count by 1 and, for each feature, at most that class's
    count, sum and sum of squares, each by at most 1 (values are clipped to [0, 1]):
    ``sqrt(3 n_features + 1)``."""
    return math.sqrt(3 * n_features + 1)


def noisy_sums(exact: ClassSums, sigma: float, rng: np.random.Generator | None = None) -> tuple[ClassSums, float]:
    """The Gaussian mechanism on a site's sums; returns (noisy sums, sigma).

    Sensitivity (add/remove one labelled image): the image's label is one class ``c``; it adds 1
    to ``labels[c]`` and, for every audited feature ``f`` where it is present, 1 to
    ``count[f, c]``, ``u`` to ``sum[f, c]`` and ``u^2`` to ``sumsq[f, c]`` with ``u`` in [0, 1]
    (the value clipped to the feature's range and mapped to [0, 1]); nothing else moves. So the
    L2 change of the whole vector (6 A + 2 numbers for A features) is at most
    ``sqrt(3 A + 1)`` (:func:`sensitivity`). Every number gets N(0, (sigma x sqrt(3 A + 1))^2)
    noise, drawn from OS entropy unless ``rng`` is given: one full-batch Gaussian release with
    noise multiplier ``sigma``, to be charged to the site's accountant as ``(sigma, 1.0, 1)``.

    Post-processing (free under DP): counts rounded and clamped to [0, labels of the class], sums
    to [0, count] and sums of squares to [sum^2 / count, sum], as every exact triple satisfies.

    The effects computed from noisy sums carry the DP noise; :func:`site_audit` adds it to their
    standard errors (:func:`with_noise_se`), so noise does not pass for heterogeneity. A feature
    whose spread is small against its range still loses its within-class variance to the noise
    on the sums of squares: one release of every audited feature is coarse at small sites.
    """
    if not (isinstance(sigma, (int, float)) and math.isfinite(sigma) and sigma > 0):
        raise ValueError("audit noise multiplier must be a positive number")
    rng = rng or np.random.default_rng(secrets.randbits(128))
    scale = float(sigma) * sensitivity(len(exact.features))

    def noise(a: np.ndarray) -> np.ndarray:
        return a + rng.normal(0.0, scale, a.shape)

    labels = np.maximum(np.round(noise(exact.labels)), 0.0)
    count = np.clip(np.round(noise(exact.count)), 0.0, labels[None, :])
    tot = np.clip(noise(exact.sum), 0.0, count)
    with np.errstate(divide="ignore", invalid="ignore"):
        floor = np.where(count > 0, tot * tot / np.maximum(count, 1.0), 0.0)
    totsq = np.clip(noise(exact.sumsq), floor, tot)
    return ClassSums(exact.features, count, tot, totsq, labels), float(sigma)


# ---------------------------------------------------------------------------- the estimates


def hedges_g(n1: float, m1: float, v1: float, n0: float, m0: float, v0: float) -> tuple[float, float] | None:
    """Hedges' g (positives minus negatives) and its standard error from each class's count, mean
    and sample variance (of values mapped to [0, 1]); None when it cannot be estimated (a class
    with under 2 values, or no within-class spread)."""
    if n1 < 2 or n0 < 2:
        return None
    pooled = ((n1 - 1) * v1 + (n0 - 1) * v0) / (n1 + n0 - 2)
    if not pooled > _VAR_FLOOR:
        return None
    j = 1.0 - 3.0 / (4.0 * (n1 + n0) - 9.0)
    g = j * (m1 - m0) / math.sqrt(pooled)
    se = math.sqrt((n1 + n0) / (n1 * n0) + g * g / (2.0 * (n1 + n0)))
    return g, se


def log_odds_ratio(a: float, b: float, c: float, d: float) -> tuple[float, float] | None:
    """Log odds ratio of the label with vs without a level (a: positives with it, b: positives
    without, c: negatives with, d: negatives without), Haldane-Anscombe corrected, and its Woolf
    standard error; None when the level is at every image or at none, or a class is empty."""
    if a + c <= 0 or b + d <= 0 or a + b <= 0 or c + d <= 0:
        return None
    a, b, c, d = a + 0.5, b + 0.5, c + 0.5, d + 0.5
    return math.log(a * d / (b * c)), math.sqrt(1 / a + 1 / b + 1 / c + 1 / d)


def summarize(s: ClassSums) -> dict[str, float]:
    """The audit reply (see the module docstring) from a site's sums, exact or noisy."""
    out: dict[str, float] = {}
    for i, f in enumerate(s.features):
        lo, hi = feature_range(f)
        w = hi - lo
        n0, n1 = float(s.count[i, 0]), float(s.count[i, 1])
        s0, s1 = float(s.sum[i, 0]), float(s.sum[i, 1])
        q0, q1 = float(s.sumsq[i, 0]), float(s.sumsq[i, 1])
        est = None
        if is_binary(f):
            est = log_odds_ratio(s1, n1 - s1, s0, n0 - s0)
        elif n1 >= 2 and n0 >= 2:
            m1, m0 = s1 / n1, s0 / n0
            v1 = max(q1 - n1 * m1 * m1, 0.0) / (n1 - 1)
            v0 = max(q0 - n0 * m0 * m0, 0.0) / (n0 - 1)
            est = hedges_g(n1, m1, v1, n0, m0, v0)
        n = n0 + n1
        mean_u = (s0 + s1) / n if n > 0 else 0.0
        var_u = max((q0 + q1) / n - mean_u * mean_u, 0.0) if n > 0 else 0.0
        effect, se = est if est is not None else (0.0, 0.0)
        out[audit_key(f, "effect")] = float(effect)
        out[audit_key(f, "se")] = float(se)
        out[audit_key(f, "n")] = n
        out[audit_key(f, "mean")] = float(lo + w * mean_u)
        out[audit_key(f, "var")] = float(w * w * var_u)
    nl = float(s.labels.sum())
    out[audit_key(LABEL, "n")] = nl
    out[audit_key(LABEL, "mean")] = float(s.labels[1] / nl) if nl > 0 else 0.0
    return out


def site_audit(features, labels, stats=None, images=None, rows=None, *, sigma: float | None = None,
               rng: np.random.Generator | None = None) -> tuple[dict[str, float], float | None]:
    """A site's audit reply and the noise multiplier used (None: exact, no DP). ``rows``: the
    rows to audit, the training split (default: every labelled row)."""
    sums = site_sums(features, labels, stats, images, rows)
    if sigma is None:
        return summarize(sums), None
    noisy, used = noisy_sums(sums, sigma, rng)
    return with_noise_se(summarize(noisy), noisy, used, rng), used


DP_DRAWS = 64


def with_noise_se(reply: dict[str, float], noisy: ClassSums, sigma: float,
                  rng: np.random.Generator | None = None) -> dict[str, float]:
    """A noisy reply whose standard errors also carry the DP noise: the released sums are noised
    again ``DP_DRAWS`` times with the same mechanism (a parametric bootstrap of the noise around
    the released point) and the variance of the effect over those draws is added to each
    estimable effect's squared SE. It reads only the released sums and the public sigma, so it
    is post-processing and costs no privacy."""
    draws = [summarize(noisy_sums(noisy, sigma, rng)[0]) for _ in range(DP_DRAWS)]
    out = dict(reply)
    for f in noisy.features:
        ke, ks = audit_key(f, "effect"), audit_key(f, "se")
        eff = [d[ke] for d in draws if d[ks] > 0]
        if out[ks] > 0 and len(eff) >= 2:
            out[ks] = math.sqrt(out[ks] ** 2 + float(np.var(eff, ddof=1)))
    return out


def site_audit_of(data, *, sigma: float | None = None, rng: np.random.Generator | None = None
                  ) -> tuple[dict[str, float], float | None]:
    """:func:`site_audit` of an ingested site's :class:`~dicomfl.common.ingest.report.SiteData`,
    over its training split only (validation and test stay out of every choice of features)."""
    return site_audit(data.features, data.labels, data.stats, data.images, data.subset(TRAIN),
                      sigma=sigma, rng=rng)


# ------------------------------------------------------------------ reading a site's reply


@dataclass(frozen=True)
class SiteEstimate:
    effect: float
    se: float  # 0: not estimable at this site
    n: float
    mean: float
    var: float

    @property
    def estimable(self) -> bool:
        return self.se > 0


def parse_reply(metrics: Mapping[str, float], features: Iterable[str] | None = None
                ) -> tuple[dict[str, SiteEstimate], tuple[float, float]]:
    """A site's audit reply as ({feature: SiteEstimate}, (label n, label rate)), checked as hostile
    input: every key present and a finite number, n >= 0, se >= 0, var >= 0, the rate in [0, 1];
    else ValueError naming the key (never the value)."""
    features = audit_features() if features is None else tuple(features)

    def num(key: str) -> float:
        v = metrics.get(key) if isinstance(metrics, Mapping) else None
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(float(v)):
            raise ValueError(f"{key}: missing or not a finite number")
        return float(v)

    out = {}
    for f in features:
        e = SiteEstimate(*(num(audit_key(f, k)) for k in KINDS))
        for k in ("se", "n", "var"):
            if getattr(e, k) < 0:
                raise ValueError(f"{audit_key(f, k)}: negative")
        out[f] = e
    n, rate = num(audit_key(LABEL, "n")), num(audit_key(LABEL, "mean"))
    if n < 0 or not 0.0 <= rate <= 1.0:
        raise ValueError(f"{audit_key(LABEL, 'n')}/{audit_key(LABEL, 'mean')}: out of range")
    return out, (n, rate)
