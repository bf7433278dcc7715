"""Metadata the sites agree on: federated feature statistics (exact without DP, noised and
accounted under DP), the global standardization every message carries, hostile coordinators and
hostile sites, dropped features, resume. Real sites of the generated cohort, real training."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import yaml
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict

from dicomfl.client.fedstats import noisy, site_statistics, stats_release
from dicomfl.client.handler import SiteHandler
from dicomfl.client.privacy import epsilon, read_site_ledger
from dicomfl.client.trainer import RoundPlan, SiteTrainer
from dicomfl.common import protocol as P
from dicomfl.common.config import ConfigError, ModelConfig, load_run_config, load_site_config
from dicomfl.common.fedstats import (NUMERIC_NAMES, RANGES, STD_FLOOR, FeatureTransform, combine, feature_groups,
                                     global_standardization, released, stat_key)
from dicomfl.common.model import build_model, get_weights
from dicomfl.common.splits import TRAIN
from dicomfl.server.federation import Federation
from dicomfl.server.replies import Rejection, validate_stats_reply
from dicomfl.workbench.inprocess import InProcessGrid

SITES = ("site-a", "site-b", "site-c")
MODEL = {"mode": "fused", "image_size": 32, "width": 4, "depth": 1, "meta_hidden": 8, "head_hidden": 8}


def write_run(tmp: Path, cohort: Path, name: str, sites=None, model=None, privacy=None, **run) -> Path:
    cfg = {"run": {"name": name, "rounds": 1, "strategy": "fedavg", "min_sites": 1, "local_epochs": 1,
                   "out_dir": str(tmp / name), **run},
           "cross_site": {"every": 0, "local_baseline": False}, "model": {**MODEL, **(model or {})},
           "sites": [str(p) for p in (sites or [cohort / s / "site.yaml" for s in SITES])]}
    if privacy:
        cfg["privacy"] = privacy
    p = tmp / f"{name}.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def own_site(tmp: Path, cohort: Path, site: str, **sections) -> Path:
    """A copy of a cohort site's config with a state folder (privacy ledger) of its own."""
    raw = yaml.safe_load((cohort / site / "site.yaml").read_text())
    for k in ("dicom_dir", "labels", "secret_file"):
        raw["site"][k] = str((cohort / site / raw["site"][k]).resolve())
    state = tmp / f"{site}-state"
    state.mkdir(parents=True, exist_ok=True)
    src = cohort / site / raw["site"].get("state_dir", "state")
    if (src / "cache").is_dir() and not (state / "cache").exists():  # reuse the ingested cache
        import shutil

        shutil.copytree(src / "cache", state / "cache")
    raw["site"]["state_dir"] = str(state)
    raw.update(sections)
    p = tmp / f"{site}.yaml"
    p.write_text(yaml.safe_dump(raw))
    return p


def pooled_reference(site_data, features=NUMERIC_NAMES) -> dict[str, tuple[int, float, float]]:
    """Count, mean and std of each feature over the pooled training splits, computed directly."""
    groups = feature_groups()
    rows = np.concatenate([np.asarray(d.features)[d.subset(TRAIN)] for _, d in (site_data[s] for s in SITES)])
    out = {}
    for f in features:
        v, m = groups[f]
        lo, hi = RANGES[f]
        x = np.clip(rows[rows[:, m] < 0.5, v].astype(np.float64), lo, hi)
        out[f] = (len(x), float(x.mean()) if len(x) else math.nan, float(x.std()) if len(x) else math.nan)
    return out


def _train_split_rows(site_data):
    return sum(int(len(d.subset(TRAIN))) for _, d in site_data.values())


