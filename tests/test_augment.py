"""Acquisition-shift augmentation (common/augment.py): shapes, range and order of intensities kept,
training batches only, and it works under DP-SGD with the same accounting."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dicomfl.common.augment import AugmentSettings, augment_batch
from dicomfl.common.config import ModelConfig
from dicomfl.common.features import N_FEATURES
from dicomfl.common.model import build_model
from dicomfl.common.normalize import CLIP, robust_scale
from dicomfl.common.train import DPSettings, SplitData, TrainSettings, predict, train_local

OFF = AugmentSettings(p=1.0, gamma=0, contrast=0, brightness=0, blur=0, rotate_deg=0, scale=0, noise=0)


def _batch(n=6, s=32, seed=0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    raw = rng.gamma(2.0, 400.0, (n, s, s)).astype(np.float32) + np.linspace(0, 800, s, dtype=np.float32)
    return torch.from_numpy(robust_scale(raw))[:, None]


def test_shape_dtype_and_range_are_kept():
    x = _batch()
    y = augment_batch(x, torch.Generator().manual_seed(0), AugmentSettings(p=1.0))
    assert y.shape == x.shape and y.dtype == x.dtype
    assert float(y.min()) >= -CLIP and float(y.max()) <= CLIP
    assert not torch.equal(x, y)


def test_with_every_step_off_it_is_the_identity():
    x = _batch()
    torch.testing.assert_close(augment_batch(x, torch.Generator().manual_seed(1), OFF), x, atol=1e-5, rtol=0)


def test_intensity_steps_keep_the_order_of_pixel_values():
    """Gamma, contrast and brightness are monotonic: full-depth ordering survives."""
    x = _batch(n=4)
    s = AugmentSettings(p=1.0, gamma=0.5, contrast=0.3, brightness=0.2, blur=0, rotate_deg=0, scale=0, noise=0)
    y = augment_batch(x, torch.Generator().manual_seed(2), s)
    for a, b in zip(x.reshape(4, -1), y.reshape(4, -1)):
        order = torch.argsort(a)
        assert bool((torch.diff(b[order]) >= -1e-6).all())


def test_no_left_right_flip():
    """A bright left half stays on the left after any draw (small rotation and scale only)."""
    x = torch.full((8, 1, 32, 32), -1.0)
    x[..., :16] = 2.0
    y = augment_batch(x, torch.Generator().manual_seed(3), AugmentSettings(p=1.0))
    assert bool((y[..., :12].mean(dim=(1, 2, 3)) > y[..., 20:].mean(dim=(1, 2, 3))).all())


def test_p_zero_leaves_the_batch_alone_and_draws_are_reproducible():
    x = _batch()
    assert torch.equal(augment_batch(x, torch.Generator().manual_seed(0), AugmentSettings(p=0.0)), x)
    a = augment_batch(x, torch.Generator().manual_seed(5), AugmentSettings())
    b = augment_batch(x, torch.Generator().manual_seed(5), AugmentSettings())
    assert torch.equal(a, b)


MODEL = ModelConfig(mode="fused", image_size=32, width=4, depth=1, meta_hidden=8, head_hidden=8)


def _data(n=48) -> SplitData:
    rng = np.random.default_rng(0)
    x = _batch(n=n).numpy()[:, 0]
    y = rng.integers(0, 2, n)
    x[y == 1, 8:16, 8:16] += 1.0
    return SplitData(np.clip(x, -CLIP, CLIP), (rng.uniform(size=(n, N_FEATURES)) < 0.3).astype(np.float32), y)


def test_training_batches_only_and_the_model_is_still_deterministic_at_evaluation():
    data = _data()
    net = build_model(MODEL)
    plain = train_local(net, data, TrainSettings(epochs=1, batch_size=16, seed=0))
    aug = train_local(net, data, TrainSettings(epochs=1, batch_size=16, seed=0, augment=AugmentSettings()))
    again = train_local(net, data, TrainSettings(epochs=1, batch_size=16, seed=0, augment=AugmentSettings()))
    assert any(not np.array_equal(plain.weights[k], aug.weights[k]) for k in plain.weights)
    assert all(np.array_equal(aug.weights[k], again.weights[k]) for k in aug.weights)  # seeded draws
    # evaluation never augments: the same inputs give the same probabilities twice
    from dicomfl.common.model import load_weights

    load_weights(net, aug.weights)
    np.testing.assert_array_equal(predict(net, data), predict(net, data))


def test_under_dp_sgd_the_accounting_is_unchanged():
    data = _data()
    net = build_model(MODEL)
    dp = DPSettings(noise_multiplier=1.0, max_grad_norm=1.0, seed=0)
    base = train_local(net, data, TrainSettings(epochs=1, batch_size=16, seed=0), dp=dp)
    aug = train_local(net, data, TrainSettings(epochs=1, batch_size=16, seed=0, augment=AugmentSettings()),
                      dp=DPSettings(noise_multiplier=1.0, max_grad_norm=1.0, seed=0))
    assert aug.history == base.history and aug.steps == base.steps
    assert all(np.isfinite(v).all() for v in aug.weights.values())


@pytest.mark.parametrize("bad", [{"p": 1.5}, {"rotate_deg": 90}, {"flip": True}, {"noise": -1}])
def test_config_bounds(bad):
    from pydantic import ValidationError

    from dicomfl.common.config import AugmentSection

    with pytest.raises(ValidationError):
        AugmentSection(**bad)
