"""SCAFFOLD (Karimireddy et al., ICML 2020): the control-variate rules on a problem whose answer is
known, the corrected step in our trainer (with and without Opacus), the site's control state
against a hostile coordinator, the coordinator's audit of control deltas, and a federation run
(with resume) through the in-process path."""

from __future__ import annotations

import json
import logging
import stat

import numpy as np
import pytest
import yaml
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from dicomfl.client.handler import SiteHandler, SiteResolver
from dicomfl.client.scaffold import CONTROL_MAX_NORM
from dicomfl.common import protocol as P
from dicomfl.common.config import ModelConfig, load_run_config, load_site_config
from dicomfl.common.errors import ConfigError
from dicomfl.common.model import build_model, get_weights
from dicomfl.common.scaffold import (client_control_update, control_consistency, server_control_update,
                                     server_model_update)
from dicomfl.server.checkpoint import Checkpoints, read_npz
from dicomfl.server.checks import control_problems
from dicomfl.server.federation import Federation
from dicomfl.server.replies import Rejection, validate_train_reply
from dicomfl.workbench.flower_adapter import task_identity
from dicomfl.workbench.inprocess import InProcessGrid

SITES = ("site-a", "site-b", "site-c")
MODEL = {"mode": "fused", "image_size": 32, "width": 4, "depth": 1, "meta_hidden": 8, "head_hidden": 8}
MC = ModelConfig(**MODEL)


# ------------------------------------------------------------ the paper's rules, known answers
# Site i's loss: f_i(w) = a_i / 2 * ||w - m_i||^2 (gradient a_i (w - m_i)). The federation's
# optimum of mean_i f_i is w* = sum a_i m_i / sum a_i. Local gradient descent has a closed form.
A = np.array([1.0, 4.0, 0.25])
M = np.array([[1.0, -2.0], [-3.0, 0.5], [4.0, 2.0]])
W_STAR = (A[:, None] * M).sum(0) / A.sum()


def _local_steps(i, x, c, c_i, lr, K):
    """K steps of SCAFFOLD's corrected gradient descent on f_i (c = c_i = 0 gives FedAvg's)."""
    y = x.copy()
    for _ in range(K):
        y = y - lr * (A[i] * (y - M[i]) - c_i + c)
    return y


def test_control_variates_update_as_the_paper_defines_them():
    lr, K, x = 0.1, 5, np.zeros(2)
    zero = {"w": np.zeros(2)}
    deltas, news = [], []
    for i in range(3):
        y = _local_steps(i, x, 0.0, 0.0, lr, K)
        # closed form of K steps of gradient descent on a quadratic
        assert np.allclose(y, M[i] + (1 - lr * A[i]) ** K * (x - M[i]))
        new, delta = client_control_update(zero, zero, {"w": x}, {"w": y}, K, lr)
        # option II: c_i+ = c_i - c + (x - y_i) / (K lr), here (1 - (1 - lr a_i)^K)(x - m_i) / (K lr)
        expected = (1 - (1 - lr * A[i]) ** K) * (x - M[i]) / (K * lr)
        assert np.allclose(new["w"], expected) and np.allclose(delta["w"], expected)
        # with plain SGD that is the mean gradient along the local path
        path, g = x.copy(), []
        for _ in range(K):
            g.append(A[i] * (path - M[i]))
            path = path - lr * g[-1]
        assert np.allclose(new["w"], np.mean(g, axis=0))
        deltas.append(delta)
        news.append(new["w"])
    # server: c <- c + |S|/N * mean(delta_c_i), with two of three sites aggregated
    c = server_control_update(zero, deltas[:2], n_sites=3)
    assert np.allclose(c["w"], (2 / 3) * np.mean([deltas[0]["w"], deltas[1]["w"]], axis=0))
    # with every site, c is the mean of the sites' controls
    c = server_control_update(zero, deltas, n_sites=3)
    assert np.allclose(c["w"], np.mean(news, axis=0))
    with pytest.raises(ValueError):
        server_control_update(zero, deltas, n_sites=2)
    # server model step: x + eta_g * (mean y - x)
    assert np.allclose(server_model_update({"w": np.ones(2)}, {"w": np.full(2, 3.0)}, 0.5)["w"], [2.0, 2.0])
    # a second round from c_i != 0: the delta is (x - y)/(K lr) - c, and delta + c fits s (x - y), s = 1/(K lr)
    c_i = {"w": news[1]}
    x2 = np.array([0.5, 0.5])
    y2 = _local_steps(1, x2, c["w"], c_i["w"], lr, K)
    new2, d2 = client_control_update(c_i, c, {"w": x2}, {"w": y2}, K, lr)
    assert np.allclose(new2["w"], c_i["w"] - c["w"] + (x2 - y2) / (K * lr))
    assert np.allclose(d2["w"], new2["w"] - c_i["w"])
    s, residual = control_consistency(d2, c, {"w": x2}, {"w": y2})
    assert s == pytest.approx(1 / (K * lr)) and residual < 1e-9


