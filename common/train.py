"""Local training and evaluation: one function each, shared by the ClientApp, the benchmark and tests.

``train_local`` starts from given global weights, trains for E local epochs (or S steps), and
returns the new weights (plain parameter names) with numbers only. Options:

* FedProx: the proximal term mu/2 * ||w - w_global||^2 is applied as its gradient, mu * (w -
  w_global), added to each parameter's gradient *after* the privacy step. Without DP this is the
  same as adding the term to the loss; with DP it is the only correct place, because Opacus
  replaces each gradient with the clipped, noised per-sample sum (a term in the loss would be
  clipped and averaged away). The term touches no data, so it costs no privacy.
* SCAFFOLD: ``TrainSettings.correction`` (``c - c_i``, :mod:`dicomfl.common.scaffold`) is added to
  each parameter's gradient at the same place as FedProx's term, *after* the privacy step, with
  plain SGD (``optimizer="sgd"``). Under DP the step is ``y <- y - lr * (noisy clipped gradient +
  c - c_i)``: the correction is a constant of the round, computed from earlier releases (the
  coordinator's ``c``, the site's own ``c_i`` which is a function of its earlier DP-trained
  models), so adding it is post-processing and the accountant's charge is unchanged.
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
* Data: a :class:`SplitData` is a lazy view of the site's on-disk cache (no whole-site array in
  memory). :class:`SplitDataset` reads each batch's rows from disk and robust-scales them with
  the per-image statistics computed at ingest (the same numbers, bit for bit, as
  :func:`~dicomfl.common.normalize.robust_scale`). With CUDA the loader pins its batches and
  copies them to the GPU with ``non_blocking=True``.
"""

from __future__ import annotations

import copy
import math
import secrets
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .augment import AugmentSettings, augment_batch
from .cache import LazyRows, take_rows
from .metrics import auroc, evaluate_predictions
from .errors import ModelMismatch, NoTrainingData
from .model import get_weights, load_weights
from .normalize import CLIP, robust_scale


class ScaledImages(LazyRows):
    """Rows ``idx`` of a site's images, robust-scaled as they are read.

    ``stats`` holds each image's ``[median, p99 - p1]`` (computed at ingest); without it they
    are computed from the rows read. Either way the result equals
    :func:`~dicomfl.common.normalize.robust_scale` of those images.
    """

    def __init__(self, images, stats, idx: np.ndarray) -> None:
        self.idx = np.asarray(idx, dtype=np.int64)
        super().__init__(len(self.idx), tuple(images.shape[1:]))
        self.images, self.stats = images, stats

    def take(self, i: np.ndarray) -> np.ndarray:
        rows = self.idx[np.asarray(i, dtype=np.int64)]
        x = take_rows(self.images, rows).astype(np.float32, copy=False)
        if self.stats is None:
            return robust_scale(x) if len(x) else x
        st = take_rows(self.stats, rows)
        out = (x - st[:, 0, None, None]) / st[:, 1, None, None]
        np.clip(out, -CLIP, CLIP, out=out)
        return out


class RowSubset(LazyRows):
    """Rows ``idx`` of an ndarray or another lazy view."""

    def __init__(self, base, idx: np.ndarray) -> None:
        self.idx = np.asarray(idx, dtype=np.int64)
        super().__init__(len(self.idx), tuple(base.shape[1:]))
        self.base = base

    def take(self, i: np.ndarray) -> np.ndarray:
        return take_rows(self.base, self.idx[np.asarray(i, dtype=np.int64)]).astype(np.float32, copy=False)


class ConcatRows(LazyRows):
    """Several arrays or lazy views, one after the other."""

    def __init__(self, parts: list) -> None:
        self.parts = list(parts)
        self.ends = np.cumsum([len(p) for p in self.parts]).astype(np.int64)
        super().__init__(int(self.ends[-1]) if len(self.ends) else 0, tuple(self.parts[0].shape[1:]))

    def take(self, i: np.ndarray) -> np.ndarray:
        i = np.asarray(i, dtype=np.int64)
        out = np.empty((len(i), *self.shape[1:]), np.float32)
        which = np.searchsorted(self.ends, i, side="right")
        starts = np.concatenate([[0], self.ends[:-1]])
        for k in np.unique(which).tolist():
            sel = which == k
            out[sel] = take_rows(self.parts[k], i[sel] - starts[k])
        return out


