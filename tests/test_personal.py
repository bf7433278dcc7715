"""Personalization: fine-tuning after the federation (chosen by the site's validation split, DP-SGD
and accounted under DP), GroupNorm parameters kept at the site (FedBN's idea), and the personalized
models in the cross-site matrix next to the global and local ones. Real training, the generated
cohort, the in-process federation path."""

from __future__ import annotations

import json
import stat

import numpy as np
import pytest
import yaml
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from dicomfl.client.handler import SiteHandler
from dicomfl.client.privacy import read_site_ledger
from dicomfl.common import protocol as P
from dicomfl.common.config import ModelConfig, load_run_config, load_site_config
from dicomfl.common.errors import ConfigError
from dicomfl.common.model import build_model, get_weights, norm_parameter_names
from dicomfl.server.checkpoint import Checkpoints, read_npz
from dicomfl.server.federation import Federation
from dicomfl.server.replies import Rejection, validate_personal_reply
from dicomfl.workbench.flower_adapter import task_identity
from dicomfl.workbench.inprocess import InProcessGrid

SITES = ("site-a", "site-b", "site-c")
MODEL = {"mode": "fused", "image_size": 32, "width": 4, "depth": 1, "meta_hidden": 8, "head_hidden": 8}
MC = ModelConfig(**MODEL)


def _site(cohort, tmp_path, name="site-a", share=False, **privacy):
    src = cohort / name / "site.yaml"
    raw = yaml.safe_load(src.read_text())
    for k in ("dicom_dir", "labels", "secret_file"):
        raw["site"][k] = str((src.parent / raw["site"][k]).resolve())
    raw["site"]["state_dir"] = str(tmp_path / f"{name}-state")
    raw["train"]["batch_size"] = 16
    raw["privacy"] = {"delta": 1e-5, "max_grad_norm": 1.0, "share_local_model": share, **privacy}
    p = tmp_path / f"{name}.yaml"
    p.write_text(yaml.safe_dump(raw))
    return p


def _run(tmp_path, cohort, name, shared=("site-a",), rounds=1, **run):
    sites = [str(_site(cohort, tmp_path, s, share=s in shared)) for s in SITES]
    cfg = {"run": {"name": name, "rounds": rounds, "strategy": "fedavg", "min_sites": 2, "local_steps": 3,
                   "out_dir": str(tmp_path / name), **run},
           "cross_site": {"every": 0, "local_baseline": True}, "model": MODEL, "sites": sites}
    p = tmp_path / f"{name}.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return load_run_config(p)


