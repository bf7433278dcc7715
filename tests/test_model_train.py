"""The fused model, image normalization, metrics, and local training (with FedProx and DP-SGD)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn import metrics as skm

from dicomfl.common.errors import ModelMismatch
from dicomfl.common.features import N_FEATURES
from dicomfl.common.metrics import binary_metrics, choose_threshold, evaluate_predictions, expected_calibration_error
from dicomfl.common.model import ModelConfig, build_model, describe, load_weights, opacus_errors, get_weights
from dicomfl.common.normalize import robust_scale
from dicomfl.common.splits import TEST, TRAIN, VAL
from dicomfl.common.train import (
    DPSettings,
    TrainSettings,
    class_weights,
    class_weights_from_counts,
    evaluate,
    predict,
    load_split,
    train_local,
)

MC = ModelConfig(image_size=32, width=8, depth=2, meta_hidden=32, head_hidden=32)


def _dist(a: dict, b: dict) -> float:
    return float(np.sqrt(sum(np.sum((a[k].astype(np.float64) - b[k]) ** 2) for k in a)))


@pytest.fixture(scope="module")
def train_a(site_data):
    cfg, data = site_data["site-a"]
    return load_split(data, TRAIN, 32)


# ------------------------------------------------------------------------------------------ model


@pytest.mark.parametrize("mode", ["fused", "image", "metadata"])
def test_every_mode_is_opacus_compatible_and_runs(mode):
    cfg = MC.model_copy(update={"mode": mode})
    m = build_model(cfg)
    assert opacus_errors(m) == []
    assert not any(isinstance(x, torch.nn.modules.batchnorm._BatchNorm) for x in m.modules())
    out = m(torch.randn(5, 1, 32, 32), torch.randn(5, N_FEATURES))
    assert out.shape == (5, 2)
    info = describe(cfg)
    assert info["parameters"]["total"] == sum(p.numel() for p in m.parameters()) > 0
    assert info["opacus_errors"] == []


def test_modes_use_only_their_inputs():
    img = build_model(MC.model_copy(update={"mode": "image"})).eval()
    meta = build_model(MC.model_copy(update={"mode": "metadata"})).eval()
    x, f = torch.randn(3, 1, 32, 32), torch.randn(3, N_FEATURES)
    assert torch.equal(img(x, f), img(x, torch.randn_like(f)))
    assert torch.equal(meta(x, f), meta(torch.randn_like(x), f))
    assert not torch.equal(img(x, f), img(torch.randn_like(x), f))


def test_same_seed_same_weights_and_strict_loading():
    a, b = get_weights(build_model(MC, seed=3)), get_weights(build_model(MC, seed=3))
    assert all(np.array_equal(a[k], b[k]) for k in a)
    c = get_weights(build_model(MC, seed=4))
    assert not all(np.array_equal(a[k], c[k]) for k in a)
    m = build_model(MC)
    bad = dict(a)
    bad.pop(next(iter(bad)))
    with pytest.raises(ValueError, match="missing"):
        load_weights(m, bad)
    bad = dict(a)
    k = next(iter(bad))
    bad[k] = np.zeros((1, 2, 3), np.float32)
    with pytest.raises(ValueError, match="shape"):
        load_weights(m, bad)


def test_input_size_is_free_for_the_image_encoder():
    m = build_model(MC)
    assert m(torch.randn(2, 1, 64, 64), torch.randn(2, N_FEATURES)).shape == (2, 2)


# ---------------------------------------------------------------------------------- normalization


def test_robust_scale_is_invariant_to_scanner_gain_and_offset():
    rng = np.random.default_rng(0)
    img = rng.normal(1000, 200, size=(2, 48, 48)).astype(np.float32)
    a = robust_scale(img)
    b = robust_scale(img * 3.7 - 1024.0)  # another gain, a rescale intercept
    np.testing.assert_allclose(a, b, atol=1e-4)
    assert a.dtype == np.float32 and np.abs(a).max() <= 3.0
    assert len(np.unique(a[0])) > 1000  # full depth: no 8-bit quantization anywhere
    flat = robust_scale(np.full((16, 16), 7.0, np.float32))
    assert np.all(flat == 0)


def test_split_arrays_are_normalized_full_depth(site_data):
    cfg, data = site_data["site-b"]  # signed pixels with an intercept
    arr = load_split(data, TRAIN, 32)
    assert arr.images.shape[1:] == (32, 32) and arr.images.dtype == np.float32
    med = np.median(arr.images.reshape(len(arr), -1), axis=1)
    assert np.abs(med).max() < 1e-3
    assert set(np.unique(arr.labels)) <= {0, 1}
    with pytest.raises(ModelMismatch, match="preprocess.image_size"):  # one image size: never resized twice
        load_split(data, TRAIN, 16)


# ---------------------------------------------------------------------------------------- metrics


def test_metrics_agree_with_scikit_learn():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 200)
    p = np.clip(y * 0.3 + rng.uniform(0, 0.7, 200), 0, 1)
    m = binary_metrics(y, p, 0.5)
    assert m["auroc"] == pytest.approx(skm.roc_auc_score(y, p))
    assert m["auprc"] == pytest.approx(skm.average_precision_score(y, p))
    pred = (p >= 0.5).astype(int)
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    assert m["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, pred))
    assert m["sensitivity"] == pytest.approx(skm.recall_score(y, pred))
    assert m["specificity"] == pytest.approx(skm.recall_score(1 - y, 1 - pred))
    assert m["brier"] == pytest.approx(skm.brier_score_loss(y, p))


def test_ece_by_hand_and_threshold_from_validation():
    # Two bins used: confidences 0.95 (all right) and 0.65 (half right) -> ECE = 0.5*0.05 + 0.5*0.15
    y = np.array([1, 1, 1, 0])
    probs = np.array([[0.05, 0.95], [0.05, 0.95], [0.35, 0.65], [0.35, 0.65]])
    assert expected_calibration_error(y, probs) == pytest.approx(0.5 * 0.05 + 0.5 * 0.15)
    # Threshold chosen on validation data is applied to test data.
    yv = np.array([0, 0, 1, 1])
    pv = np.array([0.1, 0.2, 0.3, 0.4])
    assert choose_threshold(yv, pv) == pytest.approx(0.3)
    out = evaluate_predictions(np.array([0, 1]), np.array([[0.75, 0.25], [0.65, 0.35]]), yv, np.stack([1 - pv, pv], 1))
    assert out["threshold"] == pytest.approx(0.3) and out["accuracy"] == 1.0
    assert np.isnan(binary_metrics(np.array([1, 1]), np.array([0.2, 0.9]))["auroc"])  # undefined, not invented


# --------------------------------------------------------------------------------------- training


def test_training_is_deterministic_and_learns(train_a, site_data):
    m = build_model(MC)
    s = TrainSettings(epochs=20, batch_size=16, lr=3e-3, seed=5)
    r1, r2 = train_local(m, train_a, s), train_local(m, train_a, s)
    assert all(np.array_equal(r1.weights[k], r2.weights[k]) for k in r1.weights)
    assert _dist(r1.weights, get_weights(m)) > 0
    assert r1.num_examples == len(train_a) and r1.steps == 20 * int(np.ceil(len(train_a) / 16))
    load_weights(m, r1.weights)
    probs = predict(m, train_a)
    assert skm.roc_auc_score(train_a.labels, probs[:, 1]) > 0.75  # it fits its own training data
    first = train_local(build_model(MC), train_a, TrainSettings(epochs=1, batch_size=16, lr=3e-3, seed=5))
    assert r1.loss < first.loss
    metrics = evaluate(m, load_split(site_data["site-a"][1], TEST, 32), load_split(site_data["site-a"][1], VAL, 32))
    for k in ("auroc", "auprc", "accuracy", "balanced_accuracy", "sensitivity", "specificity", "brier", "ece", "loss"):
        assert k in metrics


def test_class_weights_from_labels_or_from_released_counts(train_a):
    assert class_weights_from_counts([30, 10]).tolist() == pytest.approx([40 / 60, 40 / 20])
    assert class_weights(np.array([0, 0, 0, 1]), 3).tolist() == pytest.approx([4 / 9, 4 / 3, 0.0])
    s = TrainSettings(epochs=1, max_steps=2, batch_size=16, seed=5)
    exact = train_local(build_model(MC), train_a, s)
    s_counts = TrainSettings(epochs=1, max_steps=2, batch_size=16, seed=5, class_counts=[1.0, 1000.0])
    skewed = train_local(build_model(MC), train_a, s_counts)
    assert _dist(exact.weights, skewed.weights) > 0  # the given counts, not the labels, set the weights
    with pytest.raises(ValueError, match="class_counts"):
        train_local(build_model(MC), train_a, TrainSettings(max_steps=1, class_counts=[1.0, 2.0, 3.0]))


def test_local_steps_limit(train_a):
    r = train_local(build_model(MC), train_a, TrainSettings(epochs=50, max_steps=3, batch_size=8))
    assert r.steps == 3


def test_local_steps_are_exactly_s_even_when_that_is_more_than_one_pass(train_a):
    """A step budget makes sites of different sizes contribute evenly: a small split takes as many
    passes as S steps need (the DP plan charges S steps a round)."""
    per_pass = -(-len(train_a) // 16)
    r = train_local(build_model(MC), train_a, TrainSettings(epochs=1, max_steps=2 * per_pass + 1, batch_size=16))
    assert r.steps == 2 * per_pass + 1


def test_under_dp_s_steps_over_several_passes_are_what_the_accountant_records(train_a):
    """The site's privacy plan charges S steps a round (client/privacy/accountant.py: planned_steps): with
    Poisson sampling over several passes, the steps taken and the accountant's steps are both S."""
    per_pass = -(-len(train_a) // 16)
    s = 2 * per_pass + 1
    r = train_local(build_model(MC), train_a, TrainSettings(epochs=1, max_steps=s, batch_size=16),
                    dp=DPSettings(noise_multiplier=1.0, seed=3))
    assert r.steps == s and sum(h[2] for h in r.history) == s


@pytest.mark.parametrize("private", [False, True])
def test_fedprox_pulls_weights_toward_the_global_model(train_a, private):
    m = build_model(MC)
    g = get_weights(m)
    dp = DPSettings(noise_multiplier=0.5, max_grad_norm=1.0, seed=7) if private else None
    free = train_local(m, train_a, TrainSettings(epochs=4, batch_size=16, lr=1e-2, seed=1, proximal_mu=0.0), dp=dp,
                       global_weights=g)
    prox = train_local(m, train_a, TrainSettings(epochs=4, batch_size=16, lr=1e-2, seed=1, proximal_mu=5.0), dp=dp,
                       global_weights=g)
    d_free, d_prox = _dist(free.weights, g), _dist(prox.weights, g)
    assert d_prox < 0.7 * d_free, (d_prox, d_free)


def test_dp_keeps_names_and_shapes_and_really_adds_noise(train_a):
    m = build_model(MC)
    plain = train_local(m, train_a, TrainSettings(epochs=2, batch_size=16, seed=2))
    quiet = train_local(m, train_a, TrainSettings(epochs=2, batch_size=16, seed=2),
                        dp=DPSettings(noise_multiplier=0.0, seed=2))
    loud = train_local(m, train_a, TrainSettings(epochs=2, batch_size=16, seed=2),
                       dp=DPSettings(noise_multiplier=20.0, seed=2))
    for r in (quiet, loud):
        assert list(r.weights) == list(plain.weights)
        assert all(r.weights[k].shape == plain.weights[k].shape for k in plain.weights)
        assert not any(k.startswith("_module") for k in r.weights)
    start = get_weights(m)
    # Same seed, same Poisson batches: the only difference is the Gaussian noise.
    assert _dist(loud.weights, quiet.weights) > 0.5 * _dist(quiet.weights, start)
    # The accountant saw every step at the loader's sample rate.
    assert loud.history and loud.history[-1][0] == 20.0 and loud.sample_rate == pytest.approx(1 / np.ceil(len(train_a) / 16))
    assert sum(h[2] for h in loud.history) == loud.steps
    # Training again does not fail with "hooks added twice": a fresh private copy each call.
    train_local(m, train_a, TrainSettings(epochs=1, batch_size=16), dp=DPSettings(noise_multiplier=1.0))


def test_dp_batches_and_noise_do_not_follow_from_the_training_seed(train_a):
    """The coordinator knows every training seed. Under DP, neither the Poisson batches nor the noise
    may be derivable from it: with the same TrainSettings.seed two private runs differ. Only an
    explicit DPSettings.seed (simulations, tests) makes them repeat."""
    m = build_model(MC)
    s = TrainSettings(epochs=1, batch_size=16, seed=3)
    a = train_local(m, train_a, s, dp=DPSettings(noise_multiplier=1.0))
    b = train_local(m, train_a, s, dp=DPSettings(noise_multiplier=1.0))
    assert _dist(a.weights, b.weights) > 0
    c = train_local(m, train_a, s, dp=DPSettings(noise_multiplier=1.0, seed=11))
    d = train_local(m, train_a, s, dp=DPSettings(noise_multiplier=1.0, seed=11))
    assert _dist(c.weights, d.weights) == 0
    # Without DP, the training seed still makes a run exactly repeatable.
    e, f = train_local(m, train_a, s), train_local(m, train_a, s)
    assert _dist(e.weights, f.weights) == 0


@pytest.mark.parametrize("mode", ["functorch", "ghost"])
def test_opacus_engines_agree(train_a, mode):
    """Per-sample clipping gives the same update whichever Opacus engine computes it (no noise)."""
    m = build_model(MC)
    s = TrainSettings(epochs=1, max_steps=2, batch_size=16, seed=4, class_weights=False)
    ref = train_local(m, train_a, s, dp=DPSettings(noise_multiplier=0.0, grad_sample_mode="hooks", seed=4))
    other = train_local(m, train_a, s, dp=DPSettings(noise_multiplier=0.0, grad_sample_mode=mode, seed=4))
    assert _dist(ref.weights, other.weights) < 1e-3 * max(_dist(ref.weights, get_weights(m)), 1e-6) + 1e-5


@pytest.mark.parametrize("mode", ["fused", "image", "metadata"])
@pytest.mark.parametrize("width,depth", [(4, 1), (6, 2), (8, 4)])
def test_the_described_shapes_are_the_built_models(mode, width, depth):
    """state_shapes computes the state dict from the description alone; it must be the real one."""
    from dicomfl.common.model import described_parameters, parameter_count, state_shapes

    cfg = ModelConfig(mode=mode, width=width, depth=depth, meta_hidden=10, head_hidden=12, n_classes=3)
    sd = build_model(cfg).state_dict()
    shapes = state_shapes(cfg)
    assert list(shapes) == list(sd) and all(shapes[k] == tuple(v.shape) for k, v in sd.items())
    assert described_parameters(cfg) == parameter_count(build_model(cfg))


def test_a_huge_model_description_is_refused_before_it_is_built():
    from dicomfl.common.errors import ModelMismatch
    from dicomfl.common.model import check_model_size

    with pytest.raises(ModelMismatch, match="max_model_parameters"):
        check_model_size(ModelConfig(width=256, depth=6), 128, 32)
    with pytest.raises(ModelMismatch, match="max_model_memory_mb"):
        check_model_size(ModelConfig(width=32, depth=3, image_size=2048), 2048, 64)
    assert check_model_size(ModelConfig(), 128, 32) < 1_000_000