def _federate(rounds, lr, K, scaffold):
    x = np.zeros(2)
    c, c_i = np.zeros(2), [np.zeros(2) for _ in range(3)]
    for _ in range(rounds):
        ys, deltas = [], []
        for i in range(3):
            y = _local_steps(i, x, c, c_i[i], lr, K) if scaffold else _local_steps(i, x, 0.0, 0.0, lr, K)
            ys.append(y)
            if scaffold:
                new, d = client_control_update({"w": c_i[i]}, {"w": c}, {"w": x}, {"w": y}, K, lr)
                c_i[i] = new["w"]
                deltas.append(d)
        x = server_model_update({"w": x}, {"w": np.mean(ys, axis=0)}, 1.0)["w"]
        if scaffold:
            c = server_control_update({"w": c}, deltas, 3)["w"]
    return x


def test_scaffold_removes_client_drift_on_heterogeneous_quadratics():
    fedavg = _federate(200, 0.1, 10, scaffold=False)
    scaffold = _federate(200, 0.1, 10, scaffold=True)
    # FedAvg with 10 local steps settles at a biased point; SCAFFOLD at the federation's optimum
    assert np.linalg.norm(fedavg - W_STAR) > 0.3
    assert np.linalg.norm(scaffold - W_STAR) < 1e-8


# ------------------------------------------------------------------- the corrected step in our trainer
@pytest.mark.parametrize("dp", [False, True])
def test_the_trainer_adds_the_correction_after_the_privacy_step(site_data, dp):
    import torch

    from dicomfl.common.splits import TRAIN
    from dicomfl.common.train import DPSettings, TrainSettings, load_split, train_local

    cfg, data = site_data["site-a"]
    split = load_split(data, TRAIN, 32)
    model = build_model(MC, seed=0)
    x = get_weights(model)
    rng = np.random.default_rng(0)
    corr = {k: rng.normal(size=v.shape).astype(np.float32) for k, v in x.items()}
    lr = 0.05

    def one_step(correction):
        torch.set_num_threads(1)
        settings = TrainSettings(epochs=1, max_steps=1, batch_size=16, lr=lr, seed=3, optimizer="sgd",
                                 correction=correction)
        priv = DPSettings(noise_multiplier=1.0, max_grad_norm=1.0, seed=11) if dp else None
        return train_local(model, split, settings, dp=priv, global_weights=x)

    plain, corrected = one_step(None), one_step(corr)
    assert plain.steps == corrected.steps == 1
    # one SGD step: y_plain - y_corrected = lr * correction, exactly: the correction is neither
    # clipped nor noised (under DP it is added after Opacus's step)
    for k in x:
        assert np.allclose(plain.weights[k] - corrected.weights[k], lr * corr[k], atol=1e-6), k
    # and the accountant sees the same step either way
    assert plain.history == corrected.history
    if dp:
        assert len(plain.history) == 1


