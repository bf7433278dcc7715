"""Robust by default: with the run's DEFAULT settings (``RunConfig().run``), one malicious site of
three is rejected or bounded, a free rider is reported, and with two sites the report says what
cannot be defended. Pure-NumPy checks of :func:`screen_updates` with the run's rules, then one short
in-process federation through the real round loop and site handlers (the attacker wraps a real
site's handler, as in tests/test_untrusted.py).
"""

from __future__ import annotations

import math

import numpy as np
import yaml

from dicomfl.common import protocol as P
from dicomfl.common.config import RunConfig, load_run_config
from dicomfl.server.checks import ScreenRules, l2_norm, screen_updates
from dicomfl.server.checkpoint import Checkpoints
from dicomfl.server.federation import Federation
from dicomfl.workbench.attacks import AttackedSite, free_rider, sign_flip
from dicomfl.workbench.inprocess import InProcessGrid

from .test_federation import MODEL, SITES

RULES = ScreenRules.from_run(RunConfig().run)


def _problem(n_honest=3, seed=0, dim=(40, 30)):
    """A global model and honest updates that share a direction (a common gradient plus each
    site's own part, norms within 2x of each other), as sites on related data send."""
    rng = np.random.default_rng(seed)
    ref = {"w": rng.normal(size=dim).astype(np.float32), "b": rng.normal(size=dim[1]).astype(np.float32)}
    common = {k: rng.normal(size=v.shape) * 0.02 for k, v in ref.items()}
    ups, deltas = {}, {}
    for i in range(n_honest):
        scale = 1.0 + 0.3 * i
        d = {k: scale * (common[k] + rng.normal(size=v.shape) * 0.02) for k, v in ref.items()}
        deltas[f"site-{i}"] = d
        ups[f"site-{i}"] = {k: (ref[k] + d[k]).astype(np.float32) for k in ref}
    return ref, ups, deltas


def _vec(d):
    return np.concatenate([np.ravel(d[k]) for k in sorted(d)]).astype(np.float64)


def _aggregate(sc, ref):
    """The weighted mean update of what screening accepted (FedAvg on the screened arrays)."""
    total = sum(sc.weights.values())
    return sum(sc.weights[s] / total * (_vec(sc.arrays[s]) - _vec(ref)) for s in sc.arrays)


def _cos(a, b):
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_the_defaults_turn_the_rules_on():
    assert 1 < RULES.max_update_norm_ratio < 9 and 1 < RULES.clip_update_median_ratio <= RULES.max_update_norm_ratio
    assert RULES.free_rider_rel > 0 and RULES.free_rider_ratio > 0
    assert RULES.max_update_norm_rel > 0 and RULES.max_weight_share < 1
    assert ScreenRules() == ScreenRules.from_run(object())  # nothing named: every rule off
    # SCAFFOLD's honest updates spread wider: only max_update_norm_ratio applies there
    scaffold = RunConfig(run={"strategy": "scaffold"}).run
    assert ScreenRules.from_run(scaffold).max_update_norm_ratio == scaffold.max_update_norm_ratio


def test_honest_updates_all_count_with_the_defaults():
    ref, ups, _ = _problem(n_honest=5)
    sc = screen_updates(ups, {s: 100 for s in ups}, ref, rules=RULES)
    assert sc.rejected == {} and sc.clipped == {} and sorted(sc.arrays) == sorted(ups)
    # a big honest update (2.5x the median) still counts, clipped in its own direction
    ups["site-4"] = {k: (ref[k] + 1.8 * (ups["site-4"][k].astype(np.float64) - ref[k])).astype(np.float32) for k in ref}
    sc = screen_updates(ups, {s: 100 for s in ups}, ref, rules=RULES)
    assert sc.rejected == {} and 0 < sc.clipped["site-4"] < 1


