"""The round loop, update checks, cross-site validation and the privacy audit of every message a
ClientApp sends — with the real ClientApp, driven in process (the deployment tests run the same
code over real gRPC)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pydicom
import pytest
import yaml
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord

from dicomfl.client import app as client_app
from dicomfl.client.handler import SiteResolver
from dicomfl.common import protocol as P
from dicomfl.common.config import load_run_config
from dicomfl.common.discover import walk
from dicomfl.common.fedstats import released
from dicomfl.common.model import ModelConfig, build_model, get_weights
from dicomfl.server.checks import norm_outliers, update_problem
from dicomfl.server.checkpoint import Checkpoints, read_npz
from dicomfl.server.federation import Federation
from dicomfl.workbench.inprocess import InProcessGrid

from .phi import identifying_values

SITES = ("site-a", "site-b", "site-c")
MODEL = {"mode": "fused", "image_size": 32, "width": 8, "depth": 2, "meta_hidden": 32, "head_hidden": 32}


def write_run(tmp: Path, cohort: Path, name: str, **run) -> Path:
    cfg = {"run": {"name": name, "rounds": 2, "strategy": "fedavg", "min_sites": 2, "local_epochs": 1,
                   "out_dir": str(tmp / name), **run},
           "cross_site": {"every": 0, "local_baseline": True}, "model": MODEL,
           "sites": [str(cohort / s / "site.yaml") for s in SITES]}
    p = tmp / f"{name}.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def _dist(a, b):
    return float(np.sqrt(sum(np.sum((a[k] - b[k]) ** 2) for k in a)))


@pytest.mark.parametrize("strategy", ["fedavg", "fedprox", "fedadam"])
def test_rounds_change_the_model_and_cross_site_matrix_is_complete(cohort, tmp_path, strategy):
    schedule = {"lr_schedule": "cosine", "lr_min_factor": 0.2} if strategy == "fedprox" else {}
    cfg = load_run_config(write_run(tmp_path, cohort, strategy, strategy=strategy, proximal_mu=0.1, **schedule))
    grid = InProcessGrid(cfg.sites)
    summary = Federation(cfg, grid).run()
    out = cfg.out_dir
    assert summary["rounds"] == 2 and [h["round"] for h in summary["history"]] == [1, 2]
    for h in summary["history"]:
        assert sorted(h["aggregated"]) == list(SITES)
        assert all("train-loss" in m and "val-auroc" in m for m in h["sites"].values())
    initial = get_weights(build_model(ModelConfig(**MODEL), seed=0))
    final = Checkpoints(out).latest().global_weights
    assert _dist(final, initial) > 0
    cs = json.loads((out / "cross_site_final.json").read_text())
    # round 1's global model, scored by the sites' validation in round 2, is evaluated as "best"
    assert cs["models"] == ["global", "best"] + [f"local:{s}" for s in SITES]
    sel = summary["selected"]
    assert sel["candidates"]["best"]["round"] == 1 and sel["candidates"]["final"]["round"] == 2
    scores = {k: c["val_auroc"] for k, c in sel["candidates"].items()}
    assert scores["final"] == pytest.approx(np.mean([cs["matrix"]["global"][s]["val-auroc"] for s in SITES]))
    assert sel["chosen"] == ("best" if scores["best"] > scores["final"] else "final")
    chosen = read_npz(out / "checkpoints" / ("round-0001" if sel["chosen"] == "best" else "round-0002") / "global.npz")
    assert all(np.array_equal(chosen[k], v) for k, v in read_npz(out / "checkpoints" / "best.npz").items())
    for m in cs["models"]:
        assert sorted(cs["matrix"][m]) == list(SITES)
        assert all(v["auroc"] is None or 0 <= v["auroc"] <= 1 for v in cs["matrix"][m].values())
    for s in SITES:
        assert "gap" in cs["gaps"]["auroc"][f"local:{s}"]
    for f in ("report.md", "metrics.json", "cross_site_final.png", "learning_curves.png", "cross_site_final_auroc.csv"):
        assert (out / f).stat().st_size > 0
    # FedProx really reaches the sites as the proximal mu in their train config.
    sent_mu = {float(m.content[P.CONFIG].get("proximal-mu", 0.0)) for m in grid.sent if P.CONFIG in m.content
               and m.metadata.message_type == "train"}
    assert sent_mu == ({0.1} if strategy == "fedprox" else {0.0})
    # ... and the learning-rate schedule as each round's factor (cosine from 1 to 0.2 over 2 rounds)
    sent_lr = sorted({(int(m.content[P.CONFIG]["server-round"]), float(m.content[P.CONFIG]["lr-scale"]))
                      for m in grid.sent if m.metadata.message_type == "train"})
    assert sent_lr == ([(1, 1.0), (2, pytest.approx(0.2))] if strategy == "fedprox" else [(1, 1.0), (2, 1.0)])


def test_resume_continues_from_the_checkpoint_to_the_same_round_count(cohort, tmp_path, one_thread):
    path = write_run(tmp_path, cohort, "resume", rounds=3)
    cfg = load_run_config(path)
    cfg.run.rounds = 1  # "interrupted" after round 1
    # One resolver for the three runs, so they train on the very same arrays in memory: CPU kernels
    # may round differently for differently aligned copies, and training amplifies that.
    sites = SiteResolver()
    Federation(cfg, InProcessGrid(cfg.sites, resolver=sites)).run()
    after1 = Checkpoints(cfg.out_dir).latest()
    assert after1.round == 1
    cfg3 = load_run_config(path)
    grid = InProcessGrid(cfg3.sites, resolver=sites)
    summary = Federation(cfg3, grid).run(resume=True)
    assert [h["round"] for h in summary["history"]] == [1, 2, 3]
    rounds_sent = sorted({int(m.content[P.CONFIG]["server-round"]) for m in grid.sent if m.metadata.message_type == "train"})
    assert rounds_sent == [2, 3]
    # and the same result as an uninterrupted run
    straight = load_run_config(write_run(tmp_path, cohort, "straight", rounds=3))
    Federation(straight, InProcessGrid(straight.sites, resolver=sites)).run()
    a, b = Checkpoints(cfg3.out_dir).latest().global_weights, Checkpoints(straight.out_dir).latest().global_weights
    assert _dist(a, b) < 1e-4


def test_update_checks():
    ref = {"w": np.zeros((2, 2), np.float32), "b": np.zeros(2, np.float32)}
    assert update_problem({"w": np.ones((2, 2), np.float32), "b": np.ones(2, np.float32)}, ref) is None
    assert "names" in update_problem({"w": ref["w"]}, ref)
    assert "shape" in update_problem({"w": np.zeros((3, 2), np.float32), "b": ref["b"]}, ref)
    assert "NaN" in update_problem({"w": np.full((2, 2), np.nan, np.float32), "b": ref["b"]}, ref)
    assert "NaN" in update_problem({"w": np.full((2, 2), np.inf, np.float32), "b": ref["b"]}, ref)
    assert list(norm_outliers({"a": 1.0, "b": 1.2, "c": 0.9, "d": 50.0}, 10.0)) == ["d"]
    assert norm_outliers({"a": 1.0, "d": 50.0}, 10.0) == {}  # too few to say what is far


class _Poison:
    """Wraps the real ClientApp: one site sends NaN weights, another huge ones."""

    def __init__(self, nan_node: int, big_node: int) -> None:
        self.nan_node, self.big_node = nan_node, big_node

    def __call__(self, msg, context):
        reply = client_app.app(msg, context)
        if msg.metadata.message_type == "train" and reply.has_content() and P.ARRAYS in reply.content:
            arrays = {k: v.numpy() for k, v in reply.content[P.ARRAYS].items()}
            if context.node_id == self.nan_node:
                arrays = {k: np.full_like(v, np.nan) for k, v in arrays.items()}
            elif context.node_id == self.big_node:
                arrays = {k: v + 1000.0 for k, v in arrays.items()}
            else:
                return reply
            from flwr.app import Array

            reply.content[P.ARRAYS] = ArrayRecord({k: Array(v) for k, v in arrays.items()})
        return reply


def test_bad_updates_are_rejected_with_the_site_named(cohort, tmp_path, caplog):
    cfg = load_run_config(write_run(tmp_path, cohort, "poison", rounds=1, min_sites=1))
    # a fourth site (site-a's data under another name) so the norm check has a median to compare with
    raw = yaml.safe_load((cohort / "site-a" / "site.yaml").read_text())
    raw["site"].update({"name": "site-d", "dicom_dir": str(cohort / "site-a" / "dicom"),
                        "labels": str(cohort / "site-a" / "labels.csv"), "secret_file": str(cohort / "site-a" / "site.key"),
                        "state_dir": str(tmp_path / "site-d-state")})
    (tmp_path / "site-d.yaml").write_text(yaml.safe_dump(raw))
    sites = list(cfg.sites) + [tmp_path / "site-d.yaml"]
    grid = InProcessGrid(sites)
    nodes = sorted(grid.nodes)
    grid.app = _Poison(nan_node=nodes[1], big_node=nodes[2])
    summary = Federation(cfg, grid).run()
    h = summary["history"][0]
    assert "NaN" in h["rejected"]["site-b"]
    assert "norm" in h["rejected"]["site-c"]
    assert "site-b" not in h["aggregated"] and "site-c" not in h["aggregated"]
    final = Checkpoints(cfg.out_dir).latest().global_weights
    assert all(np.isfinite(v).all() for v in final.values())
    assert "rejected the update from site-b" in caplog.text


def test_a_site_that_does_not_answer_is_named_and_the_round_goes_on(cohort, tmp_path):
    cfg = load_run_config(write_run(tmp_path, cohort, "down", rounds=2))
    grid = InProcessGrid(cfg.sites)
    fed = Federation(cfg, grid)

    def on_event(kind, data):
        if kind == "round-end" and data["round"] == 1:
            grid.down.add(sorted(grid.nodes)[2])  # site-c goes away after round 1

    fed.on_event = on_event
    summary = fed.run()
    h2 = summary["history"][1]
    assert h2["missing"] == ["site-c"] and sorted(h2["aggregated"]) == ["site-a", "site-b"]
    assert "site-c" in (cfg.out_dir / "report.md").read_text().split("Sites missing from at least one round:")[1]


# ------------------------------------------------------------------------------ privacy audit


def _header_strings(cohort: Path, site: str) -> set[str]:
    out: set[str] = set()
    for f in walk(cohort / site / "dicom"):
        try:
            ds = pydicom.dcmread(f.path)
        except Exception:  # noqa: BLE001 - bad files of the cohort
            continue
        out |= identifying_values(ds)
    return {s for s in out if len(s) >= 6}


def _audit_reply(reply, model_names: dict, header_strings: set[str]) -> None:
    wire = bytes(reply.deflate()) if hasattr(reply, "deflate") else b""
    for s in header_strings:
        assert s.encode() not in wire, f"a header value crossed the site boundary: {s[:3]}..."
    if reply.has_error():
        assert P.ERROR_REASON_RE.match(reply.error.reason), reply.error.reason
        assert reply.error.code in P.ERROR_CODES
        return
    c = reply.content
    for key in c.keys():
        rec = c[key]
        if isinstance(rec, ArrayRecord):
            assert key in (P.ARRAYS, P.LOCAL_ARRAYS, P.CONTROL_DELTA, P.PERSONAL_ARRAYS)
            # one flat array whose key is exactly the model's layout: the key carries nothing else
            layout = P.FLAT_PREFIX + ";".join(f"{k}={'x'.join(map(str, v))}" for k, v in model_names.items())
            assert list(rec.keys()) == [layout]
            got = {k: tuple(v.shape) for k, v in P.from_record(rec).items()}
            assert got == model_names
        elif isinstance(rec, MetricRecord):
            train = (P.METRICS, P.LOCAL_METRICS, P.PERSONAL_METRICS)
            allowed = (P.TRAIN_METRICS if key in train else
                       P.stats_metrics(released()) if key == P.STATS else P.EVAL_METRICS)
            assert key in (*train, P.STATS) or key.startswith(P.EVAL_PREFIX)
            assert set(rec.keys()) <= allowed, set(rec.keys()) - allowed
            assert all(isinstance(v, float) for v in rec.values())
        elif isinstance(rec, ConfigRecord):
            assert key == P.SITE and set(rec.keys()) == {"name"} and P.SITE_NAME_RE.match(rec["name"])
        else:
            raise AssertionError(f"unexpected record {key}: {type(rec).__name__}")


def test_privacy_audit_every_reply_holds_only_weights_and_whitelisted_numbers(cohort, tmp_path):
    cfg = load_run_config(write_run(tmp_path, cohort, "audit", rounds=1))
    grid = InProcessGrid(cfg.sites)
    Federation(cfg, grid).run()
    model_names = {k: tuple(v.shape) for k, v in get_weights(build_model(ModelConfig(**MODEL))).items()}
    headers = set().union(*(_header_strings(cohort, s) for s in SITES))
    assert len(headers) > 100  # the cohort really carries fake PHI to catch
    assert len(grid.received) == 3 * len(SITES)  # feature statistics + train + cross-site evaluate
    assert sum(P.STATS in r.content for r in grid.received) == len(SITES)
    for reply in grid.received:
        _audit_reply(reply, model_names, headers)


def test_errors_cross_the_boundary_only_as_a_code_and_a_reference(cohort, tmp_path, monkeypatch):
    headers = sorted(_header_strings(cohort, "site-a"))
    phi = next(s for s in headers if re.search(r"[A-Za-z]{6}", s))
    from dicomfl.client.trainer import SiteTrainer

    def boom(self, *a, **k):
        raise RuntimeError(f"cannot read /data/{phi}/IM0001 (PatientName={phi})")

    monkeypatch.setattr(SiteTrainer, "train", boom)
    cfg = load_run_config(write_run(tmp_path, cohort, "errors", rounds=1, min_sites=1))
    grid = InProcessGrid(cfg.sites[:1])
    summary = Federation(cfg, grid).run()
    err = [r for r in grid.received if r.has_error()]
    assert len(err) == 1
    _audit_reply(err[0], {}, {phi})
    assert err[0].error.code == P.ERR_INTERNAL
    ref = err[0].error.reason.rsplit("=", 1)[1]
    shown = summary["history"][0]["errors"]["site-a"]  # named by the grid's own table, not by a reply
    assert shown == err[0].error.reason and phi not in json.dumps(summary)
    site_log = (cohort / "site-a" / "state" / "logs" / "site.log").read_text()
    assert f"ref={ref}" in site_log and phi in site_log  # the full text stays at the site
    for f in cfg.out_dir.rglob("*"):
        if f.is_file() and f.suffix in (".json", ".md", ".csv"):
            assert phi not in f.read_text()


def test_a_site_over_its_privacy_budget_declines_and_the_round_goes_on(cohort, tmp_path):
    raw = yaml.safe_load((cohort / "site-c" / "site.yaml").read_text())
    for k in ("dicom_dir", "labels", "secret_file"):
        raw["site"][k] = str((cohort / "site-c" / raw["site"][k]).resolve())
    raw["site"]["state_dir"] = str(tmp_path / "site-c-state")
    raw["privacy"] = {"dp": True, "target_epsilon": 0.5, "noise_multiplier": 1.0, "delta": 1e-5}
    (tmp_path / "site-c.yaml").write_text(yaml.safe_dump(raw))
    cfg = load_run_config(write_run(tmp_path, cohort, "budget", rounds=1))
    cfg.sites = cfg.sites[:2] + [tmp_path / "site-c.yaml"]
    summary = Federation(cfg, InProcessGrid(cfg.sites)).run()
    h = summary["history"][0]
    assert h["declined"] == ["site-c"] and sorted(h["aggregated"]) == ["site-a", "site-b"]
    assert h["sites"]["site-c"]["declined"] == 1.0 and h["sites"]["site-c"]["epsilon-if-trained"] > 0.5
    report = (cfg.out_dir / "report.md").read_text()
    assert "| 1 | site-a, site-b |" in report and "site-c" in report.split("## Per-site")[0]
    assert "## Privacy" in report  # epsilon per site is reported when DP is on somewhere


def test_cross_site_every_k_rounds_and_evaluate_only(cohort, tmp_path):
    cfg = load_run_config(write_run(tmp_path, cohort, "every", rounds=2))
    cfg.cross_site.every = 1
    cfg.cross_site.local_baseline = False
    grid = InProcessGrid(cfg.sites)
    fed = Federation(cfg, grid)
    fed.run()
    assert (cfg.out_dir / "cross_site_round-0001.json").is_file() and (cfg.out_dir / "cross_site_final.json").is_file()
    assert json.loads((cfg.out_dir / "cross_site_final.json").read_text())["models"] == ["global", "best"]
    model = cfg.out_dir / "checkpoints" / "round-0002" / "global.npz"
    trained = len(grid.sent)
    payload = Federation(cfg, grid).evaluate_only(model)
    assert len(grid.sent) == trained + len(SITES)  # one evaluate message per site, no training
    assert sorted(payload["matrix"]["global"]) == list(SITES)
    final = json.loads((cfg.out_dir / "cross_site_final.json").read_text())
    for s in SITES:
        assert payload["matrix"]["global"][s]["auroc"] == final["matrix"]["global"][s]["auroc"]
