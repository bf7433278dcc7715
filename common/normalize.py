"""Image intensity normalization that survives different scanners, at full depth.

Sites store pixels in different units and ranges (12-bit unsigned CR, 14-bit DX, signed data with
a rescale intercept, MONOCHROME1 already inverted during ingestion). A global constant would let
the model tell sites apart by brightness alone, and per-site statistics would have to be shared.
So each image is scaled by its own robust statistics, computed in float32 with no 8-bit step::

    x' = clip((x - median(x)) / (p99(x) - p1(x)), -3, 3)

The percentiles ignore the outermost 1% at each end (collimator edges, burned-in-free markers,
dead pixels), the median centres the anatomy, and a flat image (p99 == p1) maps to zeros.
"""

from __future__ import annotations

import numpy as np

LOW_PCT, HIGH_PCT, CLIP = 1.0, 99.0, 3.0


def robust_scale(images: np.ndarray) -> np.ndarray:
    """Per-image robust scaling of an (N, H, W) or (H, W) float array; returns float32."""
    x = np.asarray(images, dtype=np.float32)
    single = x.ndim == 2
    if single:
        x = x[None]
    flat = x.reshape(len(x), -1)
    lo, med, hi = np.percentile(flat, [LOW_PCT, 50.0, HIGH_PCT], axis=1)
    scale = (hi - lo).astype(np.float32)
    scale[scale <= 0] = np.inf  # flat image -> zeros
    out = (x - med[:, None, None].astype(np.float32)) / scale[:, None, None]
    np.clip(out, -CLIP, CLIP, out=out)
    return out[0] if single else out
