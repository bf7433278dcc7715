"""Checks and robust-aggregation helpers for the sites' updates: pure NumPy, no Flower.

A site's update is the difference between the arrays it sends back and the global model it was
sent. Before anything is aggregated the coordinator can:

1. check each update's names, shapes, dtypes and values (:func:`update_problem`);
2. reject updates that moved too far, by two rules (:func:`norm_violations`):

   * an absolute bound, ``||w_site - w_global|| <= max_update_norm_rel * ||w_global||``, that
     works with one or two updates (the median rule cannot: with two sites the "median" is the
     mean of the honest and the bad update);
   * with three or more updates, the ratio to the round's median distance (:func:`norm_outliers`);

3. clip each remaining update to an L2 bound (:func:`clip_update`), which central DP and the
   robust-aggregation bounds assume;
4. cap any one site's share of the aggregation weight (:func:`cap_weight_shares`), so a site that
   claims a huge ``num-examples`` cannot take the round over;
5. in a SCAFFOLD run, check each control delta (:func:`control_problems`): an L2 norm bound, the
   ratio to the round's median, and that it is the site's model update scaled by one positive
   number, as :mod:`dicomfl.common.scaffold` defines it.

:func:`screen_updates` runs 2-4 in that order and says what it did to each site. A rejected
update is logged with the site's name and the (PHI-free) reason, and the round goes on with the
others.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

# The dtype rules are shared with the sites (a site refuses a coordinator's int or complex arrays
# by the same rule): defined in dicomfl.common.weights, re-exported here.
from dicomfl.common.weights import REAL_FLOAT_DTYPES, dtype_problem, is_real_float  # noqa: F401

Arrays = Mapping[str, np.ndarray]


def update_problem(arrays: Arrays, reference: Arrays) -> str | None:
    """Why this update cannot be aggregated (None if it can).

    Parameters
    ----------
    arrays : mapping of str to numpy.ndarray
        The site's arrays.
    reference : mapping of str to numpy.ndarray
        The global model's arrays (the names, shapes and dtypes to match).

    Returns
    -------
    str or None
        The first problem found: names differ, a shape differs, a dtype is not a real float (or,
        for non-float reference arrays, not the reference's dtype), or a value is NaN/infinite.
    """
    names, ref_names = set(arrays), set(reference)
    if names != ref_names:
        missing, extra = sorted(ref_names - names), sorted(names - ref_names)
        return f"parameter names differ (missing {missing[:2]}, unexpected {extra[:2]})"
    for k, ref in reference.items():
        a = arrays[k]
        if not isinstance(a, np.ndarray):
            return f"parameter {k} is not an array"
        if tuple(a.shape) != tuple(ref.shape):
            return f"parameter {k} has shape {tuple(a.shape)}, expected {tuple(ref.shape)}"
        why = dtype_problem(a.dtype, ref.dtype)
        if why:
            return f"parameter {k} has {why}"
        if a.dtype.kind == "f" and not np.all(np.isfinite(a)):
            return f"parameter {k} has NaN or infinite values"
    return None


def l2_norm(arrays: Arrays) -> float:
    """The L2 norm of all arrays taken together (float64 accumulation).

    Parameters
    ----------
    arrays : mapping of str to numpy.ndarray
        Real-valued arrays.

    Returns
    -------
    float
        ``sqrt(sum of squares)``; ``inf`` if it overflows.
    """
    total = 0.0
    for a in arrays.values():
        total += float(np.sum(np.square(np.asarray(a, dtype=np.float64))))
    return math.sqrt(total)


def distance(arrays: Arrays, reference: Arrays) -> float:
    """The L2 distance between an update and the reference, over the reference's names.

    Parameters
    ----------
    arrays : mapping of str to numpy.ndarray
        The site's arrays (already checked with :func:`update_problem`).
    reference : mapping of str to numpy.ndarray
        The global model the site was sent.

    Returns
    -------
    float
        ``||arrays - reference||_2``, computed in float64.
    """
    total = 0.0
    for k, ref in reference.items():
        total += float(np.sum(np.square(np.asarray(arrays[k], np.float64) - np.asarray(ref, np.float64))))
    return math.sqrt(total)


def norm_outliers(distances: Mapping[str, float], ratio: float) -> dict[str, str]:
    """Sites whose update distance is more than ``ratio`` x the median of the round's distances.

    Parameters
    ----------
    distances : mapping of str to float
        Each site's update distance (:func:`distance`).
    ratio : float
        The allowed multiple of the median; 0 or less turns the rule off.

    Returns
    -------
    dict of str to str
        The outlying sites and why. Empty with fewer than three distances (two cannot say which
        one is far) or a zero median.
    """
    if ratio <= 0 or len(distances) < 3:
        return {}
    med = float(np.median(list(distances.values())))
    if med <= 0:
        return {}
    return {s: f"update norm {d:.3g} is {d / med:.1f}x the round's median {med:.3g}"
            for s, d in distances.items() if d > ratio * med}


def norm_bound(global_norm: float, max_update_norm_rel: float, min_bound: float = 0.0) -> float:
    """The absolute bound on an update's distance: ``max(max_update_norm_rel * global_norm, min_bound)``.

    Parameters
    ----------
    global_norm : float
        ``||w_global||`` (:func:`l2_norm`).
    max_update_norm_rel : float
        Allowed distance as a multiple of the global model's norm; 0 or less means no bound.
    min_bound : float, optional
        A floor for the bound, for a global model whose norm is (near) zero.

    Returns
    -------
    float
        The bound; ``inf`` when the rule is off.
    """
    if max_update_norm_rel <= 0:
        return math.inf
    return max(max_update_norm_rel * global_norm, min_bound)


def norm_violations(distances: Mapping[str, float], global_norm: float, *, max_update_norm_rel: float,
                    max_update_norm_ratio: float = 0.0, min_bound: float = 0.0) -> dict[str, str]:
    """Sites whose update is too far from the global model, by the absolute and the median rule.

    The absolute rule (``distance <= max_update_norm_rel * global_norm``) applies to any number
    of updates, one included. The median rule (:func:`norm_outliers`) then applies to the updates
    that passed, when at least three did.

    Parameters
    ----------
    distances : mapping of str to float
        Each site's update distance.
    global_norm : float
        ``||w_global||``.
    max_update_norm_rel : float
        See :func:`norm_bound`; 0 turns the absolute rule off.
    max_update_norm_ratio : float, optional
        See :func:`norm_outliers`; 0 turns the median rule off.
    min_bound : float, optional
        Floor for the absolute bound.

    Returns
    -------
    dict of str to str
        Rejected sites and why.
    """
    bound = norm_bound(global_norm, max_update_norm_rel, min_bound)
    out = {s: f"update norm {d:.3g} exceeds the bound {bound:.3g} "
              f"({max_update_norm_rel:g}x the global model's norm {global_norm:.3g})"
           for s, d in distances.items() if not d <= bound}  # `not <=` also catches NaN
    rest = {s: d for s, d in distances.items() if s not in out}
    out.update(norm_outliers(rest, max_update_norm_ratio))
    return out


def clip_update(arrays: Arrays, reference: Arrays, max_norm: float) -> tuple[dict[str, np.ndarray], float]:
    """Scale ``arrays - reference`` down so its L2 norm is at most ``max_norm``.

    ``w' = w_global + (w_site - w_global) * min(1, max_norm / ||w_site - w_global||)``, computed
    in float64 and returned in each array's own dtype. The norm is over all arrays together
    (one update, one bound), as central DP's sensitivity and the robust-aggregation bounds assume.

    Parameters
    ----------
    arrays : mapping of str to numpy.ndarray
        The site's arrays (checked, same names as ``reference``).
    reference : mapping of str to numpy.ndarray
        The global model.
    max_norm : float
        The bound (> 0); ``inf`` leaves the update unchanged.

    Returns
    -------
    clipped : dict of str to numpy.ndarray
        The clipped arrays (new arrays; the inputs are not modified).
    scale : float
        The factor applied to the update, 1.0 when it was within the bound.
    """
    if not max_norm > 0:
        raise ValueError("max_norm must be > 0")
    d = distance(arrays, reference)
    scale = 1.0 if d <= max_norm else max_norm / d
    if scale == 1.0:
        return {k: np.array(arrays[k], copy=True) for k in reference}, 1.0
    out = {}
    for k, ref in reference.items():
        r = np.asarray(ref, np.float64)
        out[k] = (r + (np.asarray(arrays[k], np.float64) - r) * scale).astype(np.asarray(arrays[k]).dtype)
    return out, scale


def cap_weight_shares(weights: Mapping[str, float], max_share: float) -> dict[str, float]:
    """Lower the largest weights so no site's share of the total exceeds ``max_share``.

    Water-filling: the k largest weights are set to one common cap ``C`` and the others left as
    they are, with ``C = max_share * R / (1 - k * max_share)`` (``R`` the sum of the uncapped
    weights), for the smallest k at which the largest uncapped weight fits under ``C``. Capping
    one site raises the others' shares, which is why a single pass ("clip each at
    ``max_share * total``") is not enough: after it, the shares can still exceed the bound.

    When no assignment can meet the bound (``n * max_share < 1``, e.g. two sites and 0.4), all
    sites get equal weight, the closest one can get. Weights are never raised, so the result is
    on the sites' own scale (a capped weight is a number of examples a site could have had).

    Parameters
    ----------
    weights : mapping of str to float
        Each site's weight (validated ``num-examples``): finite, >= 0.
    max_share : float
        The largest share one site may have, in (0, 1]; 1 or more turns the cap off.

    Returns
    -------
    dict of str to float
        The capped weights, same keys.

    Raises
    ------
    ValueError
        On a negative or non-finite weight, or ``max_share <= 0``.
    """
    w = {s: float(v) for s, v in weights.items()}
    if any(not math.isfinite(v) or v < 0 for v in w.values()):
        raise ValueError("weights must be finite and >= 0")
    if not max_share > 0:
        raise ValueError("max_share must be > 0")
    pos = sorted((s for s in w if w[s] > 0), key=lambda s: w[s], reverse=True)
    n = len(pos)
    if max_share >= 1 or n <= 1:
        return w
    low = w[pos[-1]]
    equal = {s: (low if w[s] > 0 else 0.0) for s in w}
    if n * max_share <= 1:  # infeasible, or tight: equal shares are the best possible
        return equal
    rest = sum(w[s] for s in pos)
    for k in range(n):
        # the k largest are capped; pos[k] is the largest uncapped weight
        if k * max_share >= 1:
            break
        cap = max_share * rest / (1 - k * max_share)
        if w[pos[k]] <= cap:
            capped = set(pos[:k])
            return {s: (cap if s in capped else v) for s, v in w.items()}
        rest -= w[pos[k]]
    return equal  # not reached when n * max_share > 1; kept as the safe answer


@dataclass
class Screened:
    """What :func:`screen_updates` did to a round's updates.

    Attributes
    ----------
    arrays : dict of str to dict of str to numpy.ndarray
        The accepted sites' arrays, clipped where a clip bound was given.
    weights : dict of str to float
        The accepted sites' aggregation weights, after the share cap.
    rejected : dict of str to str
        Sites left out by the norm rules, and why.
    distances : dict of str to float
        Every site's update distance before clipping.
    clipped : dict of str to float
        The scale applied to each clipped update (only sites whose update was scaled down).
    capped : dict of str to float
        Each capped site's weight before the cap (only sites whose weight was lowered).
    global_norm : float
        ``||w_global||``.
    bound : float
        The absolute distance bound used (``inf`` when off).
    """

    arrays: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    weights: dict[str, float] = field(default_factory=dict)
    rejected: dict[str, str] = field(default_factory=dict)
    distances: dict[str, float] = field(default_factory=dict)
    clipped: dict[str, float] = field(default_factory=dict)
    capped: dict[str, float] = field(default_factory=dict)
    global_norm: float = 0.0
    bound: float = math.inf


def screen_updates(updates: Mapping[str, Arrays], weights: Mapping[str, float], reference: Arrays, *,
                   max_update_norm_rel: float = 0.0, max_update_norm_ratio: float = 0.0,
                   min_bound: float = 0.0, clip_update_norm: float | None = None,
                   max_weight_share: float = 1.0) -> Screened:
    """Norm rules, then clipping, then the weight-share cap, on one round's checked updates.

    Parameters
    ----------
    updates : mapping of str to mapping of str to numpy.ndarray
        Each site's arrays, already past :func:`update_problem`.
    weights : mapping of str to float
        Each site's validated ``num-examples`` (same keys as ``updates``).
    reference : mapping of str to numpy.ndarray
        The global model the sites were sent.
    max_update_norm_rel : float, optional
        Absolute rule: reject ``distance > max_update_norm_rel * ||w_global||`` (0: off).
    max_update_norm_ratio : float, optional
        Median rule, with >= 3 updates left (0: off).
    min_bound : float, optional
        Floor for the absolute bound.
    clip_update_norm : float or None, optional
        Clip each accepted update to this L2 norm (None: no clipping).
    max_weight_share : float, optional
        Cap on any one site's share of the weight (1.0: off).

    Returns
    -------
    Screened
        The accepted (clipped) arrays and capped weights, and what was rejected, clipped, capped.
    """
    gnorm = l2_norm(reference)
    res = Screened(global_norm=gnorm, bound=norm_bound(gnorm, max_update_norm_rel, min_bound))
    res.distances = {s: distance(a, reference) for s, a in updates.items()}
    res.rejected = norm_violations(res.distances, gnorm, max_update_norm_rel=max_update_norm_rel,
                                   max_update_norm_ratio=max_update_norm_ratio, min_bound=min_bound)
    for s, a in updates.items():
        if s in res.rejected:
            continue
        if clip_update_norm is not None and math.isfinite(clip_update_norm):
            clipped, scale = clip_update(a, reference, clip_update_norm)
            if scale < 1.0:
                res.clipped[s] = scale
            res.arrays[s] = clipped
        else:
            res.arrays[s] = dict(a)
    raw = {s: float(weights[s]) for s in res.arrays}
    res.weights = cap_weight_shares(raw, max_weight_share)
    res.capped = {s: raw[s] for s in raw if res.weights[s] < raw[s]}
    return res


#: Largest relative residual of ``delta_c + c`` against ``s (x - y)`` (:func:`control_problems`):
#: an honest site's is float32 rounding, about 1e-6.
CONTROL_RESIDUAL_TOL = 1e-3


def control_problems(deltas: Mapping[str, Arrays], updates: Mapping[str, Arrays], reference: Arrays,
                     control: Arrays, *, max_norm: float, max_ratio: float = 0.0) -> dict[str, str]:
    """SCAFFOLD control deltas that cannot be used, and why.

    Parameters
    ----------
    deltas : mapping of str to mapping of str to numpy.ndarray
        Each site's ``delta_c_i`` (already past the reply's schema checks).
    updates : mapping of str to mapping of str to numpy.ndarray
        Each site's model ``y_i`` as sent (before any clipping).
    reference : mapping of str to numpy.ndarray
        The global model ``x`` the sites were sent.
    control : mapping of str to numpy.ndarray
        The server control ``c`` the sites were sent.
    max_norm : float
        The largest ``||delta_c_i||``.
    max_ratio : float, optional
        With three or more deltas, reject one above this many times the median norm (0: off).

    Returns
    -------
    dict of str to str
        Rejected sites and why: a norm above the bound or an outlier, or a delta that is not
        ``(x - y_i) / (K lr) - c`` for a positive ``1 / (K lr)`` (relative residual above
        :data:`CONTROL_RESIDUAL_TOL`). Such a delta would carry something other than the update.
    """
    from dicomfl.common.scaffold import control_consistency

    out: dict[str, str] = {}
    norms = {s: l2_norm(d) for s, d in deltas.items()}
    for s, d in deltas.items():
        if not norms[s] <= max_norm:
            out[s] = f"control delta norm {norms[s]:.3g} exceeds run.max_control_norm {max_norm:g}"
            continue
        scale, residual = control_consistency(d, control, reference, updates[s])
        if not (scale > 0 and residual <= CONTROL_RESIDUAL_TOL):
            out[s] = (f"control delta is not the site's update scaled by a positive number "
                      f"(scale {scale:.3g}, residual {residual:.2g})")
    rest = {s: n for s, n in norms.items() if s not in out}
    out.update({s: "control delta " + why for s, why in norm_outliers(rest, max_ratio).items()})
    return out


# ------------------------------------------------------------- federated feature statistics
def stats_problem(stats: Mapping[str, float], features, num_examples: int) -> str | None:
    """What is wrong with a site's feature statistics (:mod:`dicomfl.common.fedstats`), or None.

    Each released feature needs all three numbers, finite: ``count`` a whole number in
    [0, num-examples]; ``sum`` of values in [0, 1] within [0, count]; ``sumsq`` within [0, sum] and
    at least sum^2 / count (Cauchy-Schwarz). The reason names the feature and the rule, never a value.
    """
    from dicomfl.common.fedstats import STAT_KINDS, stat_key

    for f in features:
        keys = [stat_key(k, f) for k in STAT_KINDS]
        if any(k not in stats for k in keys):
            return f"statistics of {f} are incomplete"
        c, s, ss = (float(stats[k]) for k in keys)
        if not all(math.isfinite(v) for v in (c, s, ss)):
            return f"statistics of {f} are not finite"
        if c < 0 or c != math.floor(c) or c > num_examples:
            return f"count.{f} is not a whole number in [0, num-examples]"
        tol = 1e-9 * max(1.0, c)
        if not -tol <= s <= c + tol:
            return f"sum.{f} is outside [0, count]"
        if not -tol <= ss <= s + tol:
            return f"sumsq.{f} is outside [0, sum]"
        if s * s > c * ss * (1 + 1e-9) + tol:
            return f"sumsq.{f} is below sum^2 / count"
    return None
