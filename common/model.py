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

from collections import OrderedDict
import numpy as np
import torch
from torch import nn

from .config import ModelConfig
from .errors import ModelMismatch
from .features import N_FEATURES, SCHEMA_VERSION

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
    """Load weights into the model, strictly: every name present, every shape equal.

    Raises
    ------
    ModelMismatch
        A name is missing or unexpected, or a shape differs.
    """
    own = model.state_dict()
    missing = sorted(set(own) - set(arrays))
    extra = sorted(set(arrays) - set(own))
    if missing or extra:
        raise ModelMismatch(f"weights do not match the model: missing {missing[:3]}, unexpected {extra[:3]}")
    for k, v in own.items():
        if tuple(np.shape(arrays[k])) != tuple(v.shape):
            raise ModelMismatch(f"weights do not match the model: {k} has shape {np.shape(arrays[k])}, expected {tuple(v.shape)}")
    model.load_state_dict({k: torch.as_tensor(np.asarray(arrays[k])) for k in own}, strict=True)


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