@dataclass
class SplitData:
    """Model inputs for one split of one site (normalized images, features, labels).

    ``images`` and ``features`` are arrays or lazy views (:class:`~dicomfl.common.cache.LazyRows`)
    of the site's on-disk cache; indexing either reads only the rows asked for. ``labels`` is
    an array in memory.
    """

    images: "np.ndarray | LazyRows"  # (N, S, S) float32, robust-scaled
    features: "np.ndarray | LazyRows"  # (N, F) float32
    labels: np.ndarray  # (N,) int64

    def __len__(self) -> int:
        return len(self.labels)

    @staticmethod
    def concat(parts: "list[SplitData]") -> "SplitData":
        labels = np.concatenate([p.labels for p in parts])
        if all(isinstance(p.images, np.ndarray) and isinstance(p.features, np.ndarray) for p in parts):
            return SplitData(np.concatenate([p.images for p in parts]), np.concatenate([p.features for p in parts]),
                             labels)
        return SplitData(ConcatRows([p.images for p in parts]), ConcatRows([p.features for p in parts]), labels)


def load_split(data, split: int, image_size: int | None = None, n_classes: int | None = None) -> SplitData:
    """Labelled samples of one split of a site's data, ready for the model: a lazy view (nothing
    is read here); images are robust-scaled as batches are read.

    Parameters
    ----------
    data : dicomfl.common.ingest.SiteData
        The site's ingested data (images at ``preprocess.image_size``).
    split : int
        ``TRAIN``, ``VAL`` or ``TEST`` (:mod:`dicomfl.common.splits`).
    image_size : int, optional
        The size the model expects; a check, never a second resize.
    n_classes : int, optional
        The model's classes; a check that every label is one of them.

    Raises
    ------
    ModelMismatch
        ``image_size`` differs from the size the images were ingested at, or a label is not
        one of the model's ``n_classes`` classes.
    """
    idx = data.subset(split)
    if image_size is not None and data.images.shape[-1] != image_size:
        raise ModelMismatch(f"the model asks for {image_size} px images; this site ingests at "
                            f"{data.images.shape[-1]} px (preprocess.image_size)")
    labels = np.asarray(data.labels[idx], dtype=np.int64)
    if n_classes is not None and len(labels) and int(labels.max()) >= n_classes:
        raise ModelMismatch(f"the model has {n_classes} classes; this site's labels go beyond them (site.n_classes)")
    return SplitData(ScaledImages(data.images, getattr(data, "stats", None), idx),
                     RowSubset(data.features, idx), labels)


class SplitDataset(Dataset):
    """A :class:`SplitData` as a torch map-style dataset: ``(image (1, S, S), features, label)``.

    ``__getitems__`` reads a whole batch of rows at once (one sorted pass over the on-disk
    rows, one vectorised scaling); torch's fetcher uses it, Opacus's Poisson loader too.
    """

    def __init__(self, data: SplitData) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int):
        return self.__getitems__([int(i)])[0]

    def __getitems__(self, idx: "list[int]"):
        if len(idx) == 0:
            return []
        rows = np.asarray(idx, dtype=np.int64)
        x = torch.from_numpy(np.ascontiguousarray(take_rows(self.data.images, rows), dtype=np.float32))
        f = torch.from_numpy(np.ascontiguousarray(take_rows(self.data.features, rows), dtype=np.float32))
        y = torch.from_numpy(np.asarray(self.data.labels[rows], dtype=np.int64))
        return [(x[k, None], f[k], y[k]) for k in range(len(rows))]


