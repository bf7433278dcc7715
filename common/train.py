"""Local training and evaluation: one function each, shared by the ClientApp, the benchmark and tests.

``train_local`` starts from given global weights, trains for E local epochs (or S steps), and
returns the new weights (plain parameter names) with numbers only. Options:

* FedProx: the proximal term mu/2 * ||w - w_global||^2 is applied as its gradient, mu * (w -
  w_global), added to each parameter's gradient *after* the privacy step. Without DP this is the
  same as adding the term to the loss; with DP it is the only correct place, because Opacus
  replaces each gradient with the clipped, noised per-sample sum (a term in the loss would be
  clipped and averaged away). The term touches no data, so it costs no privacy.
* DP-SGD (Opacus): Poisson sampling, per-sample clipping at ``max_grad_norm``, Gaussian noise.
  A fresh private copy of the model per call (so Opacus never adds hooks twice) with
  ``wrap_model=False``, so parameter names are unchanged. The accountant's history is passed in
  and returned, so the caller can persist the site's cumulative spend.
* Class imbalance: per-class loss weights (balanced), because Opacus's Poisson sampler silently
  replaces any custom sampler. Under DP the caller passes DP-released counts (``class_counts``):
  weights computed from the exact labels would depend on every record outside the accountant.
* Deterministic on CPU for a given seed; CUDA is used when present. Under DP the Poisson sampler and
  the noise draw from their own generators, seeded from OS entropy unless ``DPSettings.seed`` is set
  (a known seed would let anyone who knows it remove the noise).
"""

from __future__ import annotations

import copy
import secrets
import time
import warnings
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from .metrics import evaluate_predictions
from .errors import ModelMismatch, NoTrainingData
from .model import get_weights, load_weights
from .normalize import robust_scale


@dataclass
class SplitData:
    """Model inputs for one split of one site (normalized images, features, labels)."""

    images: np.ndarray  # (N, S, S) float32, robust-scaled
    features: np.ndarray  # (N, F) float32
    labels: np.ndarray  # (N,) int64

    def __len__(self) -> int:
        return len(self.labels)

    @staticmethod
    def concat(parts: "list[SplitData]") -> "SplitData":
        return SplitData(np.concatenate([p.images for p in parts]), np.concatenate([p.features for p in parts]),
                      np.concatenate([p.labels for p in parts]))


def load_split(data, split: int, image_size: int | None = None) -> SplitData:
    """Labelled samples of one split of a site's data, robust-scaled, ready for the model.

    Parameters
    ----------
    data : dicomfl.common.ingest.SiteData
        The site's ingested data (images at ``preprocess.image_size``).
    split : int
        ``TRAIN``, ``VAL`` or ``TEST`` (:mod:`dicomfl.common.splits`).
    image_size : int, optional
        The size the model expects; a check, never a second resize.

    Raises
    ------
    ModelMismatch
        ``image_size`` differs from the size the images were ingested at.
    """
    idx = data.subset(split)
    imgs = data.images[idx]
    if image_size is not None and data.images.shape[-1] != image_size:
        raise ModelMismatch(f"the model asks for {image_size} px images; this site ingests at "
                            f"{data.images.shape[-1]} px (preprocess.image_size)")
    return SplitData(robust_scale(imgs) if len(imgs) else imgs.astype(np.float32),
                  data.features[idx].astype(np.float32), data.labels[idx].astype(np.int64))


@dataclass
class DPSettings:
    noise_multiplier: float
    max_grad_norm: float = 1.0
    accountant: Literal["rdp", "prv"] = "rdp"
    grad_sample_mode: str = "hooks"
    history: list = field(default_factory=list)  # the accountant's (sigma, q, steps) so far
    # Randomness of the Poisson batches and of the noise. None (the default, and what a site always
    # uses): fresh OS entropy on every call, so nobody — the coordinator included, who knows every
    # training seed — can predict which records were sampled or what noise was added; the accountant
    # assumes both are secret. An int makes the call reproducible, for simulations and tests only:
    # whoever knows it can regenerate the noise and subtract it.
    seed: int | None = None


