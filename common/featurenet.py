"""A trained network with its run's feature transform in front (:mod:`dicomfl.common.fedstats`).

Applying a model outside the round loop (``dicomfl predict``, ``dicomfl export``) must feed it the
features exactly as the sites did in training: standardized with the run's global mean and std,
dropped features zeroed. :class:`StandardizedInput` does that with tensor arithmetic only (no
indexing), so TorchScript and ONNX export it with the network; it computes what
:meth:`FeatureTransform.apply` computes.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .features import N_FEATURES
from .fedstats import NUMERIC_NAMES, RANGES, Z_CLIP, FeatureTransform, feature_groups

_BIG = 3.0e38


def _tables(t: FeatureTransform, n_features: int) -> dict[str, np.ndarray]:
    lo = np.full(n_features, -_BIG, np.float32)
    hi = np.full(n_features, _BIG, np.float32)
    mean = np.zeros(n_features, np.float32)
    std = np.ones(n_features, np.float32)
    value = np.zeros(n_features, np.float32)
    missing_of = np.zeros((n_features, n_features), np.float32)  # features @ missing_of: each value column's indicator
    keep = np.ones(n_features, np.float32)
    groups = feature_groups()
    if t.mean is not None:
        for i, f in enumerate(NUMERIC_NAMES):
            v, m = groups[f]
            lo[v], hi[v] = RANGES[f]
            mean[v], std[v] = t.mean[i], t.std[i]
            value[v] = 1.0
            missing_of[m, v] = 1.0
    for f in t.drop:
        keep[groups[f]] = 0.0
    return {"lo": lo, "hi": hi, "mean": mean, "std": std, "value": value, "missing_of": missing_of, "keep": keep}


class StandardizedInput(nn.Module):
    """``forward(images, features) = net(images, transform(features))``; ``cfg`` is the network's."""

    def __init__(self, net: nn.Module, transform: FeatureTransform, n_features: int = N_FEATURES) -> None:
        super().__init__()
        self.net = net
        self.cfg = net.cfg
        self.z_clip = float(Z_CLIP)
        for name, arr in _tables(transform, n_features).items():
            self.register_buffer(f"fs_{name}", torch.from_numpy(arr), persistent=False)

    def forward(self, images: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        x = torch.minimum(torch.maximum(features, self.fs_lo), self.fs_hi)
        z = torch.clamp((x - self.fs_mean) / self.fs_std, -self.z_clip, self.z_clip)
        z = torch.where(features @ self.fs_missing_of >= 0.5, torch.zeros_like(z), z)
        out = self.fs_value * z + (1.0 - self.fs_value) * features
        return self.net(images, out * self.fs_keep)


def with_transform(net: nn.Module, transform: FeatureTransform | None) -> nn.Module:
    """``net`` itself when there is nothing to do, else wrapped in :class:`StandardizedInput`."""
    if transform is None or transform.identity:
        return net
    return StandardizedInput(net, transform).eval()