# --------------------------------------------------------------- federated == pooled (the CI test)
def test_federated_statistics_equal_the_pooled_statistics_without_dp(cohort, site_data, tmp_path):
    # 1. the sites' own numbers, combined, equal the pooled train splits' statistics
    mc = ModelConfig(**MODEL)
    per_site = [site_statistics(SiteTrainer(cfg, mc, data=data), RoundPlan(run="pooled-check"))
                for cfg, data in (site_data[s] for s in SITES)]
    assert sum(s["num-examples"] for s in per_site) == _train_split_rows(site_data)  # train split only
    fed = combine(per_site, NUMERIC_NAMES)
    ref = pooled_reference(site_data)
    present = [f for f in NUMERIC_NAMES if ref[f][0] > 0]
    assert {"patient_age_years", "kvp", "pixel_spacing_mm", "exposure_mas"} <= set(present)
    for f in NUMERIC_NAMES:
        assert fed[f].count == ref[f][0]
        if ref[f][0]:
            assert fed[f].mean == pytest.approx(ref[f][1], rel=1e-9, abs=1e-12)
            assert fed[f].std == pytest.approx(ref[f][2], rel=1e-6, abs=1e-6)  # sqrt of a cancelling difference

    # 2. the same through the coordinator's round loop (in-process grid, real ClientApp handler):
    # the run's standardization is the pooled one, and every train and evaluate message carries it
    cfg = load_run_config(write_run(tmp_path, cohort, "pooled"))
    grid = InProcessGrid(cfg.sites)
    summary = Federation(cfg, grid).run()
    st = summary["feature_stats"]
    assert st["sites"] == list(SITES) and not st["rejected"] and not st["errors"]
    for i, f in enumerate(NUMERIC_NAMES):
        lo, hi = RANGES[f]
        if ref[f][0]:
            assert st["mean"][i] == pytest.approx(ref[f][1], rel=1e-9, abs=1e-12)
            assert st["std"][i] == pytest.approx(max(ref[f][2], STD_FLOOR * (hi - lo)), rel=1e-6, abs=1e-6)
        else:  # reported by no site: the middle of the range, half its width
            assert (st["mean"][i], st["std"][i]) == ((lo + hi) / 2, (hi - lo) / 2)
    kinds = [P.route(m.metadata.message_type)[0] for m in grid.sent]  # by category
    assert kinds[:3] == ["query"] * 3 and "train" in kinds and "evaluate" in kinds
    for m in grid.sent:
        c = m.content[P.CONFIG]
        if P.route(m.metadata.message_type)[0] == "query":
            assert P.FEATURE_MEAN not in c
        else:
            assert list(c[P.FEATURE_MEAN]) == pytest.approx(st["mean"]) and list(c[P.FEATURE_STD]) == pytest.approx(st["std"])
    # the query replies hold the site name and whitelisted numbers only
    for r in grid.received[:3]:
        assert set(r.content.keys()) == {P.SITE, P.STATS}
        assert set(r.content[P.STATS].keys()) <= P.stats_metrics(NUMERIC_NAMES)


def test_the_transform_standardizes_present_values_and_zeroes_missing_and_dropped(site_data):
    cfg, data = site_data["site-a"]
    rows = np.asarray(data.features)[:20]
    g = feature_groups()
    mean, std = global_standardization(combine([site_statistics(SiteTrainer(cfg, ModelConfig(**MODEL), data=data),
                                                                RoundPlan())], NUMERIC_NAMES))
    t = FeatureTransform(mean=np.asarray(mean, np.float32), std=np.asarray(std, np.float32), drop=("modality", "kvp"))
    out = t.apply(rows)
    assert out.shape == rows.shape and out.dtype == np.float32
    assert (out[:, g["modality"]] == 0).all() and (out[:, g["kvp"]] == 0).all()
    v, m = g["patient_age_years"]
    present = rows[:, m] < 0.5
    assert present.any()
    want = (np.clip(rows[present, v], *RANGES["patient_age_years"]) - mean[0]) / std[0]
    assert out[present, v] == pytest.approx(want, rel=1e-5, abs=1e-6)
    v, m = g["slice_thickness_mm"]
    assert (rows[:, m] == 1).all() and (out[:, v] == 0).all() and (out[:, m] == 1).all()  # missing stays 0
    assert np.abs(out).max() <= 5.0


# ------------------------------------------------------------------------- hostile coordinator
def _message(kind: str, config: dict, arrays=None, node: int = 1) -> Message:
    content = RecordDict({P.CONFIG: ConfigRecord(config)})
    if arrays is not None:
        content[P.ARRAYS if kind == MessageType.TRAIN else P.MODEL_PREFIX + "global"] = ArrayRecord(arrays)
    msg = Message(content=content, dst_node_id=node, message_type=kind)
    from dicomfl.workbench.flower_adapter import stamp_message_id

    stamp_message_id(msg, "hostile")
    return msg


GOOD_MEAN = [(RANGES[f][0] + RANGES[f][1]) / 2 for f in NUMERIC_NAMES]
GOOD_STD = [(RANGES[f][1] - RANGES[f][0]) / 4 for f in NUMERIC_NAMES]
N = len(NUMERIC_NAMES)