@dataclass
class TrainSettings:
    epochs: int = 1
    max_steps: int | None = None  # stop after S optimizer steps (across epochs)
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.0
    proximal_mu: float = 0.0
    seed: int = 0
    class_weights: bool = True
    # Counts to derive the class weights from instead of the labels (under DP: the site's noisy,
    # accounted release of its label counts; see client/privacy.py).
    class_counts: "list[float] | None" = None


@dataclass
class TrainResult:
    weights: "dict[str, np.ndarray]"
    loss: float
    num_examples: int
    steps: int
    seconds: float
    history: list = field(default_factory=list)
    sample_rate: float | None = None


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def class_weights(labels: np.ndarray, n_classes: int) -> torch.Tensor:
    return class_weights_from_counts(np.bincount(labels, minlength=n_classes))


def class_weights_from_counts(counts) -> torch.Tensor:
    """Balanced weights total / (K * count_c); a class with no samples gets weight 0."""
    counts = np.asarray(counts, dtype=np.float64)
    w = np.where(counts > 0, counts.sum() / (len(counts) * np.maximum(counts, 1e-12)), 0.0)
    return torch.tensor(w, dtype=torch.float32)


def _loader(data: SplitData, batch_size: int, shuffle: bool, generator: torch.Generator) -> DataLoader:
    ds = TensorDataset(torch.from_numpy(data.images[:, None]), torch.from_numpy(data.features),
                       torch.from_numpy(data.labels))
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, generator=generator, drop_last=False)


def _dp_generators(seed: int | None, dev: torch.device) -> tuple[torch.Generator, torch.Generator]:
    """(Poisson sampling generator, noise generator): from OS entropy, or from ``seed`` when given."""
    if seed is None:
        s_sample, s_noise = secrets.randbits(63), secrets.randbits(63)
    else:
        s_sample, s_noise = seed, seed ^ 0x5DEECE66D
    return torch.Generator().manual_seed(s_sample), torch.Generator(device=dev).manual_seed(s_noise)


