"""The fused network: a residual CNN on full-depth pixels + an MLP on the metadata features.

Design choices, each forced by a constraint:

* GroupNorm, never BatchNorm: Opacus cannot compute per-sample gradients through batch statistics,
  and batch statistics would also leak across samples. Every mode passes
  ``opacus.validators.ModuleValidator.validate`` with no errors (tested).
* Global average pooling makes the image encoder independent of the input size.
* ``mode`` picks ``fused`` (both branches), ``image`` (pixels only) or ``metadata`` (features
  only) for ablations; the three modes share code but not parameters.
* Parameter names are those of this plain module: what is exchanged with the server never carries
  Opacus prefixes.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import numpy as np
import torch
from torch import nn

from .config import MAX_MODEL_MEMORY_MB, MAX_MODEL_PARAMETERS, ModelConfig
from .errors import ModelMismatch
from .features import N_FEATURES, SCHEMA_VERSION
from .weights import is_real_float

def _gn(channels: int, groups: int) -> nn.GroupNorm:
    g = min(groups, channels)
    while channels % g:
        g -= 1
    return nn.GroupNorm(g, channels)


class ResidualBlock(nn.Module):
    """conv(stride) -> GN -> ReLU -> conv -> GN, plus a 1x1 projection shortcut when shapes change."""

    def __init__(self, cin: int, cout: int, stride: int, groups: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.norm1 = _gn(cout, groups)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.norm2 = _gn(cout, groups)
        self.act = nn.ReLU()
        self.shortcut: nn.Module
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), _gn(cout, groups))
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.norm1(self.conv1(x)))
        y = self.norm2(self.conv2(y))
        return self.act(y + self.shortcut(x))


class ImageEncoder(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        w = cfg.width
        self.stem = nn.Sequential(nn.Conv2d(1, w, 3, stride=2, padding=1, bias=False), _gn(w, cfg.groups), nn.ReLU())
        blocks = []
        cin = w
        for i in range(cfg.depth):
            cout = w * (2**i)
            blocks.append(ResidualBlock(cin, cout, stride=1 if i == 0 else 2, groups=cfg.groups))
            cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.out_dim = cin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.pool(self.blocks(self.stem(x))), 1)


class MetadataEncoder(nn.Module):
    def __init__(self, cfg: ModelConfig, n_features: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(n_features, cfg.meta_hidden), nn.ReLU(), nn.Dropout(cfg.dropout),
            nn.Linear(cfg.meta_hidden, cfg.meta_hidden // 2), nn.ReLU(),
        )
        self.out_dim = cfg.meta_hidden // 2

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return self.net(f)


class FusedNet(nn.Module):
    """``forward(images (N,1,S,S), features (N,F)) -> logits (N, n_classes)``; unused inputs are ignored."""

    def __init__(self, cfg: ModelConfig, n_features: int = N_FEATURES) -> None:
        super().__init__()
        self.cfg = cfg
        self.n_features = n_features
        dim = 0
        self.image = ImageEncoder(cfg) if cfg.mode in ("fused", "image") else None
        self.meta = MetadataEncoder(cfg, n_features) if cfg.mode in ("fused", "metadata") else None
        dim += self.image.out_dim if self.image is not None else 0
        dim += self.meta.out_dim if self.meta is not None else 0
        self.head = nn.Sequential(
            nn.Linear(dim, cfg.head_hidden), nn.ReLU(), nn.Dropout(cfg.dropout), nn.Linear(cfg.head_hidden, cfg.n_classes)
        )

    def forward(self, images: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        parts = []
        if self.image is not None:
            parts.append(self.image(images))
        if self.meta is not None:
            parts.append(self.meta(features))
        return self.head(torch.cat(parts, dim=1) if len(parts) > 1 else parts[0])


#: The default bounds on a model description (``train.max_model_parameters`` and
#: ``train.max_model_memory_mb`` in a site config): a description past them is refused before
#: anything is allocated.
MAX_PARAMETERS = MAX_MODEL_PARAMETERS
MAX_MEMORY_MB = MAX_MODEL_MEMORY_MB


def _groups(channels: int, groups: int) -> int:
    g = min(groups, channels)
    while channels % g:
        g -= 1
    return g


def state_shapes(cfg: ModelConfig, n_features: int = N_FEATURES) -> "OrderedDict[str, tuple[int, ...]]":
    """The state-dict names and shapes of ``FusedNet(cfg, n_features)``, in its order, computed
    from the description alone (nothing is built or allocated): what a weights file or a
    coordinator's arrays must hold, and how big the model would be."""
    out: "OrderedDict[str, tuple[int, ...]]" = OrderedDict()

    def gn(prefix: str, c: int) -> None:
        out[f"{prefix}.weight"] = (c,)
        out[f"{prefix}.bias"] = (c,)

    dim = 0
    if cfg.mode in ("fused", "image"):
        w = cfg.width
        out["image.stem.0.weight"] = (w, 1, 3, 3)
        gn("image.stem.1", w)
        cin = w
        for i in range(cfg.depth):
            cout = w * (2**i)
            b = f"image.blocks.{i}"
            out[f"{b}.conv1.weight"] = (cout, cin, 3, 3)
            gn(f"{b}.norm1", cout)
            out[f"{b}.conv2.weight"] = (cout, cout, 3, 3)
            gn(f"{b}.norm2", cout)
            if i != 0 or cin != cout:
                out[f"{b}.shortcut.0.weight"] = (cout, cin, 1, 1)
                gn(f"{b}.shortcut.1", cout)
            cin = cout
        dim += cin
    if cfg.mode in ("fused", "metadata"):
        h = cfg.meta_hidden
        out["meta.net.0.weight"], out["meta.net.0.bias"] = (h, n_features), (h,)
        out["meta.net.3.weight"], out["meta.net.3.bias"] = (h // 2, h), (h // 2,)
        dim += h // 2
    out["head.0.weight"], out["head.0.bias"] = (cfg.head_hidden, dim), (cfg.head_hidden,)
    out["head.3.weight"], out["head.3.bias"] = (cfg.n_classes, cfg.head_hidden), (cfg.n_classes,)
    return out


def described_parameters(cfg: ModelConfig, n_features: int = N_FEATURES) -> int:
    """The parameter count of the described model (:func:`state_shapes`), without building it."""
    return sum(math.prod(s) for s in state_shapes(cfg, n_features).values())


def activation_elements(cfg: ModelConfig, image_size: int) -> int:
    """Float32 values every layer of the described model outputs for one image of ``image_size``
    pixels square (convolutions, norms, activations, shortcuts, sums): what back-propagation
    keeps for each sample of a batch."""
    n = 0
    if cfg.mode in ("fused", "image"):
        def conv(h: int, stride: int, k: int = 3, pad: int = 1) -> int:
            return (h + 2 * pad - k) // stride + 1

        w = cfg.width
        h = conv(image_size, 2)
        n += 3 * w * h * h  # stem: conv, norm, ReLU
        cin = w
        for i in range(cfg.depth):
            cout = w * (2**i)
            stride = 1 if i == 0 else 2
            h = conv(h, stride)
            tensors = 7 + (2 if stride != 1 or cin != cout else 0)  # conv, norm, ReLU, conv, norm, (proj, norm), sum, ReLU
            n += tensors * cout * h * h
            cin = cout
        n += cin
    if cfg.mode in ("fused", "metadata"):
        n += 3 * cfg.meta_hidden + 2 * (cfg.meta_hidden // 2)
    n += 3 * cfg.head_hidden + cfg.n_classes
    return n


def model_footprint(cfg: ModelConfig, image_size: int, batch_size: int, n_features: int = N_FEATURES) -> tuple[int, int]:
    """(parameters, estimated bytes) of training the described model on batches of
    ``batch_size`` images of ``image_size`` px: float32 weights, gradients and two optimizer
    moments (4 copies), plus every layer's outputs for the batch (:func:`activation_elements`).
    Arithmetic only; nothing is allocated. Opacus's per-sample gradients (DP) are not counted."""
    params = described_parameters(cfg, n_features)
    return params, 4 * (4 * params + max(1, batch_size) * activation_elements(cfg, image_size))


def check_model_size(cfg: ModelConfig, image_size: int, batch_size: int, *, max_parameters: int = MAX_PARAMETERS,
                     max_memory_mb: int = MAX_MEMORY_MB, n_features: int = N_FEATURES) -> int:
    """The described model's parameter count, if it is within the bounds; else ``ModelMismatch``
    (one line, numbers only), raised before anything is built.

    Raises
    ------
    ModelMismatch
        More than ``max_parameters`` parameters, or an estimated training footprint
        (:func:`model_footprint`) above ``max_memory_mb``.
    """
    params, nbytes = model_footprint(cfg, image_size, batch_size, n_features)
    if params > max_parameters:
        raise ModelMismatch(f"the model described has {params:,} parameters, more than the {max_parameters:,} "
                            "this site allows (train.max_model_parameters)")
    if nbytes > max_memory_mb << 20:
        raise ModelMismatch(f"the model described needs about {nbytes >> 20:,} MiB to train on batches of {batch_size} "
                            f"images of {image_size} px, more than the {max_memory_mb:,} MiB this site allows "
                            "(train.max_model_memory_mb)")
    return params


def build_model(cfg: ModelConfig, seed: int = 0, n_features: int = N_FEATURES) -> FusedNet:
    """Same config and seed -> same initial weights, on any machine."""
    g = torch.random.fork_rng(devices=[])
    with g:
        torch.manual_seed(seed)
        return FusedNet(cfg, n_features)


def norm_parameter_names(model: nn.Module) -> frozenset[str]:
    """The state-dict names of the GroupNorm affine parameters (weight and bias of every
    ``nn.GroupNorm``): what stays at a site under ``run.local_norm`` (FedBN's idea, for GroupNorm)."""
    names = set()
    for prefix, module in model.named_modules():
        if isinstance(module, nn.GroupNorm):
            for pname, _ in module.named_parameters(recurse=False):
                names.add(f"{prefix}.{pname}" if prefix else pname)
    return frozenset(names)


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def get_weights(model: nn.Module) -> "OrderedDict[str, np.ndarray]":
    """The model's weights as NumPy arrays (plain names, CPU, float32): what is exchanged."""
    return OrderedDict((k, v.detach().cpu().numpy().copy()) for k, v in model.state_dict().items())


def load_weights(model: nn.Module, arrays: "dict[str, np.ndarray]") -> None:
    """Load weights into the model, strictly: every name present, every shape equal, every dtype
    a real float (an int, complex or object array is refused, never cast).

    Raises
    ------
    ModelMismatch
        A name is missing or unexpected, a shape differs, or a dtype is not a real float.
    """
    own = model.state_dict()
    missing = sorted(set(own) - set(arrays))
    extra = sorted(set(arrays) - set(own))
    if missing or extra:
        raise ModelMismatch(f"weights do not match the model: missing {missing[:3]}, unexpected {extra[:3]}")
    for k, v in own.items():
        if tuple(np.shape(arrays[k])) != tuple(v.shape):
            raise ModelMismatch(f"weights do not match the model: {k} has shape {np.shape(arrays[k])}, expected {tuple(v.shape)}")
        if not is_real_float(np.asarray(arrays[k]).dtype):
            raise ModelMismatch(f"weights do not match the model: {k} has dtype {np.asarray(arrays[k]).dtype.name} "
                                "(not a real float)")
    native = {k: np.asarray(arrays[k]) for k in own}
    model.load_state_dict({k: torch.as_tensor(a.astype(a.dtype.newbyteorder("="), copy=False)) for k, a in native.items()},
                          strict=True)


def opacus_errors(model: nn.Module) -> list[str]:
    """What Opacus's ModuleValidator objects to (empty when the model can be trained privately)."""
    from opacus.validators import ModuleValidator

    return [str(e) for e in ModuleValidator.validate(model, strict=False)]


def describe(cfg: ModelConfig, n_features: int = N_FEATURES) -> dict:
    m = FusedNet(cfg, n_features)
    parts = {"total": parameter_count(m)}
    for name in ("image", "meta", "head"):
        sub = getattr(m, name)
        if sub is not None:
            parts[name] = parameter_count(sub)
    return {"mode": cfg.mode, "image_size": cfg.image_size, "width": cfg.width, "depth": cfg.depth,
            "n_features": n_features, "feature_schema": SCHEMA_VERSION, "n_classes": cfg.n_classes,
            "parameters": parts, "opacus_errors": opacus_errors(m)}