def test_a_correction_needs_sgd(site_data):
    from dicomfl.common.splits import TRAIN
    from dicomfl.common.train import TrainSettings, load_split, train_local

    _, data = site_data["site-a"]
    x = get_weights(build_model(MC))
    with pytest.raises(ValueError, match="SGD"):
        train_local(build_model(MC), load_split(data, TRAIN, 32),
                    TrainSettings(max_steps=1, optimizer="adam", correction={k: np.zeros_like(v) for k, v in x.items()}))


# ---------------------------------------------------------------------------- the site's side
def _site(cohort, tmp_path, name="site-a", optimizer="sgd", **privacy):
    src = cohort / name / "site.yaml"
    raw = yaml.safe_load(src.read_text())
    for k in ("dicom_dir", "labels", "secret_file"):
        raw["site"][k] = str((src.parent / raw["site"][k]).resolve())
    raw["site"]["state_dir"] = str(tmp_path / f"{name}-state")
    raw["train"].update({"batch_size": 16, "optimizer": optimizer, "lr": 0.05})
    if privacy:
        raw["privacy"] = {"delta": 1e-5, "max_grad_norm": 1.0, **privacy}
    p = tmp_path / f"{name}.yaml"
    p.write_text(yaml.safe_dump(raw))
    return p


def _train_msg(control, run="sc1", rnd=1, steps=3) -> Message:
    task_identity()
    g = P.to_record(get_weights(build_model(MC)))
    cfg = {"run": run, "server-round": rnd, "num-rounds": 3, "local-epochs": 1, "local-steps": steps, "dp": False,
           "target-epsilon": 0.0, "delta": 1e-5, "seed": 0, "model": MC.model_dump_json()}
    content = RecordDict({P.ARRAYS: g, P.CONFIG: ConfigRecord(cfg)})
    if control is not None:
        content[P.CONTROL] = control
    msg = Message(content=content, dst_node_id=1, message_type="train")
    msg.metadata.__dict__["_message_id"] = f"m-{run}-{rnd}"
    return msg


def _ctx(site_yaml) -> Context:
    return Context(run_id=1, node_id=1, node_config={"site-config": str(site_yaml)}, state=RecordDict(), run_config={})


def _zeros():
    return {k: np.zeros_like(v) for k, v in get_weights(build_model(MC)).items()}


def test_a_site_keeps_its_control_and_replies_with_the_papers_delta(cohort, tmp_path):
    site = _site(cohort, tmp_path)
    handler = SiteHandler()
    x = get_weights(build_model(MC))
    rng = np.random.default_rng(1)
    c = {k: (0.01 * rng.normal(size=v.shape)).astype(np.float32) for k, v in x.items()}
    reply = handler.handle(_train_msg(P.to_record(c)), _ctx(site))
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    y = P.from_record(reply.content[P.ARRAYS])
    delta = P.from_record(reply.content[P.CONTROL_DELTA])
    steps = reply.content[P.METRICS]["steps"]
    assert steps == 3
    for k in x:  # c_i was zero: delta = (x - y) / (K lr) - c
        expected = (x[k].astype(np.float64) - y[k]) / (steps * 0.05) - c[k]
        assert np.allclose(delta[k], expected, atol=1e-5), k
    state = load_site_config(site).site.state_dir / "scaffold" / "sc1.npz"
    assert stat.S_IMODE(state.stat().st_mode) == 0o600
    stored = np.load(state)
    assert int(stored["round"]) == 1
    assert all(np.allclose(stored["after." + k], delta[k]) for k in x)
    # round 2 starts from c_i (stored): its delta is (x - y)/(K lr) - c again, and c_i grows by it
    reply2 = handler.handle(_train_msg(P.to_record(c), rnd=2), _ctx(site))
    d2, y2 = P.from_record(reply2.content[P.CONTROL_DELTA]), P.from_record(reply2.content[P.ARRAYS])
    s, residual = control_consistency(d2, c, x, y2)
    assert s == pytest.approx(1 / (3 * 0.05), rel=1e-4) and residual < 1e-4
    # round 2 trained with the correction c - c_i: it differs from round 1's update
    assert any(not np.allclose(y2[k], y[k]) for k in x)
    after2 = np.load(state)
    assert int(after2["round"]) == 2 and all(np.allclose(after2["after." + k], delta[k] + d2[k], atol=1e-6) for k in x)
    # the reply carries only what the protocol lists
    assert set(reply2.content.keys()) <= {P.ARRAYS, P.METRICS, P.SITE, P.CONTROL_DELTA}


