"""DP-SGD accounting and the site-held privacy budget (real Opacus accountants, real training)."""

from __future__ import annotations

import json
import logging
import math
import subprocess
import sys

import pytest
from opacus.accountants import PRVAccountant, RDPAccountant
from scipy.stats import norm

from dicomfl.client.privacy import Ledger, count_release, epsilon, plan_noise, sample_rate, steps_per_epoch
from dicomfl.client.trainer import RoundPlan, SiteTrainer
from dicomfl.common.config import load_site_config
from dicomfl.common.model import ModelConfig, build_model, get_weights
from dicomfl.common.splits import TRAIN

MC = ModelConfig(image_size=32, width=8, depth=2, meta_hidden=32, head_hidden=32)
LOG = logging.getLogger("tests.privacy")


def test_epsilon_matches_opacus_accountants_and_their_reference_values():
    # Reference values from Opacus's own accountant tests (q=0.04, sigma=1.5, 2250 steps, delta=1e-5).
    rdp = epsilon([[1.5, 0.04, 2250]], 1e-5, "rdp")
    prv = epsilon([[1.5, 0.04, 2250]], 1e-5, "prv")
    assert rdp == pytest.approx(7.32911, abs=1e-4)
    assert prv == pytest.approx(6.77740, abs=0.01)
    acc = RDPAccountant()
    for _ in range(3):
        acc.step(noise_multiplier=1.1, sample_rate=0.01)
    acc.history = [(1.1, 0.01, 500)]
    assert epsilon([[1.1, 0.01, 500]], 1e-6, "rdp") == pytest.approx(acc.get_epsilon(1e-6))
    p = PRVAccountant()
    p.history = [(0.9, 0.2, 30), (1.3, 0.1, 40)]
    assert epsilon([[0.9, 0.2, 30], [1.3, 0.1, 40]], 1e-5, "prv") == pytest.approx(p.get_epsilon(1e-5))
    # A history split into rounds spends the same as one block of the same steps.
    assert epsilon([[1.5, 0.04, 1000], [1.5, 0.04, 1250]], 1e-5, "rdp") == pytest.approx(rdp)
    # RDP with the one-step RDP kept per (q, sigma): exactly Opacus's number, on a site-like history
    # (a label-count release, then rounds of training, the last one at another noise), every call
    history = [[10.0, 1.0, 1], *[[1.3, 0.1, 10]] * 5, [0.9, 0.2, 7]]
    ref = RDPAccountant()
    ref.history = [tuple(h) for h in history]
    assert epsilon(history, 1e-5, "rdp") == ref.get_epsilon(1e-5) == epsilon(history, 1e-5, "rdp")


def test_prv_matches_the_analytic_gaussian_mechanism():
    # One full-batch step (q = 1) is the Gaussian mechanism with sensitivity 1; Balle & Wang (ICML 2018,
    # Theorem 8) give its exact delta(eps) = Phi(1/(2s) - eps*s) - e^eps * Phi(-1/(2s) - eps*s).
    s, eps_true = 1.0, 2.0
    delta = norm.cdf(1 / (2 * s) - eps_true * s) - math.exp(eps_true) * norm.cdf(-1 / (2 * s) - eps_true * s)
    assert epsilon([[s, 1.0, 1]], delta, "prv") == pytest.approx(eps_true, abs=0.05)
    # RDP is an upper bound on it, never below.
    assert epsilon([[s, 1.0, 1]], delta, "rdp") >= eps_true - 1e-6


def test_noise_for_a_target_matches_opacus_reference():
    # Opacus tests: target eps 8, q=0.04, 90 epochs (25 steps each) -> sigma 1.416 (rdp), 1.3477 (prv).
    assert plan_noise(8.0, 1e-5, 0.04, 90 * 25, "rdp") == pytest.approx(1.416, abs=0.01)
    assert plan_noise(8.0, 1e-5, 0.04, 90 * 25, "prv") == pytest.approx(1.3477, abs=0.01)
    assert steps_per_epoch(92, 32) == 3 and sample_rate(92, 32) == pytest.approx(1 / 3)


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_noise_plan_leaves_room_for_the_label_count_release(accountant):
    prefix = [count_release(10.0)]
    alone = plan_noise(4.0, 1e-5, 0.05, 400, accountant)
    after = plan_noise(4.0, 1e-5, 0.05, 400, accountant, prefix=prefix)
    assert after >= alone
    spent = epsilon(prefix + [[after, 0.05, 400]], 1e-5, accountant)
    assert 4.0 * 0.98 <= spent <= 4.0
    with pytest.raises(ValueError):
        plan_noise(0.1, 1e-5, 0.05, 400, accountant, prefix=[count_release(1.0)])


def _dp_site(cohort, tmp_path, **privacy):
    import yaml

    src = cohort / "site-a" / "site.yaml"
    raw = yaml.safe_load(src.read_text())
    for k in ("dicom_dir", "labels", "secret_file"):
        raw["site"][k] = str((src.parent / raw["site"][k]).resolve())
    raw["site"]["state_dir"] = str(tmp_path / "state")
    raw["privacy"] = {"dp": True, "delta": 1e-5, "max_grad_norm": 1.0, **privacy}
    raw["train"]["batch_size"] = 16
    p = tmp_path / "site.yaml"
    p.write_text(yaml.safe_dump(raw))
    return load_site_config(p)