def train_local(
    model: nn.Module,
    data: SplitData,
    settings: TrainSettings,
    dp: DPSettings | None = None,
    global_weights: "dict[str, np.ndarray] | None" = None,
    dev: torch.device | None = None,
) -> TrainResult:
    """Train a copy of ``model`` (loaded with ``global_weights`` if given) on ``data``."""
    if len(data) == 0:
        raise NoTrainingData("no labelled training samples")
    t0 = time.perf_counter()
    dev = dev or device()
    work = copy.deepcopy(model)
    if global_weights is not None:
        load_weights(work, global_weights)
    work.to(dev).train()
    anchor = [p.detach().clone() for p in work.parameters()]
    n_classes = work.cfg.n_classes if hasattr(work, "cfg") else int(data.labels.max()) + 1
    weights = None
    if settings.class_weights:
        if settings.class_counts is not None:
            if len(settings.class_counts) != n_classes:
                raise ValueError(f"class_counts has {len(settings.class_counts)} entries for {n_classes} classes")
            weights = class_weights_from_counts(settings.class_counts).to(dev)
        else:
            weights = class_weights(data.labels, n_classes).to(dev)

    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        # Opacus warns that its secure RNG is off (see README: secure mode needs torchcsprng) and
        # torch that full backward hooks fire on inputs without grad: both expected here.
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        torch.manual_seed(settings.seed)
        optimizer = torch.optim.Adam(work.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
        sample_gen, noise_gen = (_dp_generators(dp.seed, dev) if dp is not None
                                 else (torch.Generator().manual_seed(settings.seed), None))
        # Under DP, Opacus's Poisson loader takes the generator of the loader it wraps.
        loader = _loader(data, min(settings.batch_size, len(data)), True, sample_gen)
        engine = None
        criterion = None
        if dp is not None:
            from opacus import PrivacyEngine

            engine = PrivacyEngine(accountant=dp.accountant)
            engine.accountant.history = [tuple(h) for h in dp.history]
            made = engine.make_private(
                module=work, optimizer=optimizer, data_loader=loader, noise_multiplier=dp.noise_multiplier,
                max_grad_norm=dp.max_grad_norm, poisson_sampling=True, grad_sample_mode=dp.grad_sample_mode,
                wrap_model=False, criterion=nn.CrossEntropyLoss(weight=weights), noise_generator=noise_gen,
            )
            if len(made) == 4:
                _, optimizer, criterion, loader = made
            else:
                _, optimizer, loader = made
        total_loss, seen, steps = 0.0, 0, 0
        done = False
        for _ in range(settings.epochs):
            for images, feats, y in loader:
                if settings.max_steps is not None and steps >= settings.max_steps:
                    done = True
                    break
                images, feats, y = images.to(dev), feats.to(dev), y.to(dev)
                optimizer.zero_grad(set_to_none=True)
                if len(y) == 0:
                    # Poisson sampling drew no sample: still a (noise-only) step for the accountant.
                    if engine is not None:
                        _private_step(optimizer, work, anchor, settings.proximal_mu)
                        steps += 1
                    continue
                logits = work(images, feats)
                if criterion is not None:  # Opacus ghost clipping: its criterion runs both passes
                    loss = criterion(logits, y)
                    loss.backward()
                else:
                    per = F.cross_entropy(logits, y, weight=weights, reduction="none")
                    loss = per.mean()
                    loss.backward()
                if engine is not None:
                    _private_step(optimizer, work, anchor, settings.proximal_mu)
                else:
                    _add_proximal(work, anchor, settings.proximal_mu)
                    optimizer.step()
                total_loss += float(loss.detach()) * len(y)
                seen += len(y)
                steps += 1
            if done:
                break
        history = list(engine.accountant.history) if engine is not None else []
        sample_rate = (1.0 / len(loader)) if engine is not None else None
    out = get_weights(work)
    return TrainResult(weights=out, loss=total_loss / max(seen, 1), num_examples=len(data), steps=steps,
                       seconds=time.perf_counter() - t0, history=[list(h) for h in history], sample_rate=sample_rate)


def _add_proximal(model: nn.Module, anchor: list[torch.Tensor], mu: float) -> None:
    if mu <= 0:
        return
    with torch.no_grad():
        for p, a in zip(model.parameters(), anchor):
            if p.grad is None:
                p.grad = mu * (p.detach() - a)
            else:
                p.grad.add_(p.detach() - a, alpha=mu)


def _private_step(optimizer, model: nn.Module, anchor: list[torch.Tensor], mu: float) -> None:
    """Opacus's clip + noise (+ accountant step), then the proximal gradient, then the update."""
    if optimizer.pre_step():
        _add_proximal(model, anchor, mu)
        optimizer.original_optimizer.step()


@torch.no_grad()
def predict(model: nn.Module, data: SplitData, batch_size: int = 256, dev: torch.device | None = None) -> np.ndarray:
    """Class probabilities (N, C)."""
    dev = dev or device()
    model = model.to(dev).eval()
    outs = []
    for i in range(0, len(data), batch_size):
        x = torch.from_numpy(data.images[i:i + batch_size, None]).to(dev)
        f = torch.from_numpy(data.features[i:i + batch_size]).to(dev)
        outs.append(torch.softmax(model(x, f), dim=1).cpu().numpy())
    n_classes = model.cfg.n_classes if hasattr(model, "cfg") else 2
    return np.concatenate(outs) if outs else np.zeros((0, n_classes), np.float32)


def evaluate(model: nn.Module, test: SplitData, val: SplitData | None = None) -> dict[str, float]:
    """Metrics on ``test`` with the binary threshold chosen on ``val`` (see :mod:`.metrics`), plus loss."""
    probs = predict(model, test)
    pv = predict(model, val) if val is not None and len(val) else None
    out = evaluate_predictions(test.labels, probs, val.labels if pv is not None else None, pv)
    if len(test):
        p = np.clip(probs[np.arange(len(test)), test.labels], 1e-7, 1.0)
        out["loss"] = float(-np.log(p).mean())
    else:
        out["loss"] = float("nan")
    return out