def _rec(arrays: dict) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def _hostile_controls():
    z = _zeros()
    first = next(iter(z))
    yield "wrong shape", _rec({**z, first: np.zeros((3, 3), np.float32)})
    yield "NaN", _rec({**z, first: np.full_like(z[first], np.nan)})
    yield "infinite", _rec({**z, first: np.full_like(z[first], np.inf)})
    yield "huge", _rec({**z, first: np.full_like(z[first], CONTROL_MAX_NORM)})
    yield "float64 beyond float32", _rec({**z, first: np.full(z[first].shape, 1e300)})
    yield "missing name", _rec({k: v for k, v in z.items() if k != first})
    yield "extra name", _rec({**z, "../../etc/passwd": np.zeros(1, np.float32)})
    yield "integers", _rec({**z, first: np.zeros(z[first].shape, np.int64)})
    yield "complex", _rec({**z, first: np.zeros(z[first].shape, np.complex64)})
    yield "not an ArrayRecord", ConfigRecord({"c": 1.0})


def test_a_hostile_server_control_is_refused_and_the_site_control_is_untouched(cohort, tmp_path, caplog):
    site = _site(cohort, tmp_path)
    handler = SiteHandler()
    ok = handler.handle(_train_msg(P.to_record(_zeros())), _ctx(site))
    assert not ok.has_error()
    state = load_site_config(site).site.state_dir / "scaffold" / "sc1.npz"
    before = state.read_bytes()
    for what, control in _hostile_controls():
        reply = handler.handle(_train_msg(control, rnd=2), _ctx(site))
        assert reply.has_error(), what
        assert P.ERROR_REASON_RE.fullmatch(reply.error.reason) and reply.error.code == P.ERR_BAD_REQUEST, what
        assert state.read_bytes() == before, what
    assert "passwd" not in caplog.text  # the hostile name is never echoed, not even to the site's log
    # and the site still works
    assert not handler.handle(_train_msg(P.to_record(_zeros()), rnd=2), _ctx(site)).has_error()


def test_a_site_with_adam_refuses_scaffold_and_a_run_config_says_which_key(cohort, tmp_path):
    site = _site(cohort, tmp_path, optimizer="adam")
    reply = SiteHandler().handle(_train_msg(P.to_record(_zeros())), _ctx(site))
    assert reply.has_error() and reply.error.code == P.ERR_CONFIG
    assert not (load_site_config(site).site.state_dir / "scaffold").exists()
    run = tmp_path / "run.yaml"
    run.write_text(yaml.safe_dump({"run": {"name": "sc", "strategy": "scaffold"}, "model": MODEL,
                                   "sites": [str(_site(cohort, tmp_path, "site-b")), str(site)]}))
    with pytest.raises(ConfigError, match=r"sites\.1: train\.optimizer is adam; run\.strategy scaffold needs sgd"):
        load_run_config(run)