@pytest.mark.parametrize("mean,std,why", [
    (GOOD_MEAN[:-1] + [math.nan], GOOD_STD, "feature-mean: rescale_slope is not a finite number"),
    (GOOD_MEAN, [0.0] * N, "feature-std: patient_age_years is outside"),
    (GOOD_MEAN, [-1.0] + GOOD_STD[1:], "feature-std: patient_age_years is outside"),
    (GOOD_MEAN, GOOD_STD[:3] + [math.inf] + GOOD_STD[4:], "feature-std: kvp is not a finite number"),
    ([1e30] + GOOD_MEAN[1:], GOOD_STD, "feature-mean: patient_age_years is outside the feature's range"),
    (GOOD_MEAN[:5], GOOD_STD, "feature-mean: not a list of 12 numbers"),
    (GOOD_MEAN + [0.5], GOOD_STD, "feature-mean: not a list of 12 numbers"),
    (GOOD_MEAN, GOOD_STD[:1] + [1e9] + GOOD_STD[2:], "feature-std: pixel_spacing_mm is outside"),
    (GOOD_MEAN, None, "feature-mean and feature-std come together"),
    ("0.5,0.5", GOOD_STD, "feature-mean: not a list of 12 numbers"),
])
def test_a_hostile_coordinators_standardization_is_refused_with_bad_request(cohort, tmp_path, mean, std, why):
    site = own_site(tmp_path, cohort, "site-a")
    handler = SiteHandler()
    ctx = Context(run_id=1, node_id=1, node_config={"site-config": str(site)}, state=RecordDict(), run_config={})
    weights = {k: v for k, v in get_weights(build_model(ModelConfig(**MODEL))).items()}
    from flwr.app import Array

    arrays = {k: Array(np.ascontiguousarray(v)) for k, v in weights.items()}
    base = {"run": "hostile", "server-round": 1, "model": ModelConfig(**MODEL).model_dump_json()}
    bad = {**base, P.FEATURE_MEAN: mean, **({P.FEATURE_STD: std} if std is not None else {})}
    log = Path(load_site_config(site).site.state_dir) / "logs" / "site.log"
    for kind in (MessageType.TRAIN, MessageType.EVALUATE):
        reply = handler.handle(_message(kind, bad, arrays), ctx)
        assert reply.has_error() and reply.error.code == P.ERR_BAD_REQUEST, kind
        assert P.ERROR_REASON_RE.fullmatch(reply.error.reason)
        ref = reply.error.reason.rsplit("=", 1)[1]
        line = next(ln for ln in log.read_text().splitlines() if f"ref={ref}" in ln)
        assert why in line and "1e+30" not in line and "1000000000" not in line  # names the key, never the value
    # the site goes on: the same message with sane numbers is answered
    ok = handler.handle(_message(MessageType.EVALUATE, {**base, P.FEATURE_MEAN: GOOD_MEAN, P.FEATURE_STD: GOOD_STD},
                                 arrays), ctx)
    assert not ok.has_error() and "metrics.global" in ok.content


def test_a_coordinator_naming_an_unknown_feature_to_drop_is_refused(cohort, tmp_path):
    site = own_site(tmp_path, cohort, "site-b")
    ctx = Context(run_id=1, node_id=1, node_config={"site-config": str(site)}, state=RecordDict(), run_config={})
    model = ModelConfig(**MODEL).model_dump()
    model["drop_features"] = ["PatientName"]
    import json

    reply = SiteHandler().handle(_message(MessageType.QUERY, {"run": "x", "model": json.dumps(model)}), ctx)
    assert reply.has_error() and reply.error.code == P.ERR_BAD_REQUEST


# ------------------------------------------------------------------------------ hostile sites
def _stats_reply(metrics: dict, node: int = 7) -> Message:
    content = RecordDict({P.STATS: MetricRecord(metrics), P.SITE: ConfigRecord({"name": "site-x"})})
    return Message(content=content, reply_to=_message(MessageType.QUERY, {"run": "r"}, node=node))


def _good_stats(n: int = 40) -> dict:
    out = {"num-examples": float(n)}
    for f in NUMERIC_NAMES:
        out.update({stat_key("count", f): 30.0, stat_key("sum", f): 12.0, stat_key("sumsq", f): 6.0})
    return out


