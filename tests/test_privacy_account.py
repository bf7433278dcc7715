"""The site's privacy account: one account per site's data, charge() the only spender, two budgets,
a ledger signed under the site's key (edited, truncated, cleared, deleted or rolled back: the site
refuses to train), migration of older ledgers, key rotation, and the torch-free accountant.
Real Opacus accounting, real training, real files."""

from __future__ import annotations

import ast
import json
import logging
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dicomfl.client.privacy import (Ledger, LedgerIntegrityError, PrivacyAccount, Release, effective_budget, epsilon,
                                    ledger_lock, plan_noise, read_site_ledger, site_spend)
from dicomfl.client.privacy.ledger import ledger_path, read_verified, seal_path
from dicomfl.client.trainer import RoundPlan, SiteTrainer
from dicomfl.common.config import PrivacySection, RunPrivacySection, load_site_config
from dicomfl.common.errors import ConfigError
from dicomfl.common.model import ModelConfig, build_model, get_weights

ROOT = Path(__file__).resolve().parent.parent
MC = ModelConfig(image_size=32, width=8, depth=2, meta_hidden=32, head_hidden=32)
LOG = logging.getLogger("tests.privacy_account")
DICOMFL = [sys.executable, "-m", "dicomfl.workbench.cli"]

# --------------------------------------------------------------------------- reference values
# Recorded with dicomfl before the accountant was loaded without Opacus's package (dicomfl.client.
# privacy.epsilon over Opacus's RDPAccountant/PRVAccountant): (sigma, q, steps, delta, accountant, epsilon).
REFERENCE = [
    (1.5, 0.04, 2250, 1e-05, "rdp", 7.3291111714386545),
    (1.5, 0.04, 2250, 1e-05, "prv", 6.7791320762541165),
    (1.1, 0.01, 500, 1e-06, "rdp", 1.5723560583001268),
    (1.1, 0.01, 500, 1e-06, "prv", 1.2852447271210052),
    (0.8, 0.25, 40, 1e-05, "rdp", 18.52560079322137),
    (0.8, 0.25, 40, 1e-05, "prv", 16.681169615469322),
    (4.0, 1.0, 1, 1e-05, "rdp", 1.0125506277526435),
    (10.0, 1.0, 1, 1e-05, "prv", 0.35070249948421145),
    (2.0, 0.5, 7, 0.001, "rdp", 2.57133983508191),
    (3.0, 0.001, 100000, 1e-07, "rdp", 0.5228754891585773),
    (0.6, 0.02, 300, 1e-05, "prv", 8.40377709029407),
    (25.0, 0.3, 3, 1e-05, "rdp", 0.11677149734023101),
]
SITE_HISTORY = [[10.0, 1.0, 1], *[[1.3, 0.1, 10]] * 5, [0.9, 0.2, 7]]
SITE_HISTORY_EPS = {"rdp": 6.8945441125501254, "prv": 6.030361215276374}
PLANS = [(8.0, 1e-05, 0.04, 2250, "rdp", None, 1.416015625), (8.0, 1e-05, 0.04, 2250, "prv", None, 1.34765625),
         (4.0, 1e-05, 0.05, 400, "rdp", [[10.0, 1.0, 1]], 1.4296875)]


@pytest.mark.parametrize("sigma,q,steps,delta,accountant,eps", REFERENCE)
def test_epsilon_is_identical_to_the_recorded_values_and_to_opacus(sigma, q, steps, delta, accountant, eps):
    from opacus.accountants import PRVAccountant, RDPAccountant

    assert epsilon([[sigma, q, steps]], delta, accountant) == eps
    acc = RDPAccountant() if accountant == "rdp" else PRVAccountant()
    acc.history = [(sigma, q, steps)]
    assert acc.get_epsilon(delta) == eps


def test_composition_and_noise_plans_are_identical_to_the_recorded_values_and_to_opacus():
    from opacus.accountants.utils import get_noise_multiplier

    for accountant, eps in SITE_HISTORY_EPS.items():
        assert epsilon(SITE_HISTORY, 1e-5, accountant) == eps
    for target, delta, q, steps, accountant, prefix, sigma in PLANS:
        assert plan_noise(target, delta, q, steps, accountant, prefix=prefix) == sigma
        if prefix is None:
            assert get_noise_multiplier(target_epsilon=target, target_delta=delta, sample_rate=q, steps=steps,
                                        accountant=accountant) == sigma


