"""A broken or malicious site's reply must never crash or hijack the coordinator's run.

One test per attack class, on real Flower ``Message``/``RecordDict``/``ArrayRecord``/
``MetricRecord`` objects built the way a ClientApp builds its reply
(``Message(content=..., reply_to=instruction)``), the reply validator
(:mod:`dicomfl.server.replies`), the robust-aggregation helpers (:mod:`dicomfl.server.checks`),
Flower's own strategies (:mod:`dicomfl.server.strategies`) and the identity map
(:mod:`dicomfl.server.identity`). Pure CPU, a few seconds.
"""

from __future__ import annotations

import io
import logging

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.proto.node_pb2 import NodeInfo
from flwr.supercore.primitives.asymmetric import public_key_to_bytes

from dicomfl.common import protocol as P
from dicomfl.server.checks import (cap_weight_shares, clip_update, distance, l2_norm, norm_outliers,
                                   norm_violations, screen_updates, update_problem)
from dicomfl.server.identity import SiteIdentities, canonical_public_key
from dicomfl.server.replies import (Rejection, ValidEval, ValidTrain, aggregation_message, check_num_examples,
                                    dedupe_replies, validate_eval_reply, validate_train_reply)
from dicomfl.server.strategies import STRATEGY_NAMES, make_strategy, min_replies

MAX_EX = 1_000_000


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    """``Message(...)`` reads the run/task/node ids a ServerApp process has set; set them here."""
    from flwr.supercore.task_identity import TaskIdentity

    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)


@pytest.fixture(autouse=True)
def quiet_flower():
    logging.getLogger("flwr").setLevel(logging.ERROR)


def ref_model() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"conv.weight": rng.normal(size=(4, 3)).astype(np.float32),
            "fc.bias": rng.normal(size=(2,)).astype(np.float32)}


def instruction(node: int, mtype: str = MessageType.TRAIN) -> Message:
    return Message(RecordDict({P.CONFIG: ConfigRecord({"server-round": 1})}), dst_node_id=node, message_type=mtype)


def record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.asarray(v)) for k, v in arrays.items()})


def train_reply(node: int = 7, arrays: dict | None = None, metrics: dict | None = None,
                records: dict | None = None, drop: tuple[str, ...] = ()) -> Message:
    """A well-formed train reply, with records replaced or added (``records``) or removed (``drop``)."""
    arrays = ref_model() if arrays is None else arrays
    metrics = {"num-examples": 120, "train-loss": 0.4, "declined": 0.0} if metrics is None else metrics
    content = {P.SITE: ConfigRecord({"name": "site-a"}), P.ARRAYS: record(arrays), P.METRICS: MetricRecord(metrics)}
    content.update(records or {})
    return Message(content=RecordDict({k: v for k, v in content.items() if k not in drop}), reply_to=instruction(node))


def check(msg, **kw):
    return validate_train_reply(msg, ref_model(), max_examples=kw.pop("max_examples", MAX_EX), **kw)


def rejected(result, *words) -> str:
    assert isinstance(result, Rejection), result
    assert result.kind == "invalid"
    for w in words:
        assert w in result.reason, result.reason
    return result.reason


# ----------------------------------------------------------------------------- validator
def test_valid_reply_is_cleaned():
    ref = ref_model()
    sent = {k: (v + 0.01).astype(np.float64) for k, v in ref.items()}  # float64 is a real float: accepted
    res = check(train_reply(arrays=sent))
    assert isinstance(res, ValidTrain)
    assert res.node_id == 7 and res.num_examples == 120 and not res.declined and res.claimed_name == "site-a"
    assert list(res.arrays) == list(ref) and all(res.arrays[k].dtype == np.float32 for k in ref)
    np.testing.assert_allclose(res.arrays["fc.bias"], ref["fc.bias"] + 0.01, rtol=1e-6)
    assert res.metrics == {"num-examples": 120.0, "train-loss": 0.4, "declined": 0.0}


def test_missing_num_examples():
    rejected(check(train_reply(metrics={"train-loss": 0.4})), "num-examples")


def test_no_metrics_record():
    rejected(check(train_reply(drop=(P.METRICS,))), "no metrics record")


def test_list_metric():
    rejected(check(train_reply(metrics={"num-examples": 120, "train-loss": [0.4, 0.5]})), "train-loss", "list")
    rejected(check(train_reply(metrics={"num-examples": [120, 1]})), "num-examples", "list")


def test_array_record_under_metrics_and_other_type_confusions():
    rejected(check(train_reply(records={P.METRICS: record(ref_model())})), "metrics", "not a MetricRecord")
    rejected(check(train_reply(records={P.ARRAYS: MetricRecord({"x": 1.0})})), "arrays", "not an ArrayRecord")
    rejected(check(train_reply(records={P.SITE: MetricRecord({"name": 1.0})})), "site", "not a ConfigRecord")
    rejected(check(train_reply(records={P.LOCAL_METRICS: ConfigRecord({"num-examples": 3})})), "local-metrics")


