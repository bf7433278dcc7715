"""Acquisition-shift augmentation: what differs between hospitals, applied to training batches.

Hospitals differ in detector response, exposure, processing and positioning, not in anatomy. Each
training image (robust-scaled, values in ``[-CLIP, CLIP]``) gets, with probability ``p``, random
draws of:

* an intensity curve (gamma): ``u ** gamma`` on the image's range mapped to ``[0, 1]``, with
  ``log(gamma)`` uniform in ``[-gamma, gamma]``;
* contrast and brightness: ``x * c + b``, ``c`` in ``[1 - contrast, 1 + contrast]``, ``b`` in
  ``[-brightness, brightness]``;
* blur: a Gaussian of sigma uniform in ``[0, blur]`` pixels;
* a small rotation (``[-rotate_deg, rotate_deg]``) and scale (``[1 - scale, 1 + scale]``) about
  the centre, with the border pixels repeated (no black corners a model could learn);
* Gaussian noise of standard deviation uniform in ``[0, noise]``.

No flip: left and right are anatomy on a chest image. The intensity steps are monotonic, so the
order of pixel values (what the full bit depth carries) is kept; the output is clipped back to
``[-CLIP, CLIP]``, the range robust scaling guarantees, and keeps the input's shape and dtype.

It runs at the site, on training batches only (``train_local``), never at evaluation or
prediction. Under DP-SGD it changes the inputs before the forward pass; each per-sample gradient
is still one sample's and is clipped and noised as before, so the accounting does not change.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .normalize import CLIP


@dataclass(frozen=True)
class AugmentSettings:
    p: float = 0.8
    gamma: float = 0.3
    contrast: float = 0.15
    brightness: float = 0.1
    blur: float = 0.8
    rotate_deg: float = 5.0
    scale: float = 0.05
    noise: float = 0.05

    @classmethod
    def of(cls, section) -> "AugmentSettings | None":
        """From a config's ``train.augment`` section (None: off)."""
        return None if section is None else cls(**section.model_dump())


def _uniform(gen: torch.Generator, n: int, lo: float, hi: float, dev: torch.device) -> torch.Tensor:
    return (torch.rand(n, generator=gen) * (hi - lo) + lo).to(dev)


def _blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur, one sigma per image (0: unchanged)."""
    b, _, h, w = x.shape
    radius = max(1, int(math.ceil(3 * float(sigma.max()))))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    s = sigma.clamp_min(1e-3)[:, None]
    k = torch.exp(-0.5 * (t[None, :] / s) ** 2)
    k = k / k.sum(dim=1, keepdim=True)  # (B, K); sigma -> 0 gives a delta
    y = F.pad(x.reshape(1, b, h, w), (radius, radius, radius, radius), mode="replicate")
    y = F.conv2d(y, k[:, None, None, :], groups=b)
    y = F.conv2d(y, k[:, None, :, None], groups=b)
    return y.reshape(b, 1, h, w)


def augment_batch(x: torch.Tensor, gen: torch.Generator, s: AugmentSettings) -> torch.Tensor:
    """A randomly shifted copy of a batch ``(B, 1, H, W)`` of robust-scaled images."""
    if x.ndim != 4 or x.shape[1] != 1:
        raise ValueError("augment_batch expects (B, 1, H, W)")
    b, dev = x.shape[0], x.device
    if b == 0:
        return x
    out = x.to(torch.float32)
    on = (torch.rand(b, generator=gen) < s.p).to(dev)
    g = torch.exp(_uniform(gen, b, -s.gamma, s.gamma, dev))[:, None, None, None]
    u = ((out + CLIP) / (2 * CLIP)).clamp(0.0, 1.0)
    out = u.pow(g) * (2 * CLIP) - CLIP
    c = _uniform(gen, b, 1 - s.contrast, 1 + s.contrast, dev)[:, None, None, None]
    br = _uniform(gen, b, -s.brightness, s.brightness, dev)[:, None, None, None]
    out = out * c + br
    if s.blur > 0:
        out = _blur(out, _uniform(gen, b, 0.0, s.blur, dev))
    if s.rotate_deg > 0 or s.scale > 0:
        a = _uniform(gen, b, -s.rotate_deg, s.rotate_deg, dev) * (math.pi / 180)
        z = _uniform(gen, b, 1 - s.scale, 1 + s.scale, dev)
        theta = torch.zeros(b, 2, 3, device=dev)
        theta[:, 0, 0], theta[:, 0, 1] = torch.cos(a) / z, -torch.sin(a) / z
        theta[:, 1, 0], theta[:, 1, 1] = torch.sin(a) / z, torch.cos(a) / z
        grid = F.affine_grid(theta, list(out.shape), align_corners=False)
        out = F.grid_sample(out, grid, mode="bilinear", padding_mode="border", align_corners=False)
    if s.noise > 0:
        sd = _uniform(gen, b, 0.0, s.noise, dev)[:, None, None, None]
        out = out + torch.randn(out.shape, generator=gen).to(dev) * sd
    out = out.clamp(-CLIP, CLIP)
    return torch.where(on[:, None, None, None], out, x.to(torch.float32)).to(x.dtype)