def test_privacy_epsilon_starts_without_torch():
    r = subprocess.run([sys.executable, "-X", "importtime", "-m", "dicomfl.workbench.cli", "privacy", "epsilon",
                        "--sample-rate", "0.04", "--noise-multiplier", "1.5", "--steps", "2250", "--json"],
                       capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout)["epsilon"] == REFERENCE[0][-1]
    imported = {line.split("|")[-1].strip() for line in r.stderr.splitlines() if line.startswith("import time:")}
    assert not {m for m in imported if m.split(".")[0] in ("torch", "opacus", "flwr", "pydantic")}, "heavy import"


# ---------------------------------------------------------------------- charge is the only spender
def test_only_the_account_writes_a_ledger_history():
    """No module of client/ outside client/privacy/account.py assigns or extends an accountant
    history, writes the release log or signs a ledger: every spend goes through charge()."""
    offenders = []
    for path in sorted((ROOT / "client").rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if rel in ("client/privacy/account.py", "client/privacy/ledger.py"):
            continue
        if rel == "client/privacy/accountant.py":  # throwaway Opacus accountants for the arithmetic, no ledger
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for t in targets:
                if isinstance(t, ast.Attribute) and t.attr in ("history", "rounds_trained"):
                    offenders.append(f"{rel}:{node.lineno}")
                if isinstance(t, ast.Subscript) and isinstance(t.slice, ast.Constant) and t.slice.value in (
                        "history", "releases", "runs"):
                    offenders.append(f"{rel}:{node.lineno}")
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                f = node.func
                if f.attr in ("append", "extend", "insert") and isinstance(f.value, ast.Attribute) and \
                        f.value.attr in ("history", "rounds_trained"):
                    offenders.append(f"{rel}:{node.lineno}")
                if f.attr in ("write_signed", "settle", "_write", "seal_empty"):
                    offenders.append(f"{rel}:{node.lineno}")
            if isinstance(node, ast.Name) and node.id in ("write_signed", "seal_empty"):
                offenders.append(f"{rel}:{node.lineno}")
    assert offenders == []
    # and the test sees what it looks for: the account module itself writes histories
    account = ast.parse((ROOT / "client/privacy/account.py").read_text())
    assert any(isinstance(n, ast.Assign) and any(isinstance(t, ast.Attribute) and t.attr == "history" for t in n.targets)
               for n in ast.walk(account))


# ------------------------------------------------------------------------------- helpers
def _site(cohort, tmp_path, key_file: Path | None = None, **privacy) -> Path:
    src = cohort / "site-a" / "site.yaml"
    raw = yaml.safe_load(src.read_text())
    for k in ("dicom_dir", "labels", "secret_file"):
        raw["site"][k] = str((src.parent / raw["site"][k]).resolve())
    if key_file is not None:
        raw["site"]["secret_file"] = str(key_file)
    raw["site"]["state_dir"] = str(tmp_path / "state")
    raw["privacy"] = {"delta": 1e-5, "max_grad_norm": 1.0, **privacy}
    raw["train"]["batch_size"] = 16
    p = tmp_path / "site.yaml"
    p.write_text(yaml.safe_dump(raw))
    return p


def _key(path: Path) -> Path:
    path.write_text(os.urandom(32).hex())
    path.chmod(0o600)
    return path


def _train(cfg, data, run="r", rnd=1, rounds=3, **plan):
    return SiteTrainer(cfg, MC, data, logger=LOG).train(get_weights(build_model(MC)),
                                                       RoundPlan(run=run, server_round=rnd, num_rounds=rounds, **plan))


def _refused_in_one_line(cfg, data, why: str) -> None:
    with pytest.raises(LedgerIntegrityError) as err:
        _train(cfg, data, run="after", rnd=1)
    msg = str(err.value)
    assert isinstance(err.value, ConfigError) and "\n" not in msg and why in msg, msg
    named = seal_path(cfg.site.state_dir) if why.startswith("seal does") else ledger_path(cfg.site.state_dir)
    assert msg.startswith(f"{named}: ")  # the file it is about, first


@pytest.fixture
def trained(cohort, site_data, tmp_path):
    """A DP site that trained one round (a signed ledger and its seal), and its data."""
    cfg = load_site_config(_site(cohort, tmp_path, dp=True, run_epsilon=6.0, lifetime_epsilon=6.0, noise_multiplier=2.0))
    data = site_data["site-a"][1]
    assert not _train(cfg, data).declined
    return cfg, data


# ------------------------------------------------------------------------------ ledger integrity
def test_the_ledger_is_signed_sealed_and_keeps_the_runs_mapping(trained):
    cfg, _ = trained
    raw = json.loads(ledger_path(cfg.site.state_dir).read_text())
    assert raw["version"] == 2 and len(raw["hmac"]) == 64 and raw["sequence"] >= 1
    assert raw["runs"]["r"]["run"] == "r" and raw["runs"]["r"]["kind"] == "train" and raw["runs"]["r"]["history"]
    assert [(e["kind"], e["private"]) for e in raw["releases"]] == [("labels", True), ("train", True)]
    seal = json.loads(seal_path(cfg.site.state_dir).read_text())
    assert seal["sequence"] == raw["sequence"] and seal["ledger"] == raw["hmac"]
    assert oct(ledger_path(cfg.site.state_dir).stat().st_mode & 0o777) == "0o600"


@pytest.mark.parametrize("damage", ["edited", "truncated", "cleared", "unsigned-empty", "deleted", "rolled-back",
                                    "seal-deleted", "seal-edited"])
def test_a_damaged_ledger_makes_the_site_refuse_to_train(trained, damage):
    cfg, data = trained
    state = cfg.site.state_dir
    path, seal = ledger_path(state), seal_path(state)
    older = path.read_bytes()
    assert not _train(cfg, data, rnd=2).declined  # a second write: the older copy is now stale
    raw = json.loads(path.read_text())
    if damage == "edited":  # a smaller spend, the signature kept
        raw["runs"]["r"]["history"] = raw["runs"]["r"]["history"][:1]
        path.write_text(json.dumps(raw))
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    elif damage == "cleared":
        path.write_text(json.dumps({**raw, "runs": {}}))
    elif damage == "unsigned-empty":
        path.write_text(json.dumps({"version": 1, "runs": {}}))
    elif damage == "deleted":
        path.unlink()
    elif damage == "rolled-back":
        path.write_bytes(older)
    elif damage == "seal-deleted":
        seal.unlink()
    elif damage == "seal-edited":
        s = json.loads(seal.read_text())
        seal.write_text(json.dumps({**s, "sequence": 0}))
    why = {"edited": "does not verify", "truncated": "cannot be read", "cleared": "does not verify",
           "unsigned-empty": "unsigned", "deleted": "is missing", "rolled-back": "older or foreign copy",
           "seal-deleted": "seal (ledger.seal) is missing", "seal-edited": "seal does not verify"}[damage]
    _refused_in_one_line(cfg, data, why)
    # nothing was written: the damage is there for the officer to see, and the site still refuses
    _refused_in_one_line(cfg, data, why)


def test_a_damaged_ledger_is_a_site_config_error_through_the_handler(cohort, tmp_path):
    from dicomfl.client.handler import SiteHandler
    from dicomfl.common import protocol as P
    from tests.test_site_trust import _ctx, _train_msg

    site = _site(cohort, tmp_path, dp=True, run_epsilon=6.0, lifetime_epsilon=6.0, noise_multiplier=2.0)
    handler = SiteHandler()
    assert not handler.handle(_train_msg(run="h", rnd=1), _ctx(site)).has_error()
    path = ledger_path(tmp_path / "state")
    raw = json.loads(path.read_text())
    raw["runs"]["h"]["history"] = []
    path.write_text(json.dumps(raw))
    reply = handler.handle(_train_msg(run="h", rnd=2), _ctx(site))
    assert reply.has_error() and reply.error.code == P.ERR_CONFIG
    assert P.ERROR_REASON_RE.fullmatch(reply.error.reason)


def test_a_deleted_ledger_of_a_site_that_never_spent_is_fine_but_not_after_a_write(cohort, site_data, tmp_path):
    cfg = load_site_config(_site(cohort, tmp_path, dp=False))
    key = cfg.secret_key
    with ledger_lock(cfg.site.state_dir):
        PrivacyAccount.open(cfg.site.state_dir, key, lifetime_epsilon=8.0)  # the first locked open seals
    assert json.loads(seal_path(cfg.site.state_dir).read_text())["sequence"] == 0
    assert read_verified(cfg.site.state_dir, key)[0]["runs"] == {}
    _train(cfg, site_data["site-a"][1])  # without DP: logged as not private, so written and sealed
    ledger_path(cfg.site.state_dir).unlink()
    _refused_in_one_line(cfg, site_data["site-a"][1], "is missing")


# ------------------------------------------------------------------------------------ migration
def test_an_old_unsigned_ledger_is_migrated_with_its_spend_intact(cohort, site_data, tmp_path):
    """A ledger as dicomfl wrote it before the account (version 1, no signature, the local baseline
    as ``<run>.local``): read as it is, signed at the first locked open, nothing reset; its spend
    still counts against the lifetime budget."""
    cfg = load_site_config(_site(cohort, tmp_path, dp=True, run_epsilon=3.0, lifetime_epsilon=2.8, noise_multiplier=2.0))
    old = {"old": {"accountant": "rdp", "delta": 1e-5, "target_epsilon": 3.0, "noise_multiplier": 2.0,
                   "max_grad_norm": 1.0, "planned_steps": 12, "history": [[10.0, 1.0, 1], [2.0, 0.25, 8]],
                   "rounds_trained": [1, 2], "rounds_declined": [], "class_counts": [20.5, 9.1],
                   "count_noise_multiplier": 10.0, "feature_stats": None, "stats_noise_multiplier": None},
           "old.local": {"accountant": "rdp", "delta": 1e-5, "target_epsilon": 3.0, "noise_multiplier": 2.0,
                         "max_grad_norm": 1.0, "planned_steps": 12, "history": [[2.0, 0.25, 4]], "rounds_trained": [1],
                         "rounds_declined": [], "class_counts": None, "count_noise_multiplier": None,
                         "feature_stats": None, "stats_noise_multiplier": None}}
    spent = epsilon([h for r in old.values() for h in r["history"]], 1e-5, "rdp")
    assert 2.0 < spent < 2.8
    path = ledger_path(cfg.site.state_dir)
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"version": 1, "runs": {k: {**v, "epsilon": 0.0} for k, v in old.items()},
                                "epsilon_total": spent}, indent=2))
    assert site_spend(cfg.site.state_dir, "rdp", 1e-5, key=cfg.secret_key)["epsilon_total"] == pytest.approx(spent)
    out = _train(cfg, site_data["site-a"][1], run="new")
    # the old spend counted: one more round at sigma 2 does not fit in what was left of 2.8 (alone
    # it would fit in the per-run cap of 3.0)
    assert out.declined and out.metrics["epsilon-if-trained"] > 2.8
    raw = json.loads(path.read_text())
    assert raw["version"] == 2 and "hmac" in raw and seal_path(cfg.site.state_dir).is_file()
    assert raw["runs"]["old"]["history"] == old["old"]["history"] and raw["runs"]["old"]["kind"] == "train"
    assert raw["runs"]["old.local"]["history"] == old["old.local"]["history"]
    assert (raw["runs"]["old.local"]["run"], raw["runs"]["old.local"]["kind"]) == ("old", "local")
    assert raw["runs"]["old"]["class_counts"] == [20.5, 9.1]
    assert raw["runs"]["new"]["rounds_declined"] == [1]
    assert site_spend(cfg.site.state_dir, "rdp", 1e-5, key=cfg.secret_key)["epsilon_total"] == pytest.approx(spent)


