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

The rules that hold by default (:class:`ScreenRules`, from the run's ``run:`` section) add to 2-3:

* free riders (:func:`free_riders`): an update at (almost) zero distance from the global model, or
  with three or more updates one far below the round's median, is rejected as ``free-rider``: it
  would only dilute the others' step, and with a large ``num-examples`` claim take a large share;
* the median rule (:func:`norm_outliers`; ``max_update_median_ratio``) at a ratio that a x9 sign
  flip or x5 noise of one site in three exceeds (the round's median is then an honest distance);
* a clip bound relative to the round (:func:`relative_clip_bound`): every accepted update is
  clipped (not rejected) to ``clip_update_median_ratio`` x the round's median update distance
  (with two updates, the smaller one), so a large honest update still counts, in its direction,
  and an attacker under the median rule moves the model by at most that many honest steps;
* optionally (off by default), direction (:func:`direction_outliers`), with three or more
  updates: an update whose cosine with the round's coordinate-wise median update is below
  ``min_update_cosine`` is rejected. It is off because with three sites on differing data the
  honest updates can be nearly orthogonal to each other (some pairwise cosines negative), and
  the coordinate-wise median of three leans, coordinate by coordinate, towards the outlier's
  side: a x9 sign-flipped update then keeps a positive cosine with it, no lower than an honest
  one's (benchmarks/results/2026-12-04-robust-default.md). The mean of the others is worse: one
  large update drags it, and the honest sites' cosines with it.

With two sites nobody can tell which of two disagreeing updates is honest: only the absolute
bound, the relative clip and the weight cap apply; the median and direction rules need >= 3.

:func:`screen_updates` runs 2-4 in that order (the free-rider rule first, the direction rule
after the norm rules) and says what it did to each site. A rejected
update is logged with the site's name and the (PHI-free) reason, and the round goes on with the
others.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

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


def free_riders(distances: Mapping[str, float], global_norm: float, *, rel: float, ratio: float) -> dict[str, str]:
    """Sites whose update is (almost) nothing: the global model sent back, or a token step.

    Parameters
    ----------
    distances : mapping of str to float
        Each site's update distance (:func:`distance`).
    global_norm : float
        ``||w_global||``.
    rel : float
        An update within ``rel * ||w_global||`` of the global model is no update (0: off). An
        honest site that trained moves far more than float32 rounding (about 1e-7 relative).
    ratio : float
        With three or more updates, one below ``ratio`` x the round's median distance (0: off):
        a site that trained on its data with the others' settings does not move 100x less.

    Returns
    -------
    dict of str to str
        The free riders and why (each reason starts with ``free-rider``).
    """
    out = {}
    for s, d in distances.items():
        if rel > 0 and d <= rel * max(global_norm, 1e-12):
            out[s] = f"free-rider: update norm {d:.3g} is nothing next to the global model's norm {global_norm:.3g}"
    rest = {s: d for s, d in distances.items() if s not in out}
    if ratio > 0 and len(rest) >= 3:
        med = float(np.median(list(rest.values())))
        out.update({s: f"free-rider: update norm {d:.3g} is {d / med:.2g}x the round's median {med:.3g}"
                    for s, d in rest.items() if d < ratio * med})
    return out


def direction_outliers(updates: Mapping[str, Arrays], reference: Arrays, min_cosine: float) -> tuple[dict[str, str], dict[str, float]]:
    """Sites whose update points against the round's coordinate-wise median update.

    Parameters
    ----------
    updates : mapping of str to mapping of str to numpy.ndarray
        The sites' arrays (checked, the reference's names).
    reference : mapping of str to numpy.ndarray
        The global model.
    min_cosine : float
        Reject an update whose cosine with the median update is below this; -1 or less: off.

    Returns
    -------
    rejected : dict of str to str
        The sites and why. Empty with fewer than three updates: with two, the median is their mean,
        and a sign-flipped update and an honest one have the same cosine with it.
    cosines : dict of str to float
        Each site's cosine with the median update (empty when the rule did not run).
    """
    if min_cosine <= -1 or len(updates) < 3:
        return {}, {}
    sites = sorted(updates)
    dots = dict.fromkeys(sites, 0.0)
    sq = dict.fromkeys(sites, 0.0)
    msq = 0.0
    for k, ref in reference.items():  # one parameter at a time: memory of n updates of one array
        r = np.asarray(ref, np.float64).ravel()
        deltas = np.stack([np.asarray(updates[s][k], np.float64).ravel() - r for s in sites])
        med = np.median(deltas, axis=0)
        msq += float(med @ med)
        for i, s in enumerate(sites):
            dots[s] += float(deltas[i] @ med)
            sq[s] += float(deltas[i] @ deltas[i])
    if msq <= 0:
        return {}, {}
    cos = {s: (dots[s] / math.sqrt(sq[s] * msq) if sq[s] > 0 else 0.0) for s in sites}
    bad = {s: f"update direction against the others: cosine {c:+.2f} with the round's median update "
              f"(below run.min_update_cosine {min_cosine:g})" for s, c in cos.items() if c < min_cosine}
    return bad, cos


def relative_clip_bound(distances: Mapping[str, float], ratio: float) -> float:
    """``ratio`` x the round's median update distance (two updates: the smaller); ``inf`` when off.

    With two updates the median would be their mean, which an attacker's large update raises as it
    likes; the smaller of the two bounds what either can do to ``ratio`` x the other's step.
    """
    vals = [d for d in distances.values() if d > 0 and math.isfinite(d)]
    if ratio <= 0 or len(vals) < 2:
        return math.inf
    ref = min(vals) if len(vals) == 2 else float(np.median(vals))
    return ratio * ref


@dataclass(frozen=True)
class ScreenRules:
    """Every parameter of :func:`screen_updates`, in one place (see the module docstring).

    The defaults of :meth:`from_run` are the run's defaults (``run:`` section,
    :class:`dicomfl.common.config.RunSection`); the defaults here turn every rule off, so that
    ``ScreenRules()`` screens nothing.

    Attributes
    ----------
    max_update_norm_rel : float
        Absolute rule: reject ``distance > max_update_norm_rel * ||w_global||`` (0: off).
    max_update_norm_ratio : float
        Median rule: with >= 3 updates, reject one above this many times the median (0: off).
    min_bound : float
        Floor for the absolute bound.
    clip_update_norm : float or None
        A fixed clip bound on every accepted update (None: none).
    clip_update_median_ratio : float
        Clip every accepted update to this many times the round's median distance (0: off).
    min_update_cosine : float
        Direction rule, >= 3 updates: reject a cosine with the median update below this (-1: off).
    free_rider_rel, free_rider_ratio : float
        Free-rider rule (:func:`free_riders`; 0: off).
    max_weight_share : float
        Cap on one site's share of the weight (1: off).
    """

    max_update_norm_rel: float = 0.0
    max_update_norm_ratio: float = 0.0
    min_bound: float = 0.0
    clip_update_norm: float | None = None
    clip_update_median_ratio: float = 0.0
    min_update_cosine: float = -1.0
    free_rider_rel: float = 0.0
    free_rider_ratio: float = 0.0
    max_weight_share: float = 1.0

    @classmethod
    def from_run(cls, run: Any) -> "ScreenRules":
        """The rules of a run's ``run:`` section (any object with these attributes; missing ones off).

        The median rule's ratio is the smaller of ``max_update_norm_ratio`` (which SCAFFOLD's
        control-delta rule also uses) and ``max_update_median_ratio``, each counted when > 0; with
        strategy ``scaffold`` only the first (its control corrections spread honest updates wider).
        """
        kw = {f.name: getattr(run, f.name) for f in fields(cls) if hasattr(run, f.name)}
        keys = ("max_update_norm_ratio",) + (() if getattr(run, "strategy", None) == "scaffold" else ("max_update_median_ratio",))
        ratios = [float(getattr(run, k, 0.0) or 0.0) for k in keys]
        kw["max_update_norm_ratio"] = min((v for v in ratios if v > 0), default=0.0)
        return cls(**kw)


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
        Sites left out by the free-rider, norm and direction rules, and why.
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
    clip_bound : float
        The clip bound used this round: the smaller of ``clip_update_norm`` and the relative bound
        (``inf`` when neither applied).
    cosines : dict of str to float
        Each site's cosine with the round's median update (when the direction rule ran).
    """

    arrays: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    weights: dict[str, float] = field(default_factory=dict)
    rejected: dict[str, str] = field(default_factory=dict)
    distances: dict[str, float] = field(default_factory=dict)
    clipped: dict[str, float] = field(default_factory=dict)
    capped: dict[str, float] = field(default_factory=dict)
    global_norm: float = 0.0
    bound: float = math.inf
    clip_bound: float = math.inf
    cosines: dict[str, float] = field(default_factory=dict)


def screen_updates(updates: Mapping[str, Arrays], weights: Mapping[str, float], reference: Arrays,
                   rules: ScreenRules | None = None, **legacy: Any) -> Screened:
    """Free-rider, norm and direction rules, then clipping, then the weight-share cap, on one round.

    Parameters
    ----------
    updates : mapping of str to mapping of str to numpy.ndarray
        Each site's arrays, already past :func:`update_problem`.
    weights : mapping of str to float
        Each site's validated ``num-examples`` (same keys as ``updates``).
    reference : mapping of str to numpy.ndarray
        The global model the sites were sent.
    rules : ScreenRules, optional
        The rules (:meth:`ScreenRules.from_run` for a run's). Without it, the keyword arguments
        name the rules to apply (the fields of :class:`ScreenRules`; the others are off).
    **legacy
        Fields of :class:`ScreenRules`, when ``rules`` is not given.

    Returns
    -------
    Screened
        The accepted (clipped) arrays and capped weights, and what was rejected, clipped, capped.
    """
    if rules is None:
        rules = ScreenRules(**legacy)
    elif legacy:
        raise TypeError("screen_updates: pass either rules or keyword rules, not both")
    gnorm = l2_norm(reference)
    res = Screened(global_norm=gnorm, bound=norm_bound(gnorm, rules.max_update_norm_rel, rules.min_bound))
    res.distances = {s: distance(a, reference) for s, a in updates.items()}
    # Order matters: the median is taken over the updates that passed the rules before, so updates
    # far beyond the absolute bound cannot make an honest one look like a token step, nor free
    # riders make an honest one look far.
    rejected = free_riders(res.distances, gnorm, rel=rules.free_rider_rel, ratio=0.0)
    rest = {s: d for s, d in res.distances.items() if s not in rejected}
    rejected.update(norm_violations(rest, gnorm, max_update_norm_rel=rules.max_update_norm_rel, min_bound=rules.min_bound))
    rest = {s: d for s, d in rest.items() if s not in rejected}
    rejected.update(free_riders(rest, gnorm, rel=0.0, ratio=rules.free_rider_ratio))
    rest = {s: d for s, d in rest.items() if s not in rejected}
    rejected.update(norm_outliers(rest, rules.max_update_norm_ratio))
    # The round's spread: the updates that are neither nothing nor beyond the norm bounds.
    spread = {s: d for s, d in res.distances.items() if s not in rejected}
    bad, res.cosines = direction_outliers({s: updates[s] for s in spread}, reference, rules.min_update_cosine)
    rejected.update(bad)
    res.rejected = rejected
    fixed = rules.clip_update_norm if rules.clip_update_norm is not None else math.inf
    res.clip_bound = min(fixed, relative_clip_bound(spread, rules.clip_update_median_ratio))
    for s, a in updates.items():
        if s in res.rejected:
            continue
        if math.isfinite(res.clip_bound):
            clipped, scale = clip_update(a, reference, res.clip_bound)
            if scale < 1.0:
                res.clipped[s] = scale
            res.arrays[s] = clipped
        else:
            res.arrays[s] = dict(a)
    raw = {s: float(weights[s]) for s in res.arrays}
    res.weights = cap_weight_shares(raw, rules.max_weight_share)
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
