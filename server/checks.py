"""Checks on a site's update before aggregation: names, shapes, finiteness, norm.

A rejected update is logged with the site's name and the reason, and the round goes on with the
others. The norm check compares each update's L2 distance from the global model with the median
distance of the round's updates; it needs at least three updates to say what is "far".
"""

from __future__ import annotations

import numpy as np


def update_problem(arrays: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> str | None:
    """Why this update cannot be aggregated (None if it can)."""
    names, ref_names = set(arrays), set(reference)
    if names != ref_names:
        missing, extra = sorted(ref_names - names), sorted(names - ref_names)
        return f"parameter names differ (missing {missing[:2]}, unexpected {extra[:2]})"
    for k, ref in reference.items():
        a = arrays[k]
        if tuple(a.shape) != tuple(ref.shape):
            return f"parameter {k} has shape {tuple(a.shape)}, expected {tuple(ref.shape)}"
        if a.dtype.kind not in "fc" and ref.dtype.kind in "fc":
            return f"parameter {k} has dtype {a.dtype}, expected {ref.dtype}"
        if not np.all(np.isfinite(a)):
            return f"parameter {k} has NaN or infinite values"
    return None


def distance(arrays: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> float:
    return float(np.sqrt(sum(np.sum((arrays[k].astype(np.float64) - reference[k]) ** 2) for k in reference)))


def norm_outliers(distances: dict[str, float], ratio: float) -> dict[str, str]:
    """Sites whose update distance is more than ``ratio`` x the median of the round's distances."""
    if ratio <= 0 or len(distances) < 3:
        return {}
    med = float(np.median(list(distances.values())))
    if med <= 0:
        return {}
    return {s: f"update norm {d:.3g} is {d / med:.1f}x the round's median {med:.3g}"
            for s, d in distances.items() if d > ratio * med}