def test_the_personalized_model_is_evaluated_in_the_matrix(cohort, tmp_path):
    from .test_federation import _audit_reply, _header_strings

    cfg = _run(tmp_path, cohort, "pers", personalize={"steps": 4, "checks": 2})
    grid = InProcessGrid(cfg.sites)
    summary = Federation(cfg, grid).run()
    cs = json.loads((cfg.out_dir / "cross_site_final.json").read_text())
    # global, the shared local model, and every site's personalized model, side by side
    assert {"global", "local:site-a", "personal:site-a", "personal:site-b", "personal:site-c"} <= set(cs["models"])
    assert "local:site-b" not in cs["models"]
    # site-a shared its personalized model: every site evaluated it
    assert sorted(cs["matrix"]["personal:site-a"]) == list(SITES)
    assert cs["gaps"]["auroc"]["personal:site-a"]["own"] == cs["matrix"]["personal:site-a"]["site-a"]["auroc"]
    # site-b and site-c kept theirs at home: one cell each, their own
    assert list(cs["matrix"]["personal:site-b"]) == ["site-b"] and list(cs["matrix"]["personal:site-c"]) == ["site-c"]
    pers = summary["personalized"]
    assert sorted(pers["sites"]) == list(SITES) and pers["shared"] == ["site-a"] and not pers["errors"]
    for m in pers["sites"].values():
        assert m["steps"] in (0.0, 2.0, 4.0) and m["declined"] == 0.0 and "val-auroc" in m
    assert (cfg.out_dir / "checkpoints" / "personal-site-a.npz").is_file()
    assert not (cfg.out_dir / "checkpoints" / "personal-site-b.npz").exists()
    kept = load_site_config(cfg.sites[1]).site.state_dir / "personal" / "pers.model.npz"
    assert stat.S_IMODE(kept.stat().st_mode) == 0o600
    assert "personal:site-b" in (cfg.out_dir / "report.md").read_text()
    assert "## Personalization" in (cfg.out_dir / "report.md").read_text()
    # each site reported its own under the fixed id "personal"; the coordinator filed it by identity
    evals = [r for r in grid.received if r.has_content() and any(k.startswith(P.EVAL_PREFIX) for k in r.content.keys())]
    assert len(evals) == 3 and all(P.EVAL_PREFIX + P.OWN_PERSONAL in r.content for r in evals)
    # the personalize messages carried the plan; the replies hold only what the protocol lists
    sent = [m for m in grid.sent if m.metadata.message_type == P.PersonalizeRequest.MESSAGE_TYPE
            and "personalize-steps" in m.content[P.CONFIG]]
    assert len(sent) == 3 and all(int(m.content[P.CONFIG]["personalize-steps"]) == 4 for m in sent)
    names = {k: tuple(v.shape) for k, v in get_weights(build_model(MC)).items()}
    headers = set().union(*(_header_strings(cohort, s) for s in SITES))
    for reply in grid.received:
        _audit_reply(reply, names, headers)
    personal = [r for r in grid.received if r.has_content() and P.PERSONAL_METRICS in r.content]
    assert len(personal) == 3 and sum(P.PERSONAL_ARRAYS in r.content for r in personal) == 1


def test_group_norm_parameters_stay_at_the_sites(cohort, tmp_path):
    cfg = _run(tmp_path, cohort, "fedbn", shared=(), rounds=2, local_norm=True)
    grid = InProcessGrid(cfg.sites)
    summary = Federation(cfg, grid).run()
    names = norm_parameter_names(build_model(MC))
    assert names and all(n.endswith((".weight", ".bias")) for n in names)
    initial = get_weights(build_model(MC, seed=0))
    final = Checkpoints(cfg.out_dir).latest().global_weights
    # the global model's GroupNorm parameters never move; the others do
    assert all(np.array_equal(final[k], initial[k]) for k in names)
    assert any(not np.array_equal(final[k], initial[k]) for k in final if k not in names)
    assert [sorted(h["aggregated"]) for h in summary["history"]] == [list(SITES)] * 2
    # every update sent the global values for them: nothing of a site's own normalization left it
    for r in grid.received:
        if r.has_content() and P.ARRAYS in r.content:
            arrays = P.from_record(r.content[P.ARRAYS])
            assert all(np.array_equal(arrays[k], initial[k]) for k in names)
    # each site keeps and trains its own, and its personalized model uses them (steps 0: no fine-tuning)
    for i, s in enumerate(SITES):
        state = load_site_config(cfg.sites[i]).site.state_dir / "personal"
        own = read_npz(state / "fedbn.norm.npz")
        assert set(own) == names and any(not np.array_equal(own[k], initial[k]) for k in names)
        personal = read_npz(state / "fedbn.model.npz")
        assert all(np.array_equal(personal[k], own[k]) for k in names)
        assert all(np.array_equal(personal[k], final[k]) for k in final if k not in names)
    cs = json.loads((cfg.out_dir / "cross_site_final.json").read_text())
    assert all(list(cs["matrix"][f"personal:{s}"]) == [s] for s in SITES)