def test_budget_persists_across_restart_and_is_enforced(cohort, site_data, tmp_path, caplog):
    cfg = _dp_site(cohort, tmp_path, target_epsilon=3.0, noise_multiplier=2.0)
    data = site_data["site-a"][1]
    g = get_weights(build_model(MC))
    plan = dict(run="r1", num_rounds=10, local_epochs=1)
    t1 = SiteTrainer(cfg, MC, data, logger=LOG)
    o1 = t1.train(g, RoundPlan(server_round=1, **plan))
    e1 = o1.metrics["epsilon"]
    assert 0 < e1 < 3.0 and o1.metrics["declined"] == 0.0 and o1.weights is not None
    ledger_file = Ledger.file_for(cfg.site.state_dir)
    saved = json.loads(ledger_file.read_text())["runs"]["r1"]
    assert saved["epsilon"] == pytest.approx(e1) and saved["rounds_trained"] == [1]
    assert all(isinstance(x, (int, float)) for h in saved["history"] for x in h)  # numbers only
    # The label counts behind the class weights were released once, with noise, and accounted first.
    assert saved["history"][0] == [10.0, 1.0, 1] and saved["count_noise_multiplier"] == 10.0
    true_counts = [float((t1.split(TRAIN).labels == c).sum()) for c in (0, 1)]
    assert len(saved["class_counts"]) == 2 and min(saved["class_counts"]) >= 1.0
    assert saved["class_counts"] != true_counts
    # "Restart": a new trainer (a new process in a real daemon) reads the ledger back.
    eps, r = [e1], 2
    with caplog.at_level(logging.WARNING, logger="tests.privacy"):
        while True:
            o = SiteTrainer(cfg, MC, data, logger=LOG).train(g, RoundPlan(server_round=r, **plan))
            if o.declined:
                break
            assert o.metrics["epsilon"] > eps[-1]  # cumulative, not per round
            eps.append(o.metrics["epsilon"])
            r += 1
            assert r < 50
    assert max(eps) <= 3.0 and o.metrics["epsilon-if-trained"] > 3.0
    assert o.weights is None and o.metrics["declined"] == 1.0
    assert "declined to train" in caplog.text
    final = json.loads(ledger_file.read_text())["runs"]["r1"]
    assert final["rounds_declined"] == [r]
    assert final["class_counts"] == saved["class_counts"]  # released once, reused every round
    assert sum(1 for h in final["history"] if h[1] == 1.0) == 1
    # The epsilon reported equals an independent accountant over the whole history.
    acc = RDPAccountant()
    acc.history = [tuple(h) for h in json.loads(ledger_file.read_text())["runs"]["r1"]["history"]]
    assert acc.get_epsilon(1e-5) == pytest.approx(eps[-1])


def test_noise_derived_from_target_spends_the_budget_over_the_planned_run(cohort, site_data, tmp_path):
    cfg = _dp_site(cohort, tmp_path, target_epsilon=4.0, noise_multiplier=None)
    data = site_data["site-a"][1]
    g = get_weights(build_model(MC))
    rounds = 3
    outs = [SiteTrainer(cfg, MC, data, logger=LOG).train(g, RoundPlan(run="r2", server_round=i, num_rounds=rounds)) for i in (1, 2, 3)]
    assert not any(o.declined for o in outs)
    assert outs[-1].metrics["epsilon"] == pytest.approx(4.0, rel=0.02)
    assert len({o.metrics["noise-multiplier"] for o in outs}) == 1  # fixed once, kept in the ledger
    assert SiteTrainer(cfg, MC, data, logger=LOG).train(g, RoundPlan(run="r2", server_round=4, num_rounds=rounds)).declined


def test_unweighted_private_training_releases_no_counts(cohort, site_data, tmp_path):
    cfg = _dp_site(cohort, tmp_path, target_epsilon=3.0, noise_multiplier=2.0, class_weights="none")
    o = SiteTrainer(cfg, MC, site_data["site-a"][1], logger=LOG).train(
        get_weights(build_model(MC)), RoundPlan(run="r3", server_round=1, num_rounds=3))
    saved = json.loads(Ledger.file_for(cfg.site.state_dir).read_text())["runs"]["r3"]
    assert not o.declined and saved["class_counts"] is None
    assert all(h[1] < 1.0 for h in saved["history"])  # only DP-SGD steps were accounted


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "dicomfl.workbench.cli", *args], capture_output=True, text=True, timeout=300)


def test_privacy_cli(cohort):
    r = _cli("privacy", "epsilon", "--sample-rate", "0.04", "--noise-multiplier", "1.5", "--steps", "2250", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["epsilon"] == pytest.approx(7.32911, abs=1e-4)
    r = _cli("privacy", "epsilon", "--sample-rate", "0.04", "--noise-multiplier", "1.5", "--steps", "10", "--accountant", "xyz")
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "--accountant" in r.stderr
    r = _cli("privacy", "plan", str(cohort / "site-a" / "site.yaml"), str(cohort / "run.yaml"), "--json")
    assert r.returncode == 0, r.stderr
    plan = json.loads(r.stdout)
    assert plan["epsilon_at_end"] == pytest.approx(plan["target_epsilon"], rel=0.02)
    # the run's feature statistics are one Gaussian release before round 1, planned for (fedstats)
    assert plan["feature_stats_noise"] == 4.0 and plan["epsilon_of_feature_stats_alone"] == pytest.approx(1.013, abs=1e-3)
    assert plan["total_steps"] == plan["rounds"] * plan["local_epochs"] * steps_per_epoch(plan["train_images"], plan["batch_size"])
    r = _cli("model", str(cohort / "run.yaml"))
    assert r.returncode == 0 and "parameters: total" in r.stdout and "ok" in r.stdout