def _check_labels(labels: np.ndarray, n_classes: int) -> None:
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= n_classes):
        raise ModelMismatch(f"training labels must be 0..{n_classes - 1}")


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
    max_steps: int | None = None  # if set: exactly S optimizer steps (as many passes as needed; epochs ignored)
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.0
    proximal_mu: float = 0.0
    seed: int = 0
    class_weights: bool = True
    # Counts to derive the class weights from instead of the labels (under DP: the site's noisy,
    # accounted release of its label counts; see client/privacy.py).
    class_counts: "list[float] | None" = None
    # Acquisition-shift augmentation of training batches (dicomfl.common.augment); None: off.
    augment: "AugmentSettings | None" = None
    # The local optimizer: Adam (the default) or plain SGD (no momentum; what SCAFFOLD assumes).
    optimizer: Literal["adam", "sgd"] = "adam"
    # SCAFFOLD's gradient correction c - c_i by parameter name (added after the privacy step); None: off.
    correction: "dict[str, np.ndarray] | None" = None
    # Called as on_epoch(epoch, model) after each full epoch (1, 2, ...) with the model being trained
    # (e.g. to score it on validation data for a learning curve); it may switch the model to eval mode
    # and run it under no_grad, training resumes in train mode. None: nothing is called.
    on_epoch: "Callable[[int, nn.Module], None] | None" = None


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


def _loader(data: SplitData, batch_size: int, shuffle: bool, generator: torch.Generator,
            dev: torch.device | None = None) -> DataLoader:
    """Batches read from disk as they are needed; pinned for a fast asynchronous copy to a GPU."""
    pin = dev is not None and dev.type == "cuda"
    return DataLoader(SplitDataset(data), batch_size=batch_size, shuffle=shuffle, generator=generator,
                      drop_last=False, pin_memory=pin)


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
    _check_labels(data.labels, n_classes)
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
        optimizer = _optimizer(work, settings)
        correction = _correction_tensors(work, settings.correction, dev)
        sample_gen, noise_gen = (_dp_generators(dp.seed, dev) if dp is not None
                                 else (torch.Generator().manual_seed(settings.seed), None))
        # Under DP, Opacus's Poisson loader takes the generator of the loader it wraps.
        loader = _loader(data, min(settings.batch_size, len(data)), True, sample_gen, dev)
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
        aug_gen = torch.Generator().manual_seed(settings.seed + 0x9E3779B9) if settings.augment else None
        epochs = settings.epochs
        if settings.max_steps is not None:  # S steps whatever the split's size: as many passes as that takes
            epochs = max(1, math.ceil(settings.max_steps / max(1, len(loader))))
        for epoch in range(epochs):
            for images, feats, y in loader:
                if settings.max_steps is not None and steps >= settings.max_steps:
                    done = True
                    break
                nb = dev.type == "cuda"
                images, feats, y = (images.to(dev, non_blocking=nb), feats.to(dev, non_blocking=nb),
                                    y.to(dev, non_blocking=nb))
                if aug_gen is not None and len(y):
                    images = augment_batch(images, aug_gen, settings.augment)
                optimizer.zero_grad(set_to_none=True)
                if len(y) == 0:
                    # Poisson sampling drew no sample: still a (noise-only) step for the accountant.
                    if engine is not None:
                        _private_step(optimizer, work, anchor, settings.proximal_mu, correction)
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
                    _private_step(optimizer, work, anchor, settings.proximal_mu, correction)
                else:
                    _add_proximal(work, anchor, settings.proximal_mu)
                    _add_correction(work, correction)
                    optimizer.step()
                total_loss += float(loss.detach()) * len(y)
                seen += len(y)
                steps += 1
            if done:
                break
            if settings.on_epoch is not None:
                settings.on_epoch(epoch + 1, work)
                work.train()
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


def _optimizer(model: nn.Module, settings: TrainSettings) -> torch.optim.Optimizer:
    if settings.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=settings.lr, momentum=0.0, weight_decay=settings.weight_decay)
    if settings.correction is not None:
        raise ValueError("a SCAFFOLD correction needs plain SGD local steps (optimizer='sgd')")
    return torch.optim.Adam(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)


def _correction_tensors(model: nn.Module, correction: "dict[str, np.ndarray] | None",
                        dev: torch.device) -> "list[torch.Tensor] | None":
    """``correction`` in the order of ``model.parameters()``; every parameter must have one, of its shape."""
    if correction is None:
        return None
    out = []
    for name, p in model.named_parameters():
        if name not in correction or tuple(np.shape(correction[name])) != tuple(p.shape):
            raise ModelMismatch(f"the SCAFFOLD correction does not fit parameter {name}")
        out.append(torch.as_tensor(np.asarray(correction[name], dtype=np.float32), device=dev))
    return out