@pytest.mark.parametrize("change,why", [
    ({"sum.kvp": math.nan}, "metric sum.kvp is NaN"),
    ({"count.kvp": -1.0}, "count.kvp is not a whole number in [0, num-examples]"),
    ({"count.kvp": 2.5}, "count.kvp is not a whole number in [0, num-examples]"),
    ({"count.kvp": 41.0}, "count.kvp is not a whole number in [0, num-examples]"),
    ({"sum.kvp": 31.0}, "sum.kvp is outside [0, count]"),
    ({"sumsq.kvp": 12.5}, "sumsq.kvp is outside [0, sum]"),
    ({"sumsq.kvp": 1.0}, "sumsq.kvp is below sum^2 / count"),
    ({"sumsq.kvp": math.inf}, "metric sumsq.kvp is infinite or out of range"),
    ({"num-examples": 1e7}, "num-examples 1e+07 is above max_examples 1e+06"),
    ({"num-examples": 1e15}, "metric num-examples is infinite or out of range"),
    ({"num-examples": 0.0}, "num-examples is not positive"),
    ({"PatientName": 1.0}, "record stats has a metric outside the protocol"),
    ({"declined": 1.0}, "reply declined to release statistics but sent some"),
    ({"sum.kvp": None}, "statistics of kvp are incomplete"),
])
def test_bad_statistics_are_rejected_with_a_reason_naming_them(change, why):
    metrics = {k: v for k, v in {**_good_stats(), **change}.items() if v is not None}
    res = validate_stats_reply(_stats_reply(metrics), NUMERIC_NAMES, max_examples=1e6)
    assert isinstance(res, Rejection) and res.reason == why and res.node_id == 7
    assert not isinstance(validate_stats_reply(_stats_reply(_good_stats()), NUMERIC_NAMES, max_examples=1e6), Rejection)


def test_a_site_sending_bad_statistics_is_left_out_and_the_run_goes_on(cohort, site_data, tmp_path, caplog):
    base = SiteHandler()

    def hostile(msg, ctx):
        reply = base.handle(msg, ctx)
        if P.route(msg.metadata.message_type)[0] == "query" and ctx.node_config["site-config"].endswith("site-b/site.yaml"):
            rec = reply.content[P.STATS]
            rec["sum.patient_age_years"] = math.nan
            rec["count.kvp"] = 1e9
        return reply

    cfg = load_run_config(write_run(tmp_path, cohort, "hostile-site"))
    summary = Federation(cfg, InProcessGrid(cfg.sites, handler=hostile)).run()
    st = summary["feature_stats"]
    assert st["sites"] == ["site-a", "site-c"] and list(st["rejected"]) == ["site-b"]
    assert st["rejected"]["site-b"] == "metric sum.patient_age_years is NaN"
    assert "site-b" in caplog.text and "left out of the statistics" in caplog.text
    assert sorted(summary["history"][0]["aggregated"]) == list(SITES)  # still trains with every site
    rows = np.concatenate([np.asarray(site_data[s][1].features)[site_data[s][1].subset(TRAIN)] for s in ("site-a", "site-c")])
    v, m = feature_groups()["patient_age_years"]
    ages = rows[rows[:, m] < 0.5, v].astype(np.float64)
    assert st["mean"][0] == pytest.approx(ages.mean(), rel=1e-9)


# ---------------------------------------------------------------------------------- drop features
def test_drop_features_are_validated_by_name_and_never_released(cohort, tmp_path):
    with pytest.raises(ConfigError, match=r"model\.drop_features.*unknown feature manufacturer"):
        load_run_config(write_run(tmp_path, cohort, "bad-drop", model={"drop_features": ["kvp", "manufacturer"]}))
    drop = ["pixel_spacing_mm", "rows", "columns", "bits_stored", "modality", "photometric"]
    cfg = load_run_config(write_run(tmp_path, cohort, "drop", model={"drop_features": drop}))
    grid = InProcessGrid(cfg.sites)
    summary = Federation(cfg, grid).run()
    st = summary["feature_stats"]
    assert st["features"] == [f for f in NUMERIC_NAMES if f not in drop] and st["sites"] == list(SITES)
    for r in grid.received[:3]:
        keys = set(r.content[P.STATS].keys())
        assert not any(k.endswith(".pixel_spacing_mm") or k.endswith(".rows") for k in keys)
        assert "count.kvp" in keys
    # a dropped feature cannot change what the model says: only its columns differ here
    site_cfg = load_site_config(cohort / "site-a" / "site.yaml")
    trainer = SiteTrainer(site_cfg, cfg.model)
    t = FeatureTransform(mean=np.asarray(st["mean"], np.float32), std=np.asarray(st["std"], np.float32),
                         drop=tuple(cfg.model.drop_features))
    rows = np.asarray(trainer.split(TRAIN).features)[:8].copy()
    shuffled = rows.copy()
    for f in drop:
        shuffled[:, feature_groups()[f]] = np.random.default_rng(0).random((8, len(feature_groups()[f])))
    assert np.array_equal(t.apply(rows), t.apply(shuffled))


