"""Untrusted parties, coordinator side: the run survives any reply a broken or malicious site can
send, a rejected reply is named by the site's authenticated identity, and the global model is
unaffected or bounded. Each test drives the real round loop and the real site handler in process;
the attacker is a wrapper around a real site's handler that rewrites its replies.

The site side (hostile run names, the privacy budget across runs) is in tests/test_site_trust.py.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import yaml
from flwr.app import Array, ArrayRecord, MetricRecord

from dicomfl.client.handler import SiteHandler
from dicomfl.common import protocol as P
from dicomfl.common.config import load_run_config
from dicomfl.server.checkpoint import Checkpoints
from dicomfl.server.federation import Federation
from dicomfl.workbench.inprocess import InProcessGrid

from .test_federation import MODEL, SITES


def _run_yaml(tmp_path, cohort, name, sites, **run):
    cfg = {"run": {"name": name, "rounds": 1, "strategy": "fedavg", "min_sites": 1, "local_epochs": 1,
                   "out_dir": str(tmp_path / name), **run},
           "cross_site": {"every": 0, "local_baseline": False}, "model": MODEL, "sites": [str(p) for p in sites]}
    p = tmp_path / f"{name}.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return load_run_config(p)


def _extra_site(cohort, tmp_path, name, like="site-a"):
    """Another site with ``like``'s data under its own name and state."""
    raw = yaml.safe_load((cohort / like / "site.yaml").read_text())
    raw["site"].update({"name": name, "dicom_dir": str(cohort / like / "dicom"), "labels": str(cohort / like / "labels.csv"),
                        "secret_file": str(cohort / like / "site.key"), "state_dir": str(tmp_path / f"{name}-state")})
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


class Attacker:
    """The real handler for every site; the replies of ``victim`` sites go through ``rewrite``."""

    def __init__(self, grid: InProcessGrid, sites: set[str], rewrite) -> None:
        self.handler = SiteHandler()
        self.names = grid.trusted_names()
        self.sites, self.rewrite = sites, rewrite
        self.round = 0

    def __call__(self, msg, context):
        reply = self.handler.handle(msg, context)
        if msg.metadata.message_type == "train" and self.names[context.node_id] in self.sites and reply.has_content():
            self.rewrite(reply, int(msg.content[P.CONFIG]["server-round"]), P.from_record(msg.content[P.ARRAYS]))
        return reply


def _federate(cfg, rewrite, attackers, grid_cls=InProcessGrid):
    grid = grid_cls(cfg.sites)
    grid.app = Attacker(grid, attackers, rewrite)
    summary = Federation(cfg, grid).run()
    return summary, Checkpoints(cfg.out_dir).latest().global_weights


def _finite(weights) -> bool:
    return all(np.isfinite(v).all() for v in weights.values())


def _dist(a, b) -> float:
    return math.sqrt(sum(float(np.sum((a[k].astype(np.float64) - b[k]) ** 2)) for k in a))


# ------------------------------------------------------------------------------- malformed replies
def _malformed(reply, rnd, _):
    c = reply.content
    metrics = {k: v for k, v in c[P.METRICS].items()}
    if rnd == 1:  # a train reply without num-examples
        c[P.METRICS] = MetricRecord({k: v for k, v in metrics.items() if k != "num-examples"})
    elif rnd == 2:  # no metrics record at all
        del c[P.METRICS]
    elif rnd == 3:  # a list-valued metric
        c[P.METRICS] = MetricRecord({**metrics, "train-loss": [0.1, 0.2]})
    elif rnd == 4:  # an ArrayRecord where the metrics belong
        del c[P.METRICS]
        c[P.METRICS] = ArrayRecord({"num-examples": Array(np.array([5.0]))})
    elif rnd == 5:  # complex-valued weights (passed the old dtype check, then broke Flower's aggregation)
        w = P.from_record(c[P.ARRAYS])
        c[P.ARRAYS] = ArrayRecord({k: Array((v + 1j).astype(np.complex64)) for k, v in w.items()})


def test_malformed_replies_are_rejected_and_the_run_completes(cohort, tmp_path):
    cfg = _run_yaml(tmp_path, cohort, "malformed", [cohort / s / "site.yaml" for s in SITES], rounds=5)
    summary, final = _federate(cfg, _malformed, {"site-b"})
    assert [h["round"] for h in summary["history"]] == [1, 2, 3, 4, 5]
    for h in summary["history"]:
        assert "site-b" in h["rejected"], h
        assert sorted(h["aggregated"]) == ["site-a", "site-c"]
    assert _finite(final)
    assert "num-examples" in summary["history"][0]["rejected"]["site-b"]