class _SendsItsNorms:
    """A site that sends its own GroupNorm values in a local_norm run."""

    def __init__(self, app, node):
        self.app, self.node = app, node

    def __call__(self, msg, ctx):
        reply = self.app(msg, ctx)
        if ctx.node_id == self.node and reply.has_content() and P.ARRAYS in reply.content:
            arrays = P.from_record(reply.content[P.ARRAYS])
            for k in norm_parameter_names(build_model(MC)):
                arrays[k] = arrays[k] + 0.5
            reply.content[P.ARRAYS] = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})
        return reply


def test_a_site_that_sends_its_norms_in_a_local_norm_run_is_rejected(cohort, tmp_path):
    cfg = _run(tmp_path, cohort, "leaky", shared=(), local_norm=True, personalize={"steps": 0})
    grid = InProcessGrid(cfg.sites)
    grid.app = _SendsItsNorms(grid.app, sorted(grid.nodes)[1])
    summary = Federation(cfg, grid).run()
    h = summary["history"][0]
    assert "GroupNorm" in h["rejected"]["site-b"] and h["aggregated"] == ["site-a", "site-c"]


# ------------------------------------------------------------------------------ site side, DP
def _ctx(site_yaml) -> Context:
    return Context(run_id=1, node_id=1, node_config={"site-config": str(site_yaml)}, state=RecordDict(), run_config={})


def _personalize_msg(run="p1", steps=4, checks=2, dp=True, target=8.0, **extra) -> Message:
    task_identity()
    cfg = {"run": run, "server-round": 3, "num-rounds": 3, "local-epochs": 1, "local-steps": 0, "dp": dp,
           "target-epsilon": target, "delta": 1e-5, "seed": 0, "model": MC.model_dump_json(),
           "personalize-steps": steps, "personalize-lr-scale": 1.0, "personalize-checks": checks, **extra}
    msg = Message(content=RecordDict({P.ARRAYS: P.to_record(get_weights(build_model(MC))), P.CONFIG: ConfigRecord(cfg)}),
                  dst_node_id=1, message_type=P.PersonalizeRequest.MESSAGE_TYPE)
    msg.metadata.__dict__["_message_id"] = f"p-{run}-{steps}"
    return msg


def test_fine_tuning_under_dp_is_dp_sgd_and_spends_the_site_budget(cohort, tmp_path):
    site = _site(cohort, tmp_path, dp=True, target_epsilon=50.0)
    state = load_site_config(site).site.state_dir
    reply = SiteHandler().handle(_personalize_msg(steps=12, checks=2), _ctx(site))
    assert not reply.has_error()
    m = reply.content[P.PERSONAL_METRICS]
    assert m["declined"] == 0.0 and 0 < m["epsilon"] <= 8.0 * 1.0001
    assert P.PERSONAL_ARRAYS not in reply.content  # the site did not opt in to share it
    runs = read_site_ledger(state)["runs"]
    assert runs["p1.personal"]["epsilon"] == pytest.approx(m["epsilon"])
    # two chunks of six DP-SGD steps each (more than an epoch of this split): two private "rounds"
    # in the ledger, noise planned for them; the label-count release (q = 1) comes first
    assert runs["p1.personal"]["rounds_trained"] == [1, 2] and runs["p1.personal"]["noise_multiplier"] > 0
    assert sum(h[2] for h in runs["p1.personal"]["history"] if h[1] < 1) == 12


def test_a_site_over_its_budget_keeps_the_global_model_as_its_personal_one(cohort, tmp_path):
    site = _site(cohort, tmp_path, dp=True, target_epsilon=0.01)
    reply = SiteHandler().handle(_personalize_msg(target=0.01), _ctx(site))
    assert not reply.has_error()
    m = reply.content[P.PERSONAL_METRICS]
    assert m["declined"] == 1.0 and m["steps"] == 0.0
    kept = read_npz(load_site_config(site).site.state_dir / "personal" / "p1.model.npz")
    g = get_weights(build_model(MC))
    assert all(np.array_equal(kept[k], g[k]) for k in g)


