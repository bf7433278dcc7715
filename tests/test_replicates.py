"""Replicate AUROCs for paired comparisons, end to end with the real site handler (what the
ClientApp runs) on the generated cohort, in process: the resamples do not depend on the model or the
job, the site sends them only when its own config allows, and a hostile site's replicates are
refused by the coordinator with a one-line reason while the run goes on."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import yaml
from flwr.app import MessageType, MetricRecord
from sklearn.metrics import roc_auc_score

from dicomfl.client.trainer import SiteTrainer
from dicomfl.common import protocol as P
from dicomfl.common.config import load_run_config, load_site_config
from dicomfl.common.fedstats import FeatureTransform
from dicomfl.common.model import ModelConfig, build_model, get_weights, load_weights
from dicomfl.common.splits import TEST
from dicomfl.common.train import predict
from dicomfl.server.checkpoint import Checkpoints, write_npz
from dicomfl.server.federation import Federation
from dicomfl.workbench.inprocess import InProcessGrid

from .test_federation import MODEL, SITES, write_run


def _allowing(tmp: Path, cohort: Path, n: int) -> list[Path]:
    """The cohort's site configs with ``privacy.eval_replicates: n`` (same data, cache and key)."""
    out = []
    for s in SITES:
        raw = yaml.safe_load((cohort / s / "site.yaml").read_text())
        base = cohort / s
        raw["site"].update({k: str(base / raw["site"][k]) for k in ("dicom_dir", "labels", "secret_file", "state_dir")})
        raw["privacy"]["eval_replicates"] = n
        p = tmp / f"{s}.yaml"
        p.write_text(yaml.safe_dump(raw))
        out.append(p)
    return out


def _run(tmp: Path, cohort: Path, name: str, sites: list[Path], replicates: int, **run):
    cfg = load_run_config(write_run(tmp, cohort, name, **run))
    cfg.sites = sites
    cfg.cross_site.replicates = replicates
    return cfg


def _features(summary: dict) -> FeatureTransform:
    st = summary.get("feature_stats") or {}
    return FeatureTransform(mean=np.asarray(st["mean"], np.float32) if st.get("mean") else None,
                            std=np.asarray(st["std"], np.float32) if st.get("std") else None)


def test_every_model_in_every_run_is_scored_on_the_same_resamples(cohort, tmp_path, one_thread):
    sites = _allowing(tmp_path, cohort, 40)
    cfg_a = _run(tmp_path, cohort, "rep-a", sites, 40, rounds=1, seed=0)
    a = Federation(cfg_a, InProcessGrid(cfg_a.sites)).run()
    cfg_b = _run(tmp_path, cohort, "rep-b", sites, 25, rounds=1, seed=5, strategy="fedprox", proximal_mu=0.1)
    b = Federation(cfg_b, InProcessGrid(cfg_b.sites)).run()
    ma, mb = a["cross_site"]["matrix"], b["cross_site"]["matrix"]
    assert {"global", "local:site-a"} <= set(ma)
    for s in SITES:
        ids = {m[s][P.AUROC_REPLICATES_ID] for m in (*ma.values(), *mb.values()) if s in m}
        assert len(ids) == 1  # one test split per site, one id, in both runs
        assert all(len(m[s][P.AUROC_REPLICATES]) == 40 for m in ma.values() if s in m)
        assert all(len(m[s][P.AUROC_REPLICATES]) == 25 for m in mb.values() if s in m)  # what the run asked
    # the same model evaluated in another job (run B's coordinator) gets the same replicates
    model = Checkpoints(cfg_a.out_dir).latest().global_weights
    write_npz(tmp_path / "a-global.npz", model)
    again = Federation(cfg_a, InProcessGrid(cfg_a.sites)).evaluate_only(tmp_path / "a-global.npz")["matrix"]["a-global"]
    for s in SITES:
        assert again[s][P.AUROC_REPLICATES] == ma["global"][s][P.AUROC_REPLICATES]
    # replicate r of every model is the AUROC on one fixed resample: the one a fresh trainer of the
    # site draws, knowing nothing of models or runs
    features = _features(a)
    for s, path in zip(SITES, sites):
        fresh = SiteTrainer(load_site_config(path), ModelConfig(**MODEL))
        resamples, split_id = fresh.test_resamples(5)
        assert split_id == ma["global"][s][P.AUROC_REPLICATES_ID]
        test = fresh.view(TEST, features)
        for mid in ("global", f"local:{s}", "local:site-c"):
            net = build_model(ModelConfig(**MODEL))
            load_weights(net, Checkpoints(cfg_a.out_dir).latest().global_weights if mid == "global"
                         else Checkpoints(cfg_a.out_dir).latest().local_weights[mid.split(":")[1]])
            p = predict(net, test)[:, 1]
            want = [roc_auc_score(test.labels[i], p[i]) for i in resamples]
            assert ma[mid][s][P.AUROC_REPLICATES][:5] == pytest.approx(want, abs=1e-9)