# --------------------------------------------------------------------------------------- DP
def test_under_dp_the_release_is_noised_accounted_once_and_declined_when_the_budget_is_short(cohort, site_data, tmp_path):
    priv = {"dp": True, "target_epsilon": 8.0, "delta": 1e-5, "stats_noise_multiplier": 4.0}
    site = load_site_config(own_site(tmp_path, cohort, "site-a", privacy=priv))
    trainer = SiteTrainer(site, ModelConfig(**MODEL), data=site_data["site-a"][1])
    plan = RoundPlan(run="dp-stats")
    assert read_site_ledger(site.site.state_dir).get("runs", {}) == {}
    got = site_statistics(trainer, plan)
    led = read_site_ledger(site.site.state_dir)["runs"]["dp-stats"]
    assert led["history"] == [stats_release(4.0)] and led["stats_noise_multiplier"] == 4.0
    eps = epsilon(led["history"], 1e-5)
    assert 0 < eps < 8 and got["epsilon"] == pytest.approx(eps) and got["noise-multiplier"] == 4.0
    exact = site_statistics(SiteTrainer(site_data["site-a"][0], ModelConfig(**MODEL), data=site_data["site-a"][1]), plan)
    n = int(exact["num-examples"])
    assert got["num-examples"] == n and any(got[k] != exact[k] for k in exact if k.startswith("sum."))
    # what was released passes the coordinator's audit
    stats = {k: v for k, v in got.items() if k[:k.find(".")] in ("count", "sum", "sumsq")}
    assert not isinstance(validate_stats_reply(_stats_reply({**stats, "num-examples": float(n)}), NUMERIC_NAMES,
                                               max_examples=1e6), Rejection)
    # asked again in the same run (a resume): the same numbers, no new spend
    again = site_statistics(trainer, plan)
    assert again == got and read_site_ledger(site.site.state_dir)["runs"]["dp-stats"]["history"] == [stats_release(4.0)]
    # the run's DP-SGD is planned after it and composed with it by the same accountant
    out = trainer.train(get_weights(build_model(ModelConfig(**MODEL))), RoundPlan(run="dp-stats", num_rounds=2))
    led = read_site_ledger(site.site.state_dir)["runs"]["dp-stats"]
    assert not out.declined and led["history"][0] == stats_release(4.0) and len(led["history"]) >= 3
    assert eps < out.metrics["epsilon"] <= 8.0 * (1 + 1e-6)

    # a site whose budget cannot cover the release declines and releases nothing
    short = load_site_config(own_site(tmp_path / "short", cohort, "site-b",
                                      privacy={**priv, "target_epsilon": 0.3}))
    tb = SiteTrainer(short, ModelConfig(**MODEL), data=site_data["site-b"][1])
    res = site_statistics(tb, RoundPlan(run="dp-short"))
    assert res["declined"] == 1.0 and res["epsilon-if-released"] > 0.3
    assert not any(k.startswith(("count.", "sum.", "sumsq.")) for k in res)
    assert read_site_ledger(short.site.state_dir).get("runs", {}).get("dp-short", {}).get("history") in (None, [])


def test_noisy_statistics_are_post_processed_into_what_the_audit_accepts():
    exact = {"num-examples": 10.0}
    for f in NUMERIC_NAMES:
        exact.update({stat_key("count", f): 10.0, stat_key("sum", f): 5.0, stat_key("sumsq", f): 3.0})
    for seed in range(20):
        got = noisy(exact, NUMERIC_NAMES, 10, 50.0, np.random.default_rng(seed))
        res = validate_stats_reply(_stats_reply({**got, "num-examples": 10.0}), NUMERIC_NAMES, max_examples=100)
        assert not isinstance(res, Rejection), res.reason


def test_a_dp_run_through_the_coordinator_declines_or_releases_and_goes_on(cohort, tmp_path):
    ok = own_site(tmp_path / "a", cohort, "site-a", privacy={"dp": True, "target_epsilon": 8.0})
    short = own_site(tmp_path / "c", cohort, "site-c", privacy={"dp": True, "target_epsilon": 0.3,
                                                                 "noise_multiplier": 1.0})
    cfg = load_run_config(write_run(tmp_path, cohort, "dp-run", sites=[ok, short]))
    summary = Federation(cfg, InProcessGrid(cfg.sites)).run()
    st = summary["feature_stats"]
    assert st["sites"] == ["site-a"] and st["declined"] == ["site-c"]
    assert summary["history"][0]["declined"] == ["site-c"]
    led = read_site_ledger(load_site_config(ok).site.state_dir)["runs"]["dp-run"]
    assert led["history"][0] == stats_release(4.0) and led["rounds_trained"] == [1]