@pytest.mark.parametrize("key,value", [("personalize-steps", -1), ("personalize-steps", 10**9),
                                       ("personalize-steps", 2.5), ("personalize-lr-scale", 2.0),
                                       ("personalize-lr-scale", float("nan")), ("personalize-checks", 0),
                                       ("local-norm", "yes")])
def test_out_of_bounds_personalization_requests_are_refused(cohort, tmp_path, key, value):
    site = _site(cohort, tmp_path)
    reply = SiteHandler().handle(_personalize_msg(dp=False, **{key: value}), _ctx(site))
    assert reply.has_error() and reply.error.code == P.ERR_BAD_REQUEST
    assert not (load_site_config(site).site.state_dir / "personal").exists()


def test_a_hostile_personal_flag_or_run_in_an_evaluate_message_is_refused(cohort, tmp_path):
    site = _site(cohort, tmp_path)
    handler = SiteHandler()
    for cfg in ({"personal": "yes", "run": "r"}, {"personal": True, "run": "../../etc"}):
        task_identity()
        msg = Message(content=RecordDict({P.CONFIG: ConfigRecord({"model": MC.model_dump_json(), **cfg})}),
                      dst_node_id=1, message_type="evaluate")
        msg.metadata.__dict__["_message_id"] = "e-1"
        reply = handler.handle(msg, _ctx(site))
        assert reply.has_error() and reply.error.code == P.ERR_BAD_REQUEST


def test_the_coordinator_checks_personalize_replies():
    task_identity()
    g = get_weights(build_model(MC))
    sent = Message(RecordDict({P.CONFIG: ConfigRecord({"server-round": 1})}), dst_node_id=7, message_type="train")

    def reply(**records):
        return Message(content=RecordDict(records), reply_to=sent)

    ok = validate_personal_reply(reply(**{P.PERSONAL_METRICS: MetricRecord({"steps": 2.0, "num-examples": 40.0})}), g)
    assert not isinstance(ok, Rejection) and ok.arrays is None
    first = next(iter(g))
    bad_arrays = {**g, first: np.full_like(g[first], np.nan)}
    cases = [
        ({P.PERSONAL_METRICS: MetricRecord({"steps": 2.0}), "patient-name": ConfigRecord({"x": "y"})}, "unexpected record"),
        ({P.PERSONAL_METRICS: MetricRecord({"secret": 1.0})}, "outside the protocol"),
        ({}, "no personal-metrics"),
        ({P.PERSONAL_METRICS: MetricRecord({"steps": 2.0}), P.PERSONAL_ARRAYS: P.to_record(bad_arrays)}, "NaN"),
    ]
    for records, words in cases:
        res = validate_personal_reply(reply(**records), g)
        assert isinstance(res, Rejection) and words in res.reason and "patient" not in res.reason


def test_local_norm_and_scaffold_do_not_mix(tmp_path):
    p = tmp_path / "run.yaml"
    p.write_text(yaml.safe_dump({"run": {"strategy": "scaffold", "local_norm": True}, "model": MODEL}))
    with pytest.raises(ConfigError, match="run.local_norm"):
        load_run_config(p)


def test_a_site_whose_name_differs_from_its_identity_still_gets_its_personal_row(cohort, tmp_path):
    # Without authentication nodes are named node-<id>: the site's own name never decides the row.
    from dicomfl.server.identity import SiteIdentities

    cfg = _run(tmp_path, cohort, "anon", shared=(), personalize={"steps": 0})
    grid = InProcessGrid(cfg.sites)
    summary = Federation(cfg, grid, identities=SiteIdentities.insecure()).run()
    cs = summary["cross_site"]
    nodes = [f"node-{n}" for n in sorted(grid.nodes)]
    assert sorted(cs["matrix"]["global"]) == nodes
    assert all(list(cs["matrix"][f"personal:{n}"]) == [n] for n in nodes)
    assert not cs["errors"] and not summary["personalized"]["errors"]