def test_a_corrupt_or_stale_control_file_counts_as_zeros(cohort, tmp_path, caplog):
    site = _site(cohort, tmp_path)
    handler = SiteHandler()
    state = load_site_config(site).site.state_dir / "scaffold" / "sc1.npz"
    state.parent.mkdir(parents=True)
    state.write_bytes(b"PK\x03\x04 not a zip at all")
    caplog.set_level(logging.INFO)
    r1 = handler.handle(_train_msg(P.to_record(_zeros()), rnd=1), _ctx(site))
    assert not r1.has_error()
    assert "unusable" in caplog.text
    # a file from a later round than asked (an earlier run with this name): not used
    r0 = handler.handle(_train_msg(P.to_record(_zeros()), rnd=5), _ctx(site))
    assert not r0.has_error()
    caplog.clear()
    r_again = handler.handle(_train_msg(P.to_record(_zeros()), rnd=1), _ctx(site))
    assert "later than round 1" in caplog.text and not r_again.has_error()
    # zeros: with c = c_i = 0 the round is plain SGD, the same update as the first one
    a, b = P.from_record(r1.content[P.ARRAYS]), P.from_record(r_again.content[P.ARRAYS])
    assert all(np.allclose(a[k], b[k], atol=1e-6) for k in a)


# ---------------------------------------------------------------------------- the coordinator's side
def _reply(arrays, delta=None, n=10.0) -> Message:
    task_identity()
    content = RecordDict({P.ARRAYS: _rec(arrays), P.METRICS: MetricRecord({"num-examples": n, "train-loss": 0.5})})
    if delta is not None:
        content[P.CONTROL_DELTA] = _rec(delta)
    sent = Message(RecordDict({P.CONFIG: ConfigRecord({"server-round": 1})}), dst_node_id=7, message_type="train")
    return Message(content=content, reply_to=sent)


def test_the_coordinator_audits_control_deltas():
    x = get_weights(build_model(MC))
    rng = np.random.default_rng(2)
    y = {k: (v + 0.01 * rng.normal(size=v.shape)).astype(np.float32) for k, v in x.items()}
    c = {k: (0.1 * rng.normal(size=v.shape)).astype(np.float32) for k, v in x.items()}
    zeros = {k: np.zeros_like(v) for k, v in x.items()}
    _, honest = client_control_update(zeros, c, x, y, steps=4, lr=0.05)
    # schema: only in a SCAFFOLD run, always with the arrays, the model's names/shapes, finite
    assert isinstance(validate_train_reply(_reply(y, honest), x, max_examples=100), Rejection)
    assert isinstance(validate_train_reply(_reply(y), x, max_examples=100, expect_control=True), Rejection)
    ok = validate_train_reply(_reply(y, honest), x, max_examples=100, expect_control=True)
    assert not isinstance(ok, Rejection) and set(ok.control_delta) == set(x)
    first = next(iter(x))
    nan = {**honest, first: np.full_like(honest[first], np.nan)}
    bad = validate_train_reply(_reply(y, nan), x, max_examples=100, expect_control=True)
    assert isinstance(bad, Rejection) and bad.reason == f"parameter {first} has NaN or infinite values"
    # content: the honest delta passes; a delta that carries anything but the scaled update, a
    # negative scale, or a norm above the bound is rejected with a one-line reason
    leak = {k: v + 0.05 * rng.normal(size=v.shape).astype(np.float32) for k, v in honest.items()}
    flipped = {k: (-(v.astype(np.float64) + c[k]) - c[k]).astype(np.float32) for k, v in honest.items()}
    huge = {k: (v.astype(np.float64) * 1e6).astype(np.float32) for k, v in honest.items()}
    deltas = {"site-a": honest, "site-b": leak, "site-c": flipped, "site-d": huge}
    problems = control_problems(deltas, {s: y for s in deltas}, x, c, max_norm=1000.0)
    assert set(problems) == {"site-b", "site-c", "site-d"}
    assert "not the site's update scaled" in problems["site-b"] and "not the site's update scaled" in problems["site-c"]
    assert "exceeds run.max_control_norm" in problems["site-d"]
    assert all("\n" not in why for why in problems.values())