# ------------------------------------------------------------------------------ num-examples abuse
CLAIMS = {1: float("nan"), 2: float("inf"), 3: 1e9, 4: -1e6, 5: 2.5}


def _claims(reply, rnd, _):
    m = {k: v for k, v in reply.content[P.METRICS].items()}
    m["num-examples"] = CLAIMS[rnd]
    reply.content[P.METRICS] = MetricRecord(m)


def test_num_examples_must_be_a_plausible_positive_integer(cohort, tmp_path):
    cfg = _run_yaml(tmp_path, cohort, "claims", [cohort / s / "site.yaml" for s in SITES], rounds=5)
    summary, final = _federate(cfg, _claims, {"site-b"})
    for h in summary["history"]:
        assert "site-b" in h["rejected"] and "num-examples" in h["rejected"]["site-b"], h
        assert "site-b" not in h["aggregated"]
    assert _finite(final)


def test_no_site_gets_more_than_its_share_of_the_weight(cohort, tmp_path):
    """A claim that passes the bounds (the first round has no earlier claim to compare with) is
    capped: the site's weight is at most max_weight_share of the round's total."""
    cfg = _run_yaml(tmp_path, cohort, "share", [cohort / s / "site.yaml" for s in SITES], max_weight_share=0.4)

    def big(reply, rnd, _):
        m = {k: v for k, v in reply.content[P.METRICS].items()}
        reply.content[P.METRICS] = MetricRecord({**m, "num-examples": 900_000.0})

    summary, _ = _federate(cfg, big, {"site-b"})
    h = summary["history"][0]
    assert "site-b" in h["aggregated"] and "site-b" in h["capped"]
    total = h["capped"]["site-b"] + sum(h["sites"][s]["num-examples"] for s in ("site-a", "site-c"))
    assert h["capped"]["site-b"] / total <= 0.4 + 1e-9


# ------------------------------------------------------------------------------ scaled updates
def _scaled(factor=None, add=None):
    def rewrite(reply, rnd, global_w):
        w = P.from_record(reply.content[P.ARRAYS])
        if add is not None:
            w = {k: v + add for k, v in w.items()}
        else:
            w = {k: global_w[k] + factor * (v - global_w[k]) for k, v in w.items()}
        reply.content[P.ARRAYS] = P.to_record({k: v.astype(np.float32) for k, v in w.items()})
    return rewrite


@pytest.mark.parametrize("n_sites", [2, 3])
def test_a_scaled_update_is_rejected_with_two_sites_and_with_three(cohort, tmp_path, n_sites):
    sites = [cohort / s / "site.yaml" for s in SITES[:n_sites]]
    cfg = _run_yaml(tmp_path, cohort, f"scaled{n_sites}", sites)
    summary, final = _federate(cfg, _scaled(add=1e4), {"site-b"})
    h = summary["history"][0]
    assert "norm" in h["rejected"]["site-b"] and "site-b" not in h["aggregated"]
    assert max(float(np.abs(v).max()) for v in final.values()) < 100  # nothing like +1e4 got in


def test_clipping_bounds_what_any_update_can_do(cohort, tmp_path):
    """An update 8x an honest one passes the norm rules (under the absolute bound); clipping
    bounds its distance from the global model."""
    cfg = _run_yaml(tmp_path, cohort, "clip", [cohort / s / "site.yaml" for s in SITES[:2]], clip_update_norm=0.05)
    summary, final = _federate(cfg, _scaled(factor=8.0), {"site-b"})
    h = summary["history"][0]
    assert "site-b" in h["clipped"] and h["clipped"]["site-b"] < 1.0
    from dicomfl.common.config import ModelConfig
    from dicomfl.common.model import build_model, get_weights

    initial = get_weights(build_model(ModelConfig(**MODEL), seed=cfg.run.seed))
    assert _dist(final, initial) <= 0.05 + 1e-4  # a weighted mean of updates each within the bound


# ------------------------------------------------------------------------------- collusion
def test_two_colluding_sites_of_three_do_not_get_through(cohort, tmp_path):
    cfg = _run_yaml(tmp_path, cohort, "collude", [cohort / s / "site.yaml" for s in SITES], strategy="fedmedian")
    summary, final = _federate(cfg, _scaled(add=1e4), {"site-b", "site-c"})
    h = summary["history"][0]
    assert {"site-b", "site-c"} <= set(h["rejected"]) and h["aggregated"] == ["site-a"]
    assert max(float(np.abs(v).max()) for v in final.values()) < 100