# ------------------------------------------------------------------------------------ key rotation
def test_reseal_signs_under_the_new_key_and_the_old_key_then_fails(cohort, site_data, tmp_path):
    old_key = _key(tmp_path / "old.key")
    site = _site(cohort, tmp_path, key_file=old_key, dp=True, run_epsilon=6.0, lifetime_epsilon=6.0, noise_multiplier=2.0)
    data = site_data["site-a"][1]
    assert not _train(load_site_config(site), data).declined
    before = site_spend(tmp_path / "state", "rdp", 1e-5, key=old_key.read_bytes().strip())
    new_key = _key(tmp_path / "new.key")
    raw = yaml.safe_load(site.read_text())
    raw["site"]["secret_file"] = str(new_key)
    site.write_text(yaml.safe_dump(raw))
    cfg = load_site_config(site)
    _refused_in_one_line(cfg, data, "seal does not verify")  # the key changed, the ledger not yet
    wrong = _key(tmp_path / "wrong.key")
    r = subprocess.run([*DICOMFL, "privacy", "reseal", str(site), "--old-key-file", str(wrong)], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and "does not verify" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    r = subprocess.run([*DICOMFL, "privacy", "reseal", str(site), "--old-key-file", str(old_key)], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "resealed" in r.stdout
    with pytest.raises(LedgerIntegrityError):
        read_verified(cfg.site.state_dir, old_key.read_bytes().strip())
    after = site_spend(cfg.site.state_dir, "rdp", 1e-5, key=cfg.secret_key)
    assert after["runs"] == before["runs"] and after["epsilon_total"] == before["epsilon_total"]
    assert not _train(cfg, data, rnd=2).declined


# ------------------------------------------------------------------------------------- two budgets
def _account(tmp_path, lifetime):
    from dicomfl.common.config import read_site_key

    key = read_site_key(_key(tmp_path / "k.key"))
    state = tmp_path / "acct"
    with ledger_lock(state):
        return PrivacyAccount.open(state, key, lifetime_epsilon=lifetime), state, key


def test_the_per_run_cap_and_the_lifetime_budget_are_enforced_apart(tmp_path):
    acct, state, key = _account(tmp_path, lifetime=1.5)
    step = (3.0, 0.1, 10)  # four rounds fit in a cap of 1.0; three runs' four rounds would spend about 1.68

    def run_until_refused(run):
        led = acct.stream(run, accountant="rdp", delta=1e-5, target_epsilon=1.0, max_grad_norm=1.0)
        for rnd in range(1, 200):
            d = acct.charge(Release("train", run, rnd, (step,)))
            if not d.granted:
                return led, d
        raise AssertionError("never refused")

    a, da = run_until_refused("a")
    assert da.refused_by == "run_epsilon" and da.epsilon_run > 1.0 >= a.spent() and a.rounds_declined
    b, db = run_until_refused("b")
    assert db.refused_by == "run_epsilon" and b.spent() <= 1.0
    c, dc = run_until_refused("c")  # three runs within their cap would spend more than the lifetime
    assert dc.refused_by == "lifetime_epsilon" and dc.epsilon_after == dc.epsilon_total > 1.5
    assert c.spent() < 1.0 and c.spent_total() <= 1.5 and len(c.history) < len(a.history)
    # the local baseline is a stream of its own under the same lifetime budget
    acct.stream("c", "local", accountant="rdp", delta=1e-5, target_epsilon=1.0, max_grad_norm=1.0)
    assert acct.charge(Release("local", "c", 1, (step,))).refused_by == "lifetime_epsilon"
    # a release without DP is always granted and logged as not private
    d = acct.charge(Release("fedstats", "c", private=False))
    assert d.granted and math.isinf(d.epsilon_run)
    assert [r.kind for r in acct.releases() if not r.private] == ["fedstats"]
    with pytest.raises(ValueError):
        Release("train", "x", 1)  # a private release has accountant entries
    # read back from the signed file: the same spend
    spend = site_spend(state, "rdp", 1e-5, key=key)
    assert spend["epsilon_total"] == pytest.approx(c.spent_total())
    assert spend["not_private"] == [{"run": "c", "kind": "fedstats", "releases": 1, "epsilon": None}]


def test_what_a_run_may_ask_is_less_never_more():
    site = PrivacySection(dp=False, run_epsilon=4.0, lifetime_epsilon=10.0, delta=1e-5)
    assert effective_budget(site, None) == (False, 4.0, 1e-5)
    assert effective_budget(site, RunPrivacySection(dp=True, target_epsilon=2.0, delta=1e-6)) == (True, 2.0, 1e-6)
    assert effective_budget(site, RunPrivacySection(dp=True, target_epsilon=9.0, delta=1e-3)) == (True, 4.0, 1e-5)
    strict = PrivacySection(dp=True, run_epsilon=4.0)
    assert effective_budget(strict, RunPrivacySection(dp=False, target_epsilon=1.0)) == (True, 4.0, 1e-5)


def test_target_epsilon_still_sets_both_budgets_with_a_one_line_warning(caplog):
    from dicomfl.common import config

    config._DEPRECATED_SEEN.discard("privacy.target_epsilon")
    with caplog.at_level(logging.WARNING, logger="dicomfl.config"):
        p = PrivacySection.model_validate({"target_epsilon": 3.0})
    assert (p.run_epsilon, p.lifetime_epsilon) == (3.0, 3.0)
    lines = [r.getMessage() for r in caplog.records if "deprecated" in r.getMessage()]
    assert len(lines) == 1 and "privacy.target_epsilon" in lines[0] and "\n" not in lines[0]
    assert PrivacySection.model_validate({"target_epsilon": None}).lifetime_epsilon is None
    with pytest.raises(ValueError, match="target_epsilon"):
        PrivacySection.model_validate({"target_epsilon": 3.0, "run_epsilon": 2.0})
    default = PrivacySection()
    assert (default.run_epsilon, default.lifetime_epsilon) == (8.0, 8.0)


# ------------------------------------------------------------------------ releases without DP
def test_site_status_lists_the_releases_made_without_dp(cohort, site_data, tmp_path):
    from dicomfl.client.fedstats import site_statistics

    site = _site(cohort, tmp_path, dp=False)
    cfg = load_site_config(site)
    data = site_data["site-a"][1]
    for rnd in (1, 2):
        assert not _train(cfg, data, run="open", rnd=rnd).declined
    site_statistics(SiteTrainer(cfg, ModelConfig(image_size=32, width=8, depth=2, meta_hidden=32, head_hidden=32),
                                data), RoundPlan(run="open"))
    raw = read_site_ledger(cfg.site.state_dir)
    assert raw["runs"] == {}  # nothing private was spent
    assert [(e["kind"], e["run"], e["private"]) for e in raw["releases"]] == [("train", "open", False)] * 2 + [
        ("fedstats", "open", False)]
    r = subprocess.run([*DICOMFL, "site", "status", str(site)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "not private (no DP, epsilon infinite): run open, train: 2 release(s)" in r.stdout
    assert "not private (no DP, epsilon infinite): run open, fedstats: 1 release(s)" in r.stdout
    r = subprocess.run([*DICOMFL, "site", "status", str(site), "--json"], capture_output=True, text=True, timeout=120)
    p = json.loads(r.stdout)["privacy"]
    assert p["not_private"] == [{"run": "open", "kind": "fedstats", "releases": 1},
                                {"run": "open", "kind": "train", "releases": 2}]
    assert p["verified"] is True and p["epsilon_total"] == 0.0 and p["budget"] == 8.0 and p["run_cap"] == 8.0


def test_site_status_names_a_ledger_that_fails_its_check(trained):
    from dicomfl.client.status import site_status

    cfg, _ = trained
    path = ledger_path(cfg.site.state_dir)
    raw = json.loads(path.read_text())
    raw["runs"]["r"]["history"] = []
    path.write_text(json.dumps(raw))
    st = site_status(cfg)["privacy"]
    assert st["epsilon_total"] is None and "integrity check" in st["error"] and "ledger.json cannot be read" in st["error"]


def test_a_stream_made_directly_is_an_account_in_memory():
    led = Ledger(run="pooled", accountant="rdp", delta=1e-5, target_epsilon=2.0, max_grad_norm=1.0)
    assert led.account.state_dir is None and led.site_budget is None and led.others == []
    assert led.account.charge(Release("train", "pooled", 1, ((2.0, 0.1, 10),))).granted
    assert led.history == [[2.0, 0.1, 10]]