def test_unexpected_records_and_metrics_are_not_echoed():
    why = rejected(check(train_reply(records={"Patient^Name 1970": ConfigRecord({"x": "y"})})), "unexpected record")
    assert "Patient" not in why
    why = rejected(check(train_reply(metrics={"num-examples": 120, "PatientID-12345": 1.0})), "outside the protocol")
    assert "12345" not in why
    rejected(check(train_reply(records={P.SITE: ConfigRecord({"name": "site-a", "note": "x"})})), "only a name")
    rejected(check(train_reply(records={P.SITE: ConfigRecord({"name": "../../etc/passwd"})})), "invalid name")


def test_complex_arrays():
    ref = ref_model()
    rejected(check(train_reply(arrays={k: v.astype(np.complex64) for k, v in ref.items()})), "not a real float")


def test_int_bool_and_extended_arrays():
    ref = ref_model()
    rejected(check(train_reply(arrays={k: v.astype(np.int32) for k, v in ref.items()})), "int32", "not a real float")
    rejected(check(train_reply(arrays={k: v > 0 for k, v in ref.items()})), "not a real float")
    rejected(check(train_reply(arrays={k: v.astype(np.longdouble) for k, v in ref.items()})), "not a real float")


def test_nonfinite_arrays_and_float64_overflow():
    ref = ref_model()
    for bad in (np.nan, np.inf, -np.inf):
        a = dict(ref)
        a["fc.bias"] = np.array([0.0, bad], np.float32)
        rejected(check(train_reply(arrays=a)), "fc.bias", "NaN or infinite")
    a = {k: v.astype(np.float64) for k, v in ref.items()}
    a["fc.bias"][0] = 1e300  # finite in float64, inf once cast to the model's float32
    rejected(check(train_reply(arrays=a)), "NaN or infinite")


@pytest.mark.parametrize("value, words", [
    (float("nan"), "NaN"), (float("inf"), "infinite"), (-float("inf"), "infinite"), (-1e6, "not positive"),
    (0, "not positive"), (1e9, "max_examples"), (2**62, "num-examples"), (12.5, "whole number"),
])
def test_bad_num_examples(value, words):
    rejected(check(train_reply(metrics={"num-examples": value, "train-loss": 0.4})), words)


def test_num_examples_plausible_against_previous():
    assert check(train_reply(metrics={"num-examples": 200}), previous_examples=120).num_examples == 200
    rejected(check(train_reply(metrics={"num-examples": 241}), previous_examples=120), "2x this site's previous")
    assert check(train_reply(metrics={"num-examples": 30}), previous_examples=120).num_examples == 30  # lower: fine
    with pytest.raises(ValueError):
        check_num_examples(True, max_examples=10)


def test_wrong_names_and_shapes():
    ref = ref_model()
    rejected(check(train_reply(arrays={"conv.weight": ref["conv.weight"]})), "parameter names", "fc.bias")
    rejected(check(train_reply(arrays={**ref, "extra": np.zeros(1, np.float32)})), "parameter names", "1 unexpected")
    rejected(check(train_reply(arrays={**ref, "fc.bias": np.zeros(3, np.float32)})), "shape (3,)")
    rejected(check(train_reply(arrays={**ref, "conv.weight": ref["conv.weight"].T.copy()})), "shape (3, 4)")