# ----------------------------------------------------------------------- a federation, in process
def _write_run(tmp_path, cohort, name, rounds=2, **run):
    sites = [str(_site(cohort, tmp_path, s)) for s in SITES]
    cfg = {"run": {"name": name, "rounds": rounds, "strategy": "scaffold", "min_sites": 2, "local_steps": 3,
                   "out_dir": str(tmp_path / name), **run},
           "cross_site": {"every": 0, "local_baseline": False}, "model": MODEL, "sites": sites}
    p = tmp_path / f"{name}.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def test_a_scaffold_federation_runs_and_its_server_control_is_the_mean_of_the_deltas(cohort, tmp_path, one_thread):
    from .test_federation import _audit_reply, _header_strings

    cfg = load_run_config(_write_run(tmp_path, cohort, "scaf"))
    grid = InProcessGrid(cfg.sites)
    summary = Federation(cfg, grid).run()
    assert [sorted(h["aggregated"]) for h in summary["history"]] == [list(SITES)] * 2
    assert summary["strategy"] == "scaffold"
    ck = Checkpoints(cfg.out_dir)
    c1 = read_npz(cfg.out_dir / "checkpoints" / "round-0001" / "strategy-control.npz")
    trains = [m for m in grid.received if m.has_content() and P.CONTROL_DELTA in m.content]
    assert len(trains) == 2 * len(SITES)
    r1 = [P.from_record(m.content[P.CONTROL_DELTA]) for m in trains[:3]]
    for k in c1:  # N = 3 connected sites, all aggregated: c = sum / 3
        assert np.allclose(c1[k], sum(d[k].astype(np.float64) for d in r1) / 3, atol=1e-6)
    # round 2's train messages carried round 1's c
    sent2 = [m for m in grid.sent if m.metadata.message_type == "train" and int(m.content[P.CONFIG]["server-round"]) == 2]
    assert len(sent2) == 3
    assert all(np.allclose(P.from_record(m.content[P.CONTROL])[k], c1[k]) for m in sent2 for k in c1)
    assert ck.latest().strategy_state["control"].keys() == c1.keys()
    # the cross-site matrix has the global model at every site
    cs = json.loads((cfg.out_dir / "cross_site_final.json").read_text())
    assert sorted(cs["matrix"]["global"]) == list(SITES)
    # every reply holds only what the protocol lists, and no header value
    names = {k: tuple(v.shape) for k, v in get_weights(build_model(MC)).items()}
    headers = set().union(*(_header_strings(cohort, s) for s in SITES))
    for reply in grid.received:
        _audit_reply(reply, names, headers)


def test_a_resumed_scaffold_run_restores_the_server_control(cohort, tmp_path, one_thread):
    path = _write_run(tmp_path, cohort, "scres", rounds=2)
    sites = SiteResolver()
    cfg = load_run_config(path)
    cfg.run.rounds = 1
    Federation(cfg, InProcessGrid(cfg.sites, resolver=sites)).run()
    c1 = Checkpoints(cfg.out_dir).latest().strategy_state["control"]
    cfg2 = load_run_config(path)
    grid = InProcessGrid(cfg2.sites, resolver=sites)
    Federation(cfg2, grid).run(resume=True)
    sent = [m for m in grid.sent if m.metadata.message_type == "train"]
    assert {int(m.content[P.CONFIG]["server-round"]) for m in sent} == {2}
    assert all(np.allclose(P.from_record(m.content[P.CONTROL])[k], c1[k]) for m in sent for k in c1)
    # the same result as an uninterrupted run (its own run name, so its own site controls)
    straight = load_run_config(_write_run(tmp_path / "s", cohort, "scstraight", rounds=2) if (tmp_path / "s").mkdir() is None else None)
    Federation(straight, InProcessGrid(straight.sites, resolver=SiteResolver())).run()
    a, b = Checkpoints(cfg2.out_dir).latest(), Checkpoints(straight.out_dir).latest()
    dist = np.sqrt(sum(np.sum((a.global_weights[k] - b.global_weights[k]) ** 2) for k in a.global_weights))
    assert dist < 1e-4
    for k in c1:
        assert np.allclose(a.strategy_state["control"][k], b.strategy_state["control"][k], atol=1e-4)