def test_the_direction_rule_when_turned_on():
    """Off by default (see server/checks.py); on, it rejects an update against a clear majority."""
    ref, ups, deltas = _problem(n_honest=4)
    ups["site-1"] = {k: (ref[k] - deltas["site-1"][k]).astype(np.float32) for k in ref}  # same norm, flipped
    sc = screen_updates(ups, {s: 100 for s in ups}, ref, rules=ScreenRules(min_update_cosine=0.0))
    assert list(sc.rejected) == ["site-1"] and "direction" in sc.rejected["site-1"]
    assert all(c > 0.3 for s, c in sc.cosines.items() if s != "site-1")


def test_a_x9_sign_flip_of_one_site_in_three_is_rejected():
    ref, ups, deltas = _problem(n_honest=3)
    honest_mean = np.mean([_vec(d) for s, d in deltas.items() if s != "site-1"], axis=0)
    # stays under the old defaults' median-ratio rule (9x < 10x) and the absolute bound
    ups["site-1"] = {k: (ref[k] - 9 * deltas["site-1"][k]).astype(np.float32) for k in ref}
    old = screen_updates(ups, {s: 100 for s in ups}, ref, max_update_norm_rel=1.0, max_update_norm_ratio=10.0,
                         max_weight_share=0.5)
    assert old.rejected == {}  # what the finding reported: the old defaults let it in
    assert _cos(_aggregate(old, ref), honest_mean) < 0  # and it inverts the round
    sc = screen_updates(ups, {s: 100 for s in ups}, ref, rules=RULES)
    assert list(sc.rejected) == ["site-1"] and "median" in sc.rejected["site-1"]
    assert _cos(_aggregate(sc, ref), honest_mean) > 0.95


def test_noise_of_five_honest_norms_is_clipped_to_the_rounds_spread():
    ref, ups, deltas = _problem(n_honest=3)
    rng = np.random.default_rng(1)
    size = l2_norm(deltas["site-1"])
    noise = {k: rng.normal(size=v.shape) for k, v in ref.items()}
    noise = {k: v * 5 * size / l2_norm(noise) for k, v in noise.items()}
    ups["site-1"] = {k: (ref[k] + noise[k]).astype(np.float32) for k in ref}
    sc = screen_updates(ups, {s: 100 for s in ups}, ref, rules=RULES)
    assert list(sc.rejected) == ["site-1"]  # 5x its own norm: above the median rule
    # noise under the median rule (3x) counts, clipped to the round's spread
    ups["site-1"] = {k: (ref[k] + noise[k] * 3 / 5).astype(np.float32) for k in ref}
    sc = screen_updates(ups, {s: 100 for s in ups}, ref, rules=RULES)
    med = float(np.median(list(sc.distances.values())))
    assert sc.rejected == {} and sc.clipped["site-1"] < 1.0
    bounded = l2_norm({k: sc.arrays["site-1"][k].astype(np.float64) - ref[k] for k in ref})
    assert bounded <= RULES.clip_update_median_ratio * med * (1 + 1e-5)


def test_a_free_rider_is_reported_whatever_it_claims():
    ref, ups, deltas = _problem(n_honest=3)
    ups["rider"] = {k: v.copy() for k, v in ref.items()}  # the global model sent back
    ups["token"] = {k: (ref[k] + 1e-3 * deltas["site-0"][k]).astype(np.float32) for k in ref}  # a token step
    sc = screen_updates(ups, {**{s: 100 for s in ups}, "rider": 1e6, "token": 1e6}, ref, rules=RULES)
    assert sorted(sc.rejected) == ["rider", "token"]
    assert all(w.startswith("free-rider") for w in sc.rejected.values())
    assert sorted(sc.arrays) == ["site-0", "site-1", "site-2"]
    # with two sites the ratio cannot say which is the token one, but the model sent back is caught
    two = screen_updates({"site-0": ups["site-0"], "rider": ups["rider"]}, {"site-0": 100, "rider": 1e6}, ref,
                         rules=RULES)
    assert list(two.rejected) == ["rider"] and two.rejected["rider"].startswith("free-rider")