# -------------------------------------------------------------------------------------- resume
def test_resume_sends_the_statistics_kept_in_the_checkpoint(cohort, tmp_path):
    path = write_run(tmp_path, cohort, "resume", rounds=1)
    cfg = load_run_config(path)
    first = Federation(cfg, InProcessGrid(cfg.sites)).run()["feature_stats"]
    cfg.run.rounds = 2
    grid = InProcessGrid(cfg.sites)
    again = Federation(cfg, grid).run(resume=True)
    assert again["feature_stats"] == first
    kinds = [P.route(m.metadata.message_type)[0] for m in grid.sent]  # by category
    assert "query" not in kinds  # not asked again: the checkpoint holds them
    train = [m for m in grid.sent if m.metadata.message_type == "train"]
    assert train and all(list(m.content[P.CONFIG][P.FEATURE_MEAN]) == pytest.approx(first["mean"]) for m in train)


# ---------------------------------------------------------------------------------- benchmark
def test_bench_ablation_runs_fused_image_only_and_fused_without_proxy_features(cohort, tmp_path):
    from dicomfl.workbench.bench import Bench, load_bench_config, plan

    def bench_yaml(**over):
        cfg = {"sites": [str(cohort / s / "site.yaml") for s in SITES], "strategies": ["pooled", "fedavg"],
               "dp_epsilons": [None], "seeds": [0], "rounds": 1, "model": MODEL, "leave_one_site_out": False,
               "scale_sites": 0, "out_dir": str(tmp_path / "bench"), **over}
        p = tmp_path / "bench.yaml"
        p.write_text(yaml.safe_dump(cfg))
        return p

    with pytest.raises(ConfigError, match="ablation_drop_features: unknown feature station_name"):
        load_bench_config(bench_yaml(ablation_drop_features=["station_name"]))
    default = load_bench_config(bench_yaml())
    assert "fedavg[fused-without-proxies]" not in {j.config for j in plan(default, list(SITES))}  # grid not longer
    proxies = ["pixel_spacing_mm", "rows", "columns", "bits_stored", "pixel_signed", "rescale_intercept", "modality",
               "photometric"]
    cfg = load_bench_config(bench_yaml(ablation_drop_features=proxies))
    rows = Bench(cfg).run()["configs"]
    assert {"pooled", "fedavg", "fedavg[image-only]", "fedavg[metadata-only]", "fedavg[fused-without-proxies]"} == set(rows)
    run = yaml.safe_load(next((cfg.out_dir / "runs").glob("bench-fedavg-fused-without-proxies*.yaml")).read_text())
    assert run["model"]["drop_features"] == sorted(proxies) and run["model"]["mode"] == "fused"
    for c in rows.values():
        assert set(c["auroc"]) == set(SITES)


# --------------------------------------------------------------------- predict / export transform
def test_the_network_wrapper_applies_the_same_transform_eagerly_and_in_torchscript():
    import torch

    from dicomfl.common.featurenet import StandardizedInput, with_transform
    from dicomfl.common.features import N_FEATURES

    rng = np.random.default_rng(0)
    rows = rng.uniform(-6, 6, (64, N_FEATURES)).astype(np.float32)
    groups = feature_groups()
    for f in NUMERIC_NAMES:
        rows[:, groups[f][1]] = rng.random(64) < 0.3  # missing indicators
    t = FeatureTransform(mean=np.asarray(GOOD_MEAN, np.float32), std=np.asarray(GOOD_STD, np.float32),
                         drop=("kvp", "modality"))
    net = build_model(ModelConfig(**MODEL)).eval()
    images = torch.from_numpy(rng.normal(size=(64, 1, 32, 32)).astype(np.float32))
    want = net(images, torch.from_numpy(t.apply(rows)))
    wrapped = StandardizedInput(net, t).eval()
    assert torch.allclose(wrapped(images, torch.from_numpy(rows)), want, atol=1e-6)
    scripted = torch.jit.script(wrapped)
    assert torch.allclose(scripted(images, torch.from_numpy(rows)), want, atol=1e-6)
    assert with_transform(net, FeatureTransform()) is net  # nothing to do: the network itself