def test_replicates_leave_a_site_only_when_its_config_allows(cohort, tmp_path):
    model = get_weights(build_model(ModelConfig(**MODEL)))
    write_npz(tmp_path / "m.npz", model)
    # the cohort's own site.yaml: eval_replicates unset (0); the run asks for 30: none are sent
    cfg = _run(tmp_path, cohort, "off", [cohort / s / "site.yaml" for s in SITES], 30)
    grid = InProcessGrid(cfg.sites)
    payload = Federation(cfg, grid).evaluate_only(tmp_path / "m.npz")
    assert all(P.AUROC_REPLICATES not in payload["matrix"]["m"][s] for s in SITES) and not payload["errors"]
    for reply in grid.received:
        for key in reply.content.keys():
            if key.startswith(P.EVAL_PREFIX):
                assert set(reply.content[key].keys()) <= P.EVAL_METRICS - {P.AUROC_REPLICATES, P.AUROC_REPLICATES_ID}
    # sites that allow 10 and a run that asks for 30: 10 each; a run that asks for none: none
    sites = _allowing(tmp_path, cohort, 10)
    cfg = _run(tmp_path, cohort, "some", sites, 30)
    m = Federation(cfg, InProcessGrid(cfg.sites)).evaluate_only(tmp_path / "m.npz")["matrix"]["m"]
    assert all(len(m[s][P.AUROC_REPLICATES]) == 10 and 0 <= min(m[s][P.AUROC_REPLICATES]) for s in SITES)
    cfg = _run(tmp_path, cohort, "none", sites, 0)
    m = Federation(cfg, InProcessGrid(cfg.sites)).evaluate_only(tmp_path / "m.npz")["matrix"]["m"]
    assert all(P.AUROC_REPLICATES not in m[s] for s in SITES)


class _Tamper:
    """The real handler, with one site's replicate AUROCs replaced in its evaluate replies."""

    def __init__(self, grid: InProcessGrid, node: int, values) -> None:
        self.inner, self.node, self.values = grid.app, node, values

    def __call__(self, msg, ctx):
        reply = self.inner(msg, ctx)
        if ctx.node_id == self.node and msg.metadata.message_type == MessageType.EVALUATE and not reply.has_error():
            for key in list(reply.content.keys()):
                if key.startswith(P.EVAL_PREFIX):
                    rec = dict(reply.content[key])
                    rec[P.AUROC_REPLICATES] = self.values
                    reply.content[key] = MetricRecord(rec)
        return reply


@pytest.mark.parametrize("values, why", [
    ([0.7, float("nan")] * 5, "metric auroc-boot holds NaN or infinite values"),
    ([0.7] * 11, "metric auroc-boot has 11 values, expected 1 to 10"),
    ([0.7, 1.5, 0.2], "metric auroc-boot holds values outside [0, 1]"),
])
def test_a_hostile_sites_replicates_are_refused_and_the_run_goes_on(cohort, tmp_path, caplog, values, why):
    write_npz(tmp_path / "m.npz", get_weights(build_model(ModelConfig(**MODEL))))
    sites = _allowing(tmp_path, cohort, 50)  # the sites would send 50; the run asks for 10
    cfg = _run(tmp_path, cohort, "hostile", sites, 10)
    grid = InProcessGrid(cfg.sites)
    grid.app = _Tamper(grid, sorted(grid.nodes)[1], values)  # site-b
    with caplog.at_level(logging.WARNING, logger="dicomfl.server"):
        payload = Federation(cfg, grid).evaluate_only(tmp_path / "m.npz")
    assert payload["errors"] == {"site-b": why}
    assert sorted(payload["matrix"]["m"]) == ["site-a", "site-c"]  # the others' answers are kept
    assert all(len(payload["matrix"]["m"][s][P.AUROC_REPLICATES]) == 10 for s in ("site-a", "site-c"))
    line = next(r.getMessage() for r in caplog.records if "site-b" in r.getMessage())
    assert why in line and "\n" not in line