def test_with_two_sites_only_the_bounds_apply():
    """Two sites: no direction or median rule (nobody can tell which one is honest), but the
    relative clip keeps either one within clip_update_median_ratio x the other's step."""
    ref, ups, deltas = _problem(n_honest=2)
    ups["site-1"] = {k: (ref[k] - 9 * deltas["site-1"][k]).astype(np.float32) for k in ref}
    sc = screen_updates(ups, {s: 100 for s in ups}, ref, rules=RULES)
    assert sc.rejected == {} and sc.cosines == {}
    honest = sc.distances["site-0"]
    moved = l2_norm({k: sc.arrays["site-1"][k].astype(np.float64) - ref[k] for k in ref})
    assert moved <= RULES.clip_update_median_ratio * honest * (1 + 1e-5)


# --------------------------------------------------------------------- one in-process federation
def _run_yaml(tmp_path, cohort, name, sites, rounds):
    cfg = {"run": {"name": name, "rounds": rounds, "strategy": "fedavg", "min_sites": 1, "local_epochs": 1,
                   "out_dir": str(tmp_path / name)},
           "cross_site": {"every": 0, "local_baseline": False}, "model": MODEL, "sites": [str(p) for p in sites]}
    p = tmp_path / f"{name}.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return load_run_config(p)


class _Recorder(AttackedSite):
    """The attacked grid's handler, also keeping each round's global model and honest updates."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.globals, self.honest = {}, {}

    def __call__(self, msg, context):
        reply = self.handler.handle(msg, context)
        if msg.metadata.message_type == "train" and reply.has_content():
            rnd = int(msg.content[P.CONFIG]["server-round"])
            g = P.from_record(msg.content[P.ARRAYS])
            self.globals[rnd] = g
            if self.names[context.node_id] in self.sites:
                self.rewrite(reply, rnd, g)
            else:
                w = P.from_record(reply.content[P.ARRAYS])
                self.honest.setdefault(rnd, []).append(_vec({k: w[k].astype(np.float64) - g[k] for k in g}))
        return reply


def test_a_x9_sign_flip_in_every_round_is_rejected_and_the_model_follows_the_honest_sites(cohort, tmp_path):
    cfg = _run_yaml(tmp_path, cohort, "flip9", [cohort / s / "site.yaml" for s in SITES], rounds=2)
    assert cfg.run.min_update_cosine == RunConfig().run.min_update_cosine  # the defaults, untouched
    grid = InProcessGrid(cfg.sites)
    grid.app = _Recorder(grid, {"site-b"}, sign_flip(9.0))
    summary = Federation(cfg, grid).run()
    final = Checkpoints(cfg.out_dir).latest().global_weights
    for h in summary["history"]:
        assert "site-b" in h["rejected"] and "site-b" not in h["aggregated"], h
        assert sorted(h["aggregated"]) == ["site-a", "site-c"]
    rounds = sorted(grid.app.globals)
    nxt = {r: grid.app.globals.get(r + 1, final) for r in rounds}
    for r in rounds:
        g = grid.app.globals[r]
        step = _vec({k: nxt[r][k].astype(np.float64) - g[k] for k in g})
        assert _cos(step, np.mean(grid.app.honest[r], axis=0)) > 0.9, r


def test_two_sites_a_free_rider_is_reported_and_the_report_states_the_limit(cohort, tmp_path):
    cfg = _run_yaml(tmp_path, cohort, "rider2", [cohort / s / "site.yaml" for s in SITES[:2]], rounds=1)
    grid = InProcessGrid(cfg.sites)
    grid.app = AttackedSite(grid, {"site-b"}, free_rider(1e6))
    summary = Federation(cfg, grid).run()
    h = summary["history"][0]
    assert h["rejected"]["site-b"].startswith("free-rider") and h["aggregated"] == ["site-a"]
    report = (cfg.out_dir / "report.md").read_text()
    assert "cannot be told from an honest one" in report and "need at least 3" in report
    assert "Free riders" in report and "site-b" in report
    assert not math.isnan(h["train_loss"] or 0.0)