def test_array_bytes_that_lie():
    """The metadata Flower shows and the .npy bytes are separate: trust neither without the other."""
    ref = ref_model()
    msg = train_reply()
    good = msg.content[P.ARRAYS]["fc.bias"]
    # metadata say (2,) float32 but the bytes hold 3 float64 values
    buf = io.BytesIO()
    np.save(buf, np.zeros(3), allow_pickle=False)
    msg.content[P.ARRAYS]["fc.bias"] = Array(dtype=good.dtype, shape=good.shape, stype=good.stype, data=buf.getvalue())
    rejected(check(msg), "fc.bias", "shape (3,)")
    # a header that claims the right shape over too few bytes (np.load would allocate first)
    msg = train_reply()
    data = msg.content[P.ARRAYS]["conv.weight"].data
    msg.content[P.ARRAYS]["conv.weight"] = Array(dtype="float32", shape=(4, 3), stype="numpy.ndarray", data=data[:-8])
    rejected(check(msg), "conv.weight", "data bytes")
    # garbage, a pickled object array, a torch stype
    for arr in (Array(dtype="float32", shape=(2,), stype="numpy.ndarray", data=b"\x00garbage"),
                Array(dtype="float32", shape=(2,), stype="torch.Tensor", data=good.data)):
        msg = train_reply()
        msg.content[P.ARRAYS]["fc.bias"] = arr
        rejected(check(msg), "fc.bias")
    buf = io.BytesIO()
    np.save(buf, np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    msg = train_reply()
    msg.content[P.ARRAYS]["fc.bias"] = Array(dtype="object", shape=(2,), stype="numpy.ndarray", data=buf.getvalue())
    rejected(check(msg), "fc.bias")
    # metadata that disagree with honest bytes
    msg = train_reply()
    msg.content[P.ARRAYS]["fc.bias"] = Array(dtype="float32", shape=(1, 2), stype="numpy.ndarray", data=good.data)
    rejected(check(msg), "metadata disagree")
    assert isinstance(check(train_reply()), ValidTrain) and ref  # the untouched reply still passes


def test_error_replies_and_unreadable_messages():
    ins = instruction(9)
    res = check(Message(Error(code=P.ERR_NO_DATA, reason="dicomfl:no-training-data:ref=0123456789ab"), reply_to=ins))
    assert isinstance(res, Rejection) and res.kind == "error" and res.reason.endswith("ref=0123456789ab")
    # free text (a stack trace could hold PHI) is replaced by the code's name
    res = check(Message(Error(code=P.ERR_INTERNAL, reason="Traceback: file /data/Doe^John/1.dcm"), reply_to=ins))
    assert res.kind == "error" and res.reason == "internal-error"
    # the protocol's pattern allows any [a-z-]+ as the code name: only known names pass
    res = check(Message(Error(code=P.ERR_INTERNAL, reason="dicomfl:jane-doe-mrn-four:ref=0123456789ab"), reply_to=ins))
    assert res.reason == "internal-error"
    res = check(Message(Error(code=3, reason="x"), reply_to=ins))
    assert res.reason == "flower-error-3"

    class Exploding(Message):
        @property
        def content(self):
            raise RuntimeError("boom")

    boom = Exploding(content=RecordDict(), reply_to=ins)
    res = check(boom)
    assert isinstance(res, Rejection) and res.node_id == 9 and "RuntimeError" in res.reason
    for junk in (None, 42, object()):
        res = check(junk)
        assert isinstance(res, Rejection) and res.node_id is None
    empty = Message(content=RecordDict(), reply_to=ins)
    rejected(check(empty), "no metrics record")


JUNK = [None, "120", b"\x00", [1.0], {"a": 1}, 1 + 2j, object(), np.float32("nan"), np.int64(5), True, 10**40,
        -0.0, float("nan"), Array(np.zeros(2, np.float32)), MetricRecord({"x": 1.0}), ArrayRecord()]


def test_fuzzed_replies_never_raise():
    """Junk put straight into the records' storage (past Flower's own type checks, as a buggy
    in-process grid could): every outcome is a ValidTrain or a Rejection, never an exception."""
    rng = np.random.default_rng(3)
    keys = [P.ARRAYS, P.METRICS, P.SITE, P.LOCAL_ARRAYS, P.LOCAL_METRICS, "num-examples", 5, None]
    for _ in range(400):
        msg = train_reply()
        content = msg.content
        for _ in range(int(rng.integers(1, 4))):
            junk = JUNK[int(rng.integers(len(JUNK)))]
            where = int(rng.integers(4))
            if where == 0:
                content._data[keys[int(rng.integers(len(keys)))]] = junk
            elif where == 1 and isinstance(content.get(P.METRICS), MetricRecord):
                content[P.METRICS]._data[["num-examples", "train-loss", "declined"][int(rng.integers(3))]] = junk
            elif where == 2 and isinstance(content.get(P.ARRAYS), ArrayRecord):
                content[P.ARRAYS]._data["fc.bias"] = junk
            elif isinstance(content.get(P.ARRAYS), ArrayRecord) and isinstance(content[P.ARRAYS].get("fc.bias"), Array):
                arr = content[P.ARRAYS]["fc.bias"]
                arr.__dict__[["dtype", "shape", "stype", "data"][int(rng.integers(4))]] = junk
        res = check(msg)
        assert isinstance(res, (ValidTrain, Rejection))
        assert isinstance(validate_eval_reply(msg, ["global"]), (ValidEval, Rejection))


def test_declined_reply():
    res = check(train_reply(drop=(P.ARRAYS,), metrics={"num-examples": 120, "declined": 1.0,
                                                         "epsilon-if-trained": 9.1, "target-epsilon": float("nan")}))
    assert isinstance(res, ValidTrain) and res.declined and res.arrays is None
    rejected(check(train_reply(metrics={"num-examples": 120, "declined": 1.0})), "declined", "sent arrays")
    rejected(check(train_reply(drop=(P.ARRAYS,))), "no arrays record")  # not declined, no update
    rejected(check(train_reply(metrics={"num-examples": 120, "declined": 0.5})), "declined")


def test_metric_values():
    ok = check(train_reply(metrics={"num-examples": 120, "train-loss": 0.4, "val-auroc": float("nan")}))
    assert isinstance(ok, ValidTrain)  # NaN = "not available" for an informational metric
    rejected(check(train_reply(metrics={"num-examples": 120, "train-loss": float("nan")})), "train-loss", "NaN")
    rejected(check(train_reply(metrics={"num-examples": 120, "val-auroc": float("inf")})), "val-auroc", "infinite")
    rejected(check(train_reply(metrics={"num-examples": 120, "epsilon": 1e300})), "epsilon", "out of range")


def test_local_baseline_records():
    ref = ref_model()
    res = check(train_reply(records={P.LOCAL_ARRAYS: record({k: v * 2 for k, v in ref.items()}),
                               P.LOCAL_METRICS: MetricRecord({"train-loss": 0.3, "num-examples": 120})}))
    assert isinstance(res, ValidTrain) and res.local_metrics["train-loss"] == 0.3
    np.testing.assert_allclose(res.local_arrays["fc.bias"], ref["fc.bias"] * 2)
    rejected(check(train_reply(records={P.LOCAL_ARRAYS: record({k: v.astype(np.complex128) for k, v in ref.items()})})),
             "not a real float")
    rejected(check(train_reply(records={P.LOCAL_METRICS: MetricRecord({"train-loss": [1.0]})})), "list")
    rejected(check(train_reply(records={P.LOCAL_ARRAYS: MetricRecord({"x": 1.0})})), "local-arrays",
             "not an ArrayRecord")


def test_eval_reply():
    ins = instruction(5, MessageType.EVALUATE)
    good = {"auroc": 0.8, "num-examples": 40, "n": 40, "ece": float("nan")}
    msg = Message(content=RecordDict({P.SITE: ConfigRecord({"name": "site-b"}), "metrics.global": MetricRecord(good)}),
                  reply_to=ins)
    res = validate_eval_reply(msg, ["global", "local:site-a"])
    assert isinstance(res, ValidEval) and res.metrics["global"]["auroc"] == 0.8 and res.missing == ["local:site-a"]
    assert res.claimed_name == "site-b"
    bad = [
        {"metrics.unknown-model": MetricRecord(good)},
        {"metrics.global": MetricRecord({"auroc": [0.8, 0.9]})},
        {"metrics.global": record(ref_model())},
        {"metrics.global": MetricRecord({"PatientName": 1.0})},
        {"metrics.global": MetricRecord({"num-examples": -3})},
        {"metrics.global": MetricRecord({"auroc": float("inf")})},
    ]
    for content in bad:
        res = validate_eval_reply(Message(content=RecordDict(content), reply_to=ins), ["global"])
        assert isinstance(res, Rejection) and res.kind == "invalid"
    err = validate_eval_reply(Message(Error(code=P.ERR_CONFIG, reason=None), reply_to=ins), ["global"])
    assert err.kind == "error" and err.reason == "site-config-error"


def test_eval_reply_replicates_are_bounded_and_checked():
    """Replicate AUROCs: accepted only when asked for, as a list of at most that many numbers in
    [0, 1] with their split id; anything else is refused with a one-line reason naming the key."""
    ins = instruction(5, MessageType.EVALUATE)

    def reply(**extra):
        m = {"auroc": 0.8, "num-examples": 40, "n": 40, **extra}
        return Message(content=RecordDict({"metrics.global": MetricRecord(m)}), reply_to=ins)

    reps = [0.7, 0.75, 0.8, 0.9]
    ok = validate_eval_reply(reply(**{P.AUROC_REPLICATES: reps, P.AUROC_REPLICATES_ID: 12345.0}), ["global"],
                             max_replicates=4)
    assert isinstance(ok, ValidEval) and ok.metrics["global"][P.AUROC_REPLICATES] == reps
    assert ok.metrics["global"][P.AUROC_REPLICATES_ID] == 12345.0
    sid = {P.AUROC_REPLICATES_ID: 1.0}
    cases = [
        ({P.AUROC_REPLICATES: reps, **sid}, 0, "auroc-boot was not asked for"),
        ({P.AUROC_REPLICATES: [0.5] * 5, **sid}, 4, "auroc-boot has 5 values, expected 1 to 4"),
        ({P.AUROC_REPLICATES: [0.5] * (P.MAX_REPLICATES + 1), **sid}, P.MAX_REPLICATES, "auroc-boot has 5001 values"),
        ({P.AUROC_REPLICATES: [0.5, float("nan")], **sid}, 4, "auroc-boot holds NaN"),
        ({P.AUROC_REPLICATES: [0.5, float("inf")], **sid}, 4, "auroc-boot holds NaN or infinite"),
        ({P.AUROC_REPLICATES: [0.5, 1.5], **sid}, 4, "auroc-boot holds values outside [0, 1]"),
        ({P.AUROC_REPLICATES: [-0.1], **sid}, 4, "auroc-boot holds values outside [0, 1]"),
        ({P.AUROC_REPLICATES: [], **sid}, 4, "auroc-boot has 0 values"),
        ({P.AUROC_REPLICATES: 0.5, **sid}, 4, "auroc-boot is not a list"),
        ({P.AUROC_REPLICATES: reps}, 4, "come only together"),
        ({P.AUROC_REPLICATES_ID: 3.0}, 4, "come only together"),
        ({P.AUROC_REPLICATES: reps, P.AUROC_REPLICATES_ID: 2.0 ** 37}, 4, "auroc-boot-id is not a split id"),
        ({P.AUROC_REPLICATES: reps, P.AUROC_REPLICATES_ID: 1.5}, 4, "auroc-boot-id is not a split id"),
        ({P.AUROC_REPLICATES: reps, P.AUROC_REPLICATES_ID: float("nan")}, 4, "auroc-boot-id"),
        ({"auroc_lo": [0.1, 0.2]}, 4, "auroc_lo is a list"),  # no other metric may be a list
    ]
    for extra, asked, why in cases:
        res = validate_eval_reply(reply(**extra), ["global"], max_replicates=asked)
        reason = rejected(res, why)
        assert "\n" not in reason and len(reason) < 120


def test_duplicate_replies_count_once():
    first, second, other = train_reply(node=3), train_reply(node=3, metrics={"num-examples": 5}), train_reply(node=4)
    d = dedupe_replies([first, second, other, train_reply(node=3)])
    assert d.replies == [first, other] and d.duplicates == {3: 2}
    # by identity: two nodes that authenticate as one site count once
    names = {3: "site-a", 4: "site-a"}
    d = dedupe_replies([first, other], key=lambda m: names[m.metadata.src_node_id])
    assert d.replies == [first] and d.duplicates == {"site-a": 1}
    d = dedupe_replies([first, None])
    assert d.replies == [first] and d.duplicates == {None: 1}


# ----------------------------------------------------------------------------- norm checks
def aggregate_replies(name: str, replies: list[Message], **kw) -> dict[str, np.ndarray]:
    """Validate each reply, then aggregate the clean messages with the named Flower strategy."""
    clean = [aggregation_message(check(m)) for m in replies]
    arrays, _ = make_strategy(name, min_sites=1, **kw).aggregate_train(1, clean)
    return P.from_record(arrays)


def _shift(ref, delta):
    return {k: (v + delta).astype(v.dtype) for k, v in ref.items()}


def test_update_problem_back_compat():
    ref = {"w": np.zeros((2, 2), np.float32)}
    assert update_problem({"w": np.ones((2, 2), np.float32)}, ref) is None
    assert "names" in update_problem({}, ref)
    assert "shape" in update_problem({"w": np.zeros(3, np.float32)}, ref)
    assert "NaN" in update_problem({"w": np.full((2, 2), np.nan, np.float32)}, ref)
    assert "real float" in update_problem({"w": np.ones((2, 2), np.complex64)}, ref)
    assert "real float" in update_problem({"w": np.ones((2, 2), np.int64)}, ref)
    assert list(norm_outliers({"a": 1.0, "b": 1.2, "c": 0.9, "d": 50.0}, 10.0)) == ["d"]
    assert norm_outliers({"a": 1.0, "d": 50.0}, 10.0) == {}


def test_scaled_update_with_two_sites_is_caught_by_the_absolute_bound():
    ref = ref_model()
    honest, attack = _shift(ref, 0.01), _shift(ref, 1e4)
    d = {"a": distance(honest, ref), "b": distance(attack, ref)}
    assert norm_outliers(d, 10.0) == {}  # the old rule sees nothing with two sites
    out = norm_violations(d, l2_norm(ref), max_update_norm_rel=1.0)
    assert list(out) == ["b"] and "exceeds the bound" in out["b"]
    # one update alone is checked too
    assert list(norm_violations({"b": d["b"]}, l2_norm(ref), max_update_norm_rel=1.0)) == ["b"]


def test_scaled_update_with_three_sites():
    ref = ref_model()
    rng = np.random.default_rng(1)
    step = {k: rng.normal(scale=0.02, size=v.shape).astype(np.float32) for k, v in ref.items()}
    ups = {s: {k: ref[k] + step[k] * f for k in ref} for s, f in (("a", 1.0), ("b", 1.1), ("c", 9.5))}
    d = {s: distance(a, ref) for s, a in ups.items()}
    assert norm_outliers(d, 10.0) == {}  # 9.5x slips under the 10x median rule
    assert list(norm_outliers(d, 3.0)) == ["c"]  # a tighter ratio catches it
    # clipping bounds its effect whatever the ratio: the aggregate moves at most the clip norm
    clip = float(np.median(list(d.values())))
    sc = screen_updates(ups, {"a": 100, "b": 100, "c": 100}, ref, clip_update_norm=clip)
    assert set(sc.clipped) == {"c"} and sc.clipped["c"] == pytest.approx(clip / d["c"])
    assert distance(sc.arrays["c"], ref) == pytest.approx(clip, rel=1e-4)
    mean = {k: np.mean([sc.arrays[s][k] for s in ups], axis=0) for k in ref}
    assert distance(mean, ref) <= clip * (1 + 1e-6)
    unclipped = {k: np.mean([ups[s][k] for s in ups], axis=0) for k in ref}
    assert distance(unclipped, ref) > 3 * distance(mean, ref)


def test_clip_update():
    ref = ref_model()
    far = _shift(ref, 10.0)
    out, scale = clip_update(far, ref, 1.0)
    assert distance(out, ref) == pytest.approx(1.0, rel=1e-5) and scale < 1
    assert all(out[k].dtype == ref[k].dtype for k in ref)
    near = _shift(ref, 1e-3)
    out, scale = clip_update(near, ref, 1.0)
    assert scale == 1.0 and all(np.array_equal(out[k], near[k]) for k in ref)
    with pytest.raises(ValueError):
        clip_update(near, ref, 0.0)


def test_max_weight_share_caps_a_huge_claim():
    w = cap_weight_shares({"a": 100, "b": 120, "c": 1e9}, 0.5)
    assert w["a"] == 100 and w["b"] == 120 and w["c"] == pytest.approx(220)
    assert w["c"] / sum(w.values()) == pytest.approx(0.5)
    # several capped at once: one pass of "clip at share x total" would leave them above the bound
    w = cap_weight_shares({"a": 1, "b": 1e9, "c": 1e9, "d": 1}, 0.3)
    assert max(v / sum(w.values()) for v in w.values()) <= 0.3 + 1e-12
    assert w["a"] == w["d"] == 1 and w["b"] == w["c"]
    # infeasible (2 sites, 0.4 each): equal weights, the best possible
    assert cap_weight_shares({"a": 5, "b": 1e9}, 0.4) == {"a": 5, "b": 5}
    assert cap_weight_shares({"a": 5}, 0.5) == {"a": 5}  # one site: nothing to share
    assert cap_weight_shares({"a": 5, "b": 7}, 1.0) == {"a": 5, "b": 7}
    rng = np.random.default_rng(0)
    for _ in range(500):
        n, share = int(rng.integers(2, 9)), float(rng.uniform(0.05, 0.95))
        raw = {str(i): float(x) for i, x in enumerate(rng.lognormal(0, 4, size=n))}
        got = cap_weight_shares(raw, share)
        tot = sum(got.values())
        assert all(got[s] <= raw[s] * (1 + 1e-12) for s in raw)
        if n * share > 1:
            assert max(got.values()) / tot <= share * (1 + 1e-9)


def test_weight_hijack_end_to_end_with_fedavg():
    """A 1e9 num-examples claim: rejected by max_examples; under it, capped to half the weight."""
    ref = ref_model()
    honest = [train_reply(node=1, arrays=_shift(ref, 0.01)), train_reply(node=2, arrays=_shift(ref, 0.012))]
    bad = train_reply(node=3, arrays=_shift(ref, 0.5), metrics={"num-examples": 1e9, "train-loss": 0.1})
    assert isinstance(check(bad), Rejection)
    bad = train_reply(node=3, arrays=_shift(ref, 0.5), metrics={"num-examples": 900_000, "train-loss": 0.1})
    valid = {v.node_id: v for v in (check(m) for m in honest + [bad])}
    sc = screen_updates({n: v.arrays for n, v in valid.items()}, {n: v.num_examples for n, v in valid.items()}, ref,
                        max_weight_share=0.5)
    assert sc.capped == {3: 900_000.0}
    agg, _ = make_strategy("fedavg", min_sites=1).aggregate_train(
        1, [aggregation_message(valid[n], sc.arrays[n], sc.weights[n]) for n in sc.arrays])
    # uncapped, site 3 would have ~100% of the weight: the global model would move ~0.5
    assert float(np.mean(P.from_record(agg)["fc.bias"] - ref["fc.bias"])) == pytest.approx(0.5 * 0.011 + 0.5 * 0.5, abs=1e-3)


def test_two_colluding_sites_of_three():
    """Two of three sites send +1e4. A majority beats any median; the absolute bound does not care."""
    ref = ref_model()
    ups = {"a": _shift(ref, 0.01), "b": _shift(ref, 1e4), "c": _shift(ref, 1e4)}
    d = {s: distance(a, ref) for s, a in ups.items()}
    assert norm_outliers(d, 10.0) == {}  # the median is the attackers'
    replies = [train_reply(node=i + 1, arrays=a) for i, a in enumerate(ups.values())]
    for name in ("fedmedian", "krum"):
        assert distance(aggregate_replies(name, replies), ref) > 1e3  # the robust rules alone lose here
    sc = screen_updates(ups, {s: 100 for s in ups}, ref, max_update_norm_rel=1.0, max_update_norm_ratio=10.0)
    assert set(sc.rejected) == {"b", "c"} and list(sc.arrays) == ["a"]
    for name in ("fedmedian", "krum", "fedavg"):
        valid = check(replies[0])
        agg, _ = make_strategy(name, min_sites=1).aggregate_train(1, [aggregation_message(valid, sc.arrays["a"])])
        assert distance(P.from_record(agg), ups["a"]) < 1e-5


def test_two_colluding_sites_of_five_under_robust_strategies():
    ref = ref_model()
    rng = np.random.default_rng(2)
    honest = [_shift(ref, 0.01 + 0.002 * rng.normal()) for _ in range(3)]
    attack = [_shift(ref, 1e4), _shift(ref, 1e4)]  # identical: Krum's nearest neighbour is the other attacker
    replies = [train_reply(node=i + 1, arrays=a) for i, a in enumerate(honest + attack)]
    honest_mean = {k: np.mean([h[k] for h in honest], axis=0) for k in ref}
    for name, kw in (("fedmedian", {}), ("krum", {"num_malicious_nodes": 1}), ("fedtrimmedavg", {"beta": 0.4}),
                     ("multikrum", {"num_malicious_nodes": 1, "num_nodes_to_select": 3})):
        assert distance(aggregate_replies(name, replies, **kw), honest_mean) < 0.05, name
    # Krum's guarantee needs n >= 2f + 3. With f = 2 of 5 it scores each update by its n-f-2 = 1
    # nearest neighbour, and two identical attackers are each other's: Krum picks an attacker.
    for name, kw in (("krum", {"num_malicious_nodes": 2}), ("fedavg", {})):
        assert distance(aggregate_replies(name, replies, **kw), honest_mean) > 1e3, name


# ----------------------------------------------------------------------------- strategies
def _vals(values, weights=None):
    weights = weights or [10] * len(values)
    return [Message(content=RecordDict({P.ARRAYS: ArrayRecord({"w": Array(np.full(3, v, np.float32))}),
                                        P.METRICS: MetricRecord({"num-examples": float(w), "train-loss": 0.5})}),
                    reply_to=instruction(i + 1)) for i, (v, w) in enumerate(zip(values, weights))]


class _Grid:
    def __init__(self, n):
        self.n = n

    def get_node_ids(self):
        return list(range(1, self.n + 1))


def _aggregate(name, values, **kw):
    s = make_strategy(name, min_sites=1, **kw)
    list(s.configure_train(1, ArrayRecord({"w": Array(np.zeros(3, np.float32))}), ConfigRecord({}), _Grid(len(values))))
    arrays, metrics = s.aggregate_train(1, _vals(values))
    return None if arrays is None else float(arrays["w"].numpy()[0])


def test_every_strategy_aggregates_replies():
    assert _aggregate("fedmedian", [1.0, 1.1, 1e4]) == pytest.approx(1.1)
    assert _aggregate("krum", [1.0, 1.1, 1e4]) in (pytest.approx(1.0), pytest.approx(1.1))
    assert _aggregate("multikrum", [1.0, 1.1, 1e4], num_nodes_to_select=2) == pytest.approx(1.05)
    assert _aggregate("fedtrimmedavg", [1.0, 1.1, 1e4], beta=0.34) == pytest.approx(1.1)
    assert _aggregate("fedtrimmedavg", [1.0, 1.1, 1e4]) > 1e3  # default beta 0.2 cuts nothing out of 3
    seven = [1.0, 1.1, 0.9, 1.05, 0.95, 1e4, 1e4]
    assert _aggregate("bulyan", seven, num_malicious_nodes=1) == pytest.approx(1.0, abs=0.1)
    assert _aggregate("fedavg", [1.0, 3.0]) == pytest.approx(2.0)
    assert _aggregate("fedavgm", [1.0, 3.0]) == pytest.approx(2.0)  # server_lr 1, no momentum: FedAvg
    for name in ("fedadam", "fedyogi", "fedadagrad"):
        got = _aggregate(name, [1.0, 1e4])
        assert 0 < got <= 0.2  # the server optimizer moves each coordinate by about eta, whatever the update
    # with two sites
    assert _aggregate("fedmedian", [1.0, 1e4]) == pytest.approx(5000.5)  # the median of two is the mean
    assert _aggregate("bulyan", [1.0, 2.0]) is None and min_replies("bulyan") == 3  # skips the round
    assert min_replies("bulyan", 1) == 7
    for name in STRATEGY_NAMES:
        assert _aggregate(name, [1.0, 1.1, 0.9, 1.0, 1.05, 0.95, 1.0]) is not None, name


def test_make_strategy_rejects_bad_parameters():
    with pytest.raises(ValueError, match="unknown strategy"):
        make_strategy("feddyn")
    assert make_strategy("scaffold").eta_g == 1.0 and make_strategy("scaffold", server_lr=0.5).eta_g == 0.5
    with pytest.raises(ValueError, match="does not take"):
        make_strategy("fedmedian", num_malicious_nodes=1)
    with pytest.raises(ValueError, match="beta"):
        make_strategy("fedtrimmedavg", beta=0.5)
    s = make_strategy("FedAdam", server_lr=0.05, fraction_train=0.5, min_sites=3)
    assert s.eta == 0.05 and s.fraction_train == 0.5 and s.min_train_nodes == 3 and s.fraction_evaluate == 0.0
    assert make_strategy("fedavgm").server_learning_rate == 1.0
    assert make_strategy("fedprox", proximal_mu=0.1).proximal_mu == 0.1


# ----------------------------------------------------------------------------- identity
def _nodeinfo(node_id: int, pub_path) -> NodeInfo:
    """What HttpGrid.get_nodes() returns: the key as Flower stores it (PEM SubjectPublicKeyInfo)."""
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_ssh_public_key(pub_path.read_bytes())
    return NodeInfo(node_id=node_id, public_key=public_key_to_bytes(key), status="online")


def test_identity_from_real_pki_keys(tmp_path):
    from dicomfl.server.pki import make_all

    pki = make_all(tmp_path / "pki", ["site-a", "site-b"])
    stranger = ec.generate_private_key(ec.SECP384R1()).public_key()  # a node with its own, unregistered key
    ids = SiteIdentities.from_pki(tmp_path / "pki")
    assert ids.authenticated and sorted(ids.keys.values()) == ["site-a", "site-b"]
    assert canonical_public_key(pki.site_pub("site-a").read_bytes()) == canonical_public_key(
        _nodeinfo(1, pki.site_pub("site-a")).public_key)

    class Grid:
        def get_nodes(self):
            return [_nodeinfo(11, pki.site_pub("site-a")), _nodeinfo(12, pki.site_pub("site-b")),
                    NodeInfo(node_id=13, public_key=public_key_to_bytes(stranger)),
                    NodeInfo(node_id=14)]

    ids.refresh(Grid())
    assert [ids.name_for(n) for n in (11, 12, 13, 14, 99)] == ["site-a", "site-b", "node-13", "node-14", "node-99"]
    assert ids.unknown == {13: "public key not in the PKI", 14: "no public key reported"}
    # node 12 (site-b's key) claims to be site-a: the claim is a label, never the identity
    reply = check(train_reply(node=12))
    assert reply.claimed_name == "site-a"
    ids.note_claim(reply.node_id, reply.claimed_name)
    assert ids.name_for(12) == "site-b" and ids.label(12) == "site-b (claims site-a)"
    assert ids.describe()["mismatched_claims"] == {"12": "site-a"} and ids.describe()["authenticated"] is True

    class Broken:
        def get_nodes(self):
            raise RuntimeError("superlink down")

    ids.refresh(Broken())  # keeps what it knew
    assert ids.name_for(11) == "site-a"
    ids.refresh(object())  # an in-process grid without get_nodes
    assert ids.name_for(11) == "site-a"


def test_identity_pki_errors(tmp_path):
    from dicomfl.server.pki import make_all

    with pytest.raises(ValueError, match="no site public keys"):
        SiteIdentities.from_pki(tmp_path)
    pki = make_all(tmp_path / "pki", ["site-a"])
    (tmp_path / "pki" / "sites" / "site-copy.pub").write_bytes(pki.site_pub("site-a").read_bytes())
    with pytest.raises(ValueError, match="same key"):
        SiteIdentities.from_pki(tmp_path / "pki" / "sites")
    (tmp_path / "pki" / "sites" / "site-copy.pub").write_text("not a key")
    with pytest.raises(ValueError, match="not a public key"):
        SiteIdentities.from_pki(tmp_path / "pki")


def test_identity_insecure_and_trusted():
    ids = SiteIdentities.insecure()
    ids.refresh(object())
    ids.note_claim(5, "site-a")
    assert ids.name_for(5) == "node-5" and ids.label(5) == "node-5 (claims site-a)"
    desc = ids.describe()
    assert desc["authenticated"] is False and "NOT authenticated" in desc["note"]
    ids = SiteIdentities.trusted({1000: "site-a"})
    assert ids.authenticated and ids.name_for(1000) == "site-a" and ids.name_for(1001) == "node-1001"


# ----------------------------------------------------------------------------- flat records
def flat_record(arrays: dict[str, np.ndarray], key: str | None = None, extra: int = 0) -> ArrayRecord:
    flat = np.concatenate([np.asarray(v, np.float32).ravel() for v in arrays.values()] + [np.zeros(extra, np.float32)])
    return ArrayRecord({key or P.layout_key(arrays): Array(flat)})


def test_a_flat_reply_is_read_back_into_the_models_tensors():
    ref = ref_model()
    sent = {k: v + 0.5 for k, v in ref.items()}
    res = check(train_reply(records={P.ARRAYS: flat_record(sent)}))
    assert isinstance(res, ValidTrain) and list(res.arrays) == list(ref)
    assert all(res.arrays[k].shape == ref[k].shape and np.allclose(res.arrays[k], sent[k]) for k in ref)
    assert P.to_record_keys(ref) == [P.layout_key(ref)]


@pytest.mark.parametrize("case", ["other-layout", "extra-values", "nan", "malformed-key"])
def test_a_hostile_flat_reply_is_rejected(case):
    ref = ref_model()
    rec = {"other-layout": lambda: flat_record({"conv.weight": np.zeros((3, 4)), "fc.bias": np.zeros(2)}),
           "extra-values": lambda: ArrayRecord({P.layout_key(ref): Array(np.zeros(15, np.float32))}),
           "nan": lambda: flat_record({k: np.full_like(v, np.nan) for k, v in ref.items()}),
           "malformed-key": lambda: flat_record(ref, key=P.FLAT_PREFIX + "x" * 5000)}[case]()
    why = rejected(check(train_reply(records={P.ARRAYS: rec})))
    assert "x" * 50 not in why  # the key is not echoed