def test_a_robust_strategy_keeps_two_of_five_poisoners_out(cohort, tmp_path):
    """Poison small enough to pass the absolute norm bound (a fixed shift of every weight, 0.5x
    the bound; the median-ratio rule is off here, so only the strategy stands in the way), from
    2 of 5 sites: the coordinate-wise median stays with the honest majority, the mean does not."""
    sites = [cohort / s / "site.yaml" for s in SITES] + [_extra_site(cohort, tmp_path, n) for n in ("site-d", "site-e")]
    honest = _run_yaml(tmp_path, cohort, "honest5", sites, strategy="fedmedian")
    _, clean_w = _federate(honest, lambda *a: None, set())
    # Plumbing: the new default rules (run.max_update_median_ratio, run.clip_update_median_ratio)
    # are off too, so that only the strategy stands in the way, as this test means.
    off = {"max_update_norm_ratio": 0.0, "max_update_median_ratio": 0.0, "clip_update_median_ratio": 0.0}
    cfg = _run_yaml(tmp_path, cohort, "poison5", sites, strategy="fedmedian", **off)
    from dicomfl.common.config import ModelConfig
    from dicomfl.common.model import build_model, get_weights

    g0 = get_weights(build_model(ModelConfig(**MODEL), seed=cfg.run.seed))
    n_params = sum(v.size for v in g0.values())
    shift = 0.5 * math.sqrt(sum(float(np.sum(v.astype(np.float64) ** 2)) for v in g0.values())) / math.sqrt(n_params)
    summary, poisoned = _federate(cfg, _scaled(add=shift), {"site-d", "site-e"})
    h = summary["history"][0]
    assert sorted(h["aggregated"]) == ["site-a", "site-b", "site-c", "site-d", "site-e"]  # under the bound
    fedavg_cfg = _run_yaml(tmp_path, cohort, "poison5avg", sites, strategy="fedavg", **off)
    _, averaged = _federate(fedavg_cfg, _scaled(add=shift), {"site-d", "site-e"})
    # The median moved far less than the mean did.
    assert _dist(poisoned, clean_w) < 0.5 * _dist(averaged, clean_w)


# ------------------------------------------------------------------------------ identity
def test_a_reply_claiming_another_sites_name_does_not_take_it(cohort, tmp_path):
    cfg = _run_yaml(tmp_path, cohort, "spoof", [cohort / s / "site.yaml" for s in SITES])
    cfg.cross_site.local_baseline = True

    def claim(reply, rnd, _):
        from flwr.app import ConfigRecord

        reply.content[P.SITE] = ConfigRecord({"name": "site-a"})

    summary, _ = _federate(cfg, claim, {"site-b"})
    h = summary["history"][0]
    assert sorted(h["sites"]) == ["site-a", "site-b", "site-c"]  # names from the coordinator's table
    ident = summary["identity"]
    assert ident["authenticated"] and "site-a" in ident["mismatched_claims"].values()
    assert P.local_model_id("site-a") in summary["cross_site"]["models"]
    assert not any("#" in s for s in summary["sites"])


class _Echo(InProcessGrid):
    """A grid that hands the round loop every reply of one node twice (a replayed reply)."""

    def send_and_receive(self, messages, *, timeout=None):
        replies = super().send_and_receive(messages, timeout=timeout)
        names = self.trusted_names()
        return replies + [r for r in replies if names[r.metadata.src_node_id] == "site-b"]


def test_a_duplicated_reply_counts_once(cohort, tmp_path):
    cfg = _run_yaml(tmp_path, cohort, "dup", [cohort / s / "site.yaml" for s in SITES])
    summary, final = _federate(cfg, lambda *a: None, set(), grid_cls=_Echo)
    h = summary["history"][0]
    assert h["duplicates"] == {"site-b": 1}
    assert sorted(h["aggregated"]) == ["site-a", "site-b", "site-c"]
    straight = _run_yaml(tmp_path, cohort, "nodup", [cohort / s / "site.yaml" for s in SITES])
    _, ref = _federate(straight, lambda *a: None, set())
    assert _dist(final, ref) < 1e-5  # the same model as without the duplicate