def _add_correction(model: nn.Module, correction: "list[torch.Tensor] | None") -> None:
    if correction is None:
        return
    with torch.no_grad():
        for p, c in zip(model.parameters(), correction):
            if p.grad is None:
                p.grad = c.clone()
            else:
                p.grad.add_(c)


def _private_step(optimizer, model: nn.Module, anchor: list[torch.Tensor], mu: float,
                  correction: "list[torch.Tensor] | None" = None) -> None:
    """Opacus's clip + noise (+ accountant step), then the proximal gradient and SCAFFOLD's
    correction (both data-independent: post-processing), then the update."""
    if optimizer.pre_step():
        _add_proximal(model, anchor, mu)
        _add_correction(model, correction)
        optimizer.original_optimizer.step()


#: Pixels per evaluation batch (batch size x image area): 32 images at 256 px, 128 at 128 px.
#: A batch's activations, not N, set evaluation's peak memory (at 256 px a batch of 256 images
#: would hold 256 x 32 x 256 x 256 float32, 2 GiB, in the first feature map of a width-32 model).
EVAL_BATCH_PIXELS = 1 << 21


@torch.no_grad()
def predict(model: nn.Module, data: SplitData, batch_size: int | None = None,
            dev: torch.device | None = None) -> np.ndarray:
    """Class probabilities (N, C), in batches of ``batch_size`` images (default: as many as
    fit :data:`EVAL_BATCH_PIXELS`, between 8 and 256)."""
    dev = dev or device()
    if batch_size is None:
        area = int(np.prod(data.images.shape[1:])) if len(data.images.shape) > 1 else 1
        batch_size = max(8, min(256, EVAL_BATCH_PIXELS // max(area, 1)))
    model = model.to(dev).eval()
    cuda = dev.type == "cuda"
    outs = []
    for i in range(0, len(data), batch_size):
        rows = np.arange(i, min(i + batch_size, len(data)), dtype=np.int64)
        x = torch.from_numpy(np.ascontiguousarray(take_rows(data.images, rows), dtype=np.float32))[:, None]
        f = torch.from_numpy(np.ascontiguousarray(take_rows(data.features, rows), dtype=np.float32))
        if cuda:
            x, f = x.pin_memory(), f.pin_memory()
        x, f = x.to(dev, non_blocking=cuda), f.to(dev, non_blocking=cuda)
        outs.append(torch.softmax(model(x, f), dim=1).cpu().numpy())
    n_classes = model.cfg.n_classes if hasattr(model, "cfg") else 2
    return np.concatenate(outs) if outs else np.zeros((0, n_classes), np.float32)


def evaluate(model: nn.Module, test: SplitData, val: SplitData | None = None,
             replicates: "list[np.ndarray] | None" = None) -> dict:
    """Metrics on ``test`` with the binary threshold chosen on ``val`` (see :mod:`.metrics`), plus loss.

    ``replicates``: resamples of ``test`` (:func:`~dicomfl.common.stats.replicate_indices`); for a
    binary model the AUROC on each is added as ``auroc-boot`` (an array; NaN where a resample lacks
    a class)."""
    probs = predict(model, test)
    pv = predict(model, val) if val is not None and len(val) else None
    out = evaluate_predictions(test.labels, probs, val.labels if pv is not None else None, pv)
    if replicates and len(test) and probs.ndim == 2 and probs.shape[1] == 2:
        from .protocol import AUROC_REPLICATES
        from .stats import replicate_aurocs

        out[AUROC_REPLICATES] = replicate_aurocs(test.labels, probs[:, 1], replicates)
    if pv is not None:  # the model's score on validation data, for choosing between models
        from .protocol import VAL_AUROC, VAL_LOSS

        out[VAL_AUROC] = auroc(val.labels, pv)
        out[VAL_LOSS] = _nll(pv, val.labels)
    out["loss"] = _nll(probs, test.labels)
    return out


def _nll(probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean negative log-likelihood of the labels (NaN without samples)."""
    if not len(labels):
        return float("nan")
    p = np.clip(probs[np.arange(len(labels)), labels], 1e-7, 1.0)
    return float(-np.log(p).mean())

