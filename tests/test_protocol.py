"""The typed protocol (common/protocol/): each request and reply survives its trip through Flower
records, every bound is enforced with a one-line reason that quotes no value, messages are routed
by type and action, and no key is spelled outside the protocol package."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict

from dicomfl.client import algorithms
from dicomfl.client.algorithms.baseline import LocalBaseline
from dicomfl.client.algorithms.fedstats import FederatedStatistics
from dicomfl.client.algorithms.local_norm import LocalNorm
from dicomfl.client.algorithms.personalize import Personalize
from dicomfl.client.algorithms.plain import Plain
from dicomfl.client.algorithms.scaffold import Scaffold
from dicomfl.client.handler import SiteHandler
from dicomfl.common import protocol as P
from dicomfl.common.config import ModelConfig
from dicomfl.common.errors import BadRequest
from dicomfl.common.fedstats import NUMERIC_NAMES, RANGES, released
from dicomfl.workbench.flower_adapter import task_identity

ROOT = Path(__file__).resolve().parents[1]
MODEL = ModelConfig().model_dump_json()
W = {"conv.weight": np.arange(6, dtype=np.float32).reshape(2, 3), "fc.bias": np.ones(2, dtype=np.float32)}
STD = (tuple((RANGES[f][0] + RANGES[f][1]) / 2 for f in NUMERIC_NAMES),
       tuple((RANGES[f][1] - RANGES[f][0]) / 2 for f in NUMERIC_NAMES))
ROUND = P.RoundConfig(run="r1", server_round=3, num_rounds=5, local_epochs=2, local_steps=7, proximal_mu=0.01, dp=True,
                      target_epsilon=8.0, delta=1e-6, seed=11, lr_scale=0.5, local_norm=True)


@pytest.fixture(autouse=True)
def _identity():
    task_identity()  # Flower's Message needs a task identity to be built outside a Flower process


def _sent(request, message_type=None) -> Message:
    return Message(content=request.to_record(), dst_node_id=1, message_type=message_type or request.MESSAGE_TYPE)


def _reply(reply, message_type="train") -> Message:
    return Message(content=reply.to_record(), reply_to=_sent(P.QueryRequest(model=MODEL), message_type))


def _same_weights(a, b) -> bool:
    return a is None and b is None or (a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a))


# ------------------------------------------------------------------------------- round trips
def test_a_train_request_round_trips():
    control = P.to_record({k: np.zeros_like(v) for k, v in W.items()})
    req = P.TrainRequest(config=ROUND, arrays=W, model=MODEL, standardization=STD, control=control,
                         local_record=P.to_record(W))
    (route, back) = P.request_from_message(_sent(req))
    assert route == (P.TRAIN, P.DEFAULT) and isinstance(back, P.TrainRequest)
    assert back.config == ROUND and back.model == MODEL and back.standardization == STD
    assert _same_weights(back.arrays, W) and _same_weights(P.from_record(back.control), P.from_record(control))
    assert _same_weights(P.weights_of({P.LOCAL_ARRAYS: back.local_record}, P.LOCAL_ARRAYS), W)
    plain = P.request_from_message(_sent(P.TrainRequest(config=P.RoundConfig(), arrays=W, model=MODEL)))[1]
    assert plain.control is None and plain.local_record is None and plain.standardization is None


def test_a_personalize_request_round_trips_and_the_old_form_is_still_taken():
    req = P.PersonalizeRequest(config=ROUND, arrays=W, steps=40, lr_scale=0.25, checks=4, model=MODEL)
    assert req.MESSAGE_TYPE == "train.personalize"
    for kind in (req.MESSAGE_TYPE, "train"):  # "train" + personalize-steps: the previous release's form
        route, back = P.request_from_message(_sent(req, kind))
        assert route == (P.TRAIN, P.PERSONALIZE) and isinstance(back, P.PersonalizeRequest)
        assert (back.config, back.steps, back.lr_scale, back.checks) == (ROUND, 40, 0.25, 4)
        assert _same_weights(back.arrays, W)


def test_an_evaluate_request_round_trips():
    req = P.EvaluateRequest(models={"global": W, "local:site-a": W}, replicates=200, personal=True, run="r1",
                            model=MODEL, standardization=STD)
    route, back = P.request_from_message(_sent(req))
    assert route == (P.EVALUATE, P.DEFAULT)
    assert list(back.models) == ["global", "local:site-a"] and all(_same_weights(w, W) for w in back.models.values())
    assert (back.replicates, back.personal, back.run, back.standardization) == (200, True, "r1", STD)
    # without ``personal`` the run name is not read at all
    assert P.request_from_message(_sent(P.EvaluateRequest(model=MODEL)))[1].run is None


def test_a_query_request_round_trips_and_a_plain_query_is_still_taken():
    req = P.QueryRequest(config=ROUND, model=MODEL)
    assert req.MESSAGE_TYPE == "query.fedstats"
    for kind in (req.MESSAGE_TYPE, "query"):
        route, back = P.request_from_message(_sent(req, kind))
        assert route == (P.QUERY, P.FEDSTATS) and back.config == ROUND


def test_replies_round_trip_and_keep_only_whitelisted_numbers():
    metrics = {P.NUM_EXAMPLES: 10.0, P.TRAIN_LOSS: 0.5, P.VAL_AUROC: 0.7, "patient-name": 1.0, P.STEPS: "x"}
    train = P.TrainReply(site="site-a", metrics=metrics, arrays=W, control_delta=W, local_arrays=W,
                         local_metrics={P.STEPS: 3.0})
    back = P.TrainReply.from_message(_reply(train))
    assert back.site == "site-a" and back.metrics == {P.NUM_EXAMPLES: 10.0, P.TRAIN_LOSS: 0.5, P.VAL_AUROC: 0.7}
    assert all(_same_weights(w, W) for w in (back.arrays, back.control_delta, back.local_arrays))
    assert back.local_metrics == {P.STEPS: 3.0}
    declined = P.TrainReply.from_message(_reply(P.TrainReply(site="s", metrics={P.DECLINED: 1.0})))
    assert declined.arrays is None and declined.control_delta is None and declined.local_metrics is None
    assert list(_reply(train).content.keys()) == [P.SITE, P.ARRAYS, P.CONTROL_DELTA, P.METRICS, P.LOCAL_ARRAYS,
                                                  P.LOCAL_METRICS]

    pers = P.PersonalizeReply.from_message(_reply(P.PersonalizeReply(site="s", metrics={P.STEPS: 4.0}, arrays=W)))
    assert pers.metrics == {P.STEPS: 4.0} and _same_weights(pers.arrays, W)
    kept = P.PersonalizeReply.from_message(_reply(P.PersonalizeReply(site="s", metrics={})))
    assert kept.arrays is None

    ev = P.EvaluateReply(site="s", metrics={"global": {P.AUROC: 0.8, P.AUROC_REPLICATES: [0.7, 0.9], "x": 1.0},
                                            P.OWN_PERSONAL: {P.LOSS: 0.3}})
    back = P.EvaluateReply.from_message(_reply(ev, "evaluate"))
    assert back.metrics == {"global": {P.AUROC: 0.8, P.AUROC_REPLICATES: [0.7, 0.9]}, P.OWN_PERSONAL: {P.LOSS: 0.3}}

    features = released(())
    stats = {P.NUM_EXAMPLES: 5.0, f"count.{features[0]}": 3.0, "count.not-a-feature": 1.0}
    q = P.QueryReply.from_message(_reply(P.QueryReply(site="s", stats=stats, features=features), "query.fedstats"))
    assert q.stats == {P.NUM_EXAMPLES: 5.0, f"count.{features[0]}": 3.0}


# ------------------------------------------------------------------------------------ bounds
HOSTILE = 987654321.123  # a value no bound admits, recognizable if a reason quoted it


def _config_message(kind: str, **cfg) -> Message:
    content = RecordDict({P.ARRAYS: P.to_record(W), P.MODEL_PREFIX + "global": P.to_record(W),
                          P.CONFIG: ConfigRecord({P.MODEL: MODEL, **cfg})})
    return Message(content=content, dst_node_id=1, message_type=kind)


def _refused(msg: Message) -> str:
    with pytest.raises(BadRequest) as exc:
        P.request_from_message(msg)
    reason = str(exc.value)
    assert "\n" not in reason and str(HOSTILE) not in reason and "987654321" not in reason and "hostile" not in reason
    return reason


@pytest.mark.parametrize("key", sorted(P.BOUNDS))
def test_every_bound_is_enforced_with_a_reason_that_names_the_key_only(key):
    kind = {P.PERSONALIZE_STEPS: "train.personalize", P.PERSONALIZE_LR_SCALE: "train.personalize",
            P.PERSONALIZE_CHECKS: "train.personalize", P.REPLICATES_REQUEST: "evaluate"}.get(key, "train")
    b = P.BOUNDS[key]
    # the reasons are fixed templates: the key and the bounds, never the value
    outside = f"config {key}: outside [{b.lo:g}, {b.hi:g}]"
    cases = [(b.hi * 2 + 1, outside), (b.lo - abs(b.lo) - 1, outside),
             (float("nan"), f"config {key}: not a finite number"),
             ("hostile text", f"config {key}: not a finite number"), (True, f"config {key}: not a finite number"),
             ([1.0], f"config {key}: not a finite number")]
    if b.kind == "int":
        cases.append((max(b.lo, 0) + 0.5, f"config {key}: not an integer"))
    templates = {outside, f"config {key}: not a finite number", f"config {key}: not an integer"}
    for value, reason in cases:
        got = _refused(_config_message(kind, **{key: value}))
        # an integer beyond int64 reaches the site as a float: "not an integer" is as good
        assert got == reason or (got in templates and isinstance(value, int) and abs(value) >= 2**63), got
    for value in (b.lo, b.hi):  # the bounds themselves are accepted
        P.request_from_message(_config_message(kind, **{key: value}))


@pytest.mark.parametrize("cfg", [
    {P.DP: 1}, {P.LOCAL_NORM: "yes"}, {P.RUN: "../hostile"}, {P.RUN: "hostile\nname"}, {P.MODEL: 5},
    {P.MODEL: "x" * (P.MAX_MODEL_CHARS + 1)},
    {P.FEATURE_MEAN: [HOSTILE] * len(NUMERIC_NAMES), P.FEATURE_STD: list(STD[1])},
    {P.FEATURE_MEAN: list(STD[0])},
])
def test_flags_names_and_lists_are_checked_too(cfg):
    _refused(_config_message("train", **cfg))


def test_a_message_without_a_config_or_with_a_bad_model_record_is_refused():
    _refused(Message(content=RecordDict({P.ARRAYS: P.to_record(W)}), dst_node_id=1, message_type="train"))
    bad = RecordDict({P.ARRAYS: ConfigRecord({"a": 1}), P.CONFIG: ConfigRecord({P.MODEL: MODEL})})
    _refused(Message(content=bad, dst_node_id=1, message_type="train"))
    nan = {**W, "fc.bias": np.array([np.nan, 1.0], dtype=np.float32)}
    _refused(Message(content=RecordDict({P.ARRAYS: P.to_record(nan), P.CONFIG: ConfigRecord({P.MODEL: MODEL})}),
                     dst_node_id=1, message_type="train"))


# ----------------------------------------------------------------------------------- routing
@pytest.mark.parametrize("kind", ["train.bogus", "evaluate.personalize", "query.default.x", "get_properties",
                                  "evaluate.fedstats", "", 5])
def test_an_unknown_type_or_action_is_refused(kind):
    with pytest.raises(BadRequest) as exc:
        P.route(kind)
    assert "bogus" not in str(exc.value) and "get_properties" not in str(exc.value)


def test_the_handler_answers_an_unknown_action_with_bad_request_and_nothing_else():
    msg = _config_message("train.bogus", **{P.RUN: "r"})
    reply = SiteHandler().handle(msg, Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={}))
    assert not reply.has_content() and reply.error.code == P.ERR_BAD_REQUEST
    assert P.ERROR_REASON_RE.fullmatch(reply.error.reason)


def _algorithm(kind: str, **cfg):
    route, request = P.request_from_message(_config_message(kind, **cfg))
    return algorithms.select(*route, request)


def test_the_registry_picks_the_algorithm_from_type_action_and_request():
    with_control = _config_message("train")
    with_control.content[P.CONTROL] = P.to_record(W)
    route, request = P.request_from_message(with_control)
    picked = algorithms.select(*route, request)
    assert isinstance(picked, LocalBaseline) and isinstance(picked.inner, Scaffold)
    assert isinstance(_algorithm("train", **{P.LOCAL_NORM: True}).inner, LocalNorm)
    assert isinstance(_algorithm("train").inner, Plain)
    assert isinstance(_algorithm("train.personalize"), Personalize)
    assert isinstance(_algorithm("train", **{P.PERSONALIZE_STEPS: 3}), Personalize)  # the previous release's form
    assert isinstance(_algorithm("evaluate"), Plain)
    assert isinstance(_algorithm("query.fedstats"), FederatedStatistics)
    assert isinstance(_algorithm("query"), FederatedStatistics)


def test_the_handler_names_no_method():
    text = (ROOT / "client" / "handler.py").read_text().lower()
    for word in ("scaffold", "personal", "fedstats", "local_norm", "local-norm", "local_arrays", "control"):
        assert word not in text, word


# ------------------------------------------------------------------------ keys spelled once
# Every key of the protocol that only the wire spells that way (a hyphen, a prefix): nowhere in
# client/, common/, server/ or workbench/ outside the protocol package. Plain-word keys ("run", "auroc", "steps", ...)
# are also everyday words of other files (config fields, ledger entries, the metrics module's own
# names), so they are held only in the site's message code (SITE_FILES).
WIRE_KEYS = {k for k in (P.CONFIG_KEYS | P.TRAIN_METRICS | P.EVAL_METRICS | P.STATS_EXTRA | P.RECORD_NAMES)
             if "-" in k} | {P.MODEL_PREFIX, P.EVAL_PREFIX, P.VAL_PREFIX}
ALL_KEYS = P.CONFIG_KEYS | P.TRAIN_METRICS | P.EVAL_METRICS | P.STATS_EXTRA | P.RECORD_NAMES | WIRE_KEYS
SITE_FILES = ["client/handler.py", "client/trainer.py", "client/fedstats.py", "client/personal.py",
              "client/scaffold.py", "client/app.py", *sorted(str(p.relative_to(ROOT))
                                                         for p in (ROOT / "client" / "algorithms").glob("*.py"))]
# (file, literal): why that literal is not the protocol's key
NOT_KEYS = {
    ("client/personal.py", "personal"): "the name of the site's state folder",
    ("common/wire.py", "arrays"): "a record kind in the compact form (ArrayRecord), not the record's name",
    ("common/wire.py", "metrics"): "a record kind in the compact form (MetricRecord)",
    ("common/wire.py", "config"): "a record kind in the compact form (ConfigRecord)",
}


def _literals(path: Path):
    tree = ast.parse(path.read_text())
    docs = {id(n.body[0].value) for n in ast.walk(tree)
            if isinstance(n, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and n.body
            and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    for n in ast.walk(tree):
        if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docs:
            yield n.lineno, n.value


def test_no_key_is_spelled_outside_the_protocol_package():
    found = []
    for layer in ("client", "common", "server", "workbench"):
        for f in sorted((ROOT / layer).rglob("*.py")):
            rel = str(f.relative_to(ROOT))
            if rel.startswith("common/protocol/"):
                continue
            keys = ALL_KEYS if rel in SITE_FILES else WIRE_KEYS
            found += [f"{rel}:{line}: {v!r}" for line, v in _literals(f) if v in keys and (rel, v) not in NOT_KEYS]
    assert found == []


def test_the_literal_check_would_catch_one(tmp_path):
    f = tmp_path / "x.py"
    f.write_text('"""doc mentions num-examples"""\nout = {"num-examples": 1}\n')
    assert [v for _, v in _literals(f) if v in WIRE_KEYS] == [P.NUM_EXAMPLES]


def test_the_model_description_is_json_of_the_model_config():
    assert ModelConfig.model_validate(json.loads(P.TrainRequest(config=ROUND, arrays=W, model=MODEL).model))


@pytest.mark.parametrize("kind", ["train", "train.personalize", "evaluate", "query.fedstats", "query"])
def test_the_clientapp_routes_every_message_type_a_site_takes_to_the_handler(kind):
    from dicomfl.client import app as client_app

    # no site-config in the node config: the handler's own refusal (not Flower's "no function registered")
    ctx = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    reply = client_app.app(_config_message(kind, **{P.RUN: "r"}), ctx)
    assert not reply.has_content() and reply.error.code == P.ERR_CONFIG
