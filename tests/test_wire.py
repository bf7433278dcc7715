"""The compact wire form (common/wire.py): exact round trips, few Flower objects, hostile forms
refused with a reason that quotes nothing, and a whole federation through it (coordinator packs,
the real site handler answers in it, the coordinator reads it) equal to the plain in-process run."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

from dicomfl.client.handler import SiteHandler
from dicomfl.common import protocol as P
from dicomfl.common import wire as W
from dicomfl.common.config import load_run_config
from dicomfl.server.federation import Federation
from dicomfl.server.replies import Rejection, validate_train_reply
from dicomfl.workbench.flower_adapter import stamp_message_id, task_identity
from dicomfl.workbench.inprocess import InProcessGrid

from .test_federation import MODEL, SITES, _audit_reply, _header_strings, write_run

SECRET = "DOE^JOHNATHAN"  # stands for a header value: no error may quote it


def _weights(seed: int = 0, n: int = 5000) -> dict:
    rng = np.random.default_rng(seed)
    return {"conv.weight": rng.standard_normal((8, 1, 3, 3)).astype(np.float32),
            "head.bias": rng.standard_normal(2).astype(np.float32),
            "fc.weight": rng.standard_normal(n).astype(np.float32)}


def _reply_content(seed: int = 0, n: int = 5000) -> RecordDict:
    """A train reply's records: global and local models, their metrics, the site's name."""
    return RecordDict({
        P.SITE: ConfigRecord({"name": "site-a"}),
        P.ARRAYS: P.to_record(_weights(seed, n)),
        P.METRICS: MetricRecord({"num-examples": 40.0, "train-loss": 0.69, "val-auroc": float("nan")}),
        P.LOCAL_ARRAYS: P.to_record(_weights(seed + 1, n)),
        P.LOCAL_METRICS: MetricRecord({"num-examples": 40, "train-loss": 0.7}),
    })


def _same(a: RecordDict, b: RecordDict, ignore: frozenset = frozenset()) -> None:
    assert list(a.keys()) == list(b.keys())
    for name in a.keys():
        x, y = a[name], b[name]
        assert type(x) is type(y), name
        if isinstance(x, ArrayRecord):
            assert list(x.keys()) == list(y.keys())
            for k in x.keys():
                u, v = x[k].numpy(), y[k].numpy()
                assert u.dtype == v.dtype and u.shape == v.shape and u.tobytes() == v.tobytes()
        else:
            assert list(x.keys()) == list(y.keys())
            for k in set(x.keys()) - ignore:
                u, v = x[k], y[k]
                assert type(u) is type(v) and (u == v or (u != u and v != v)), (name, k)


def _objects(content: RecordDict) -> dict:
    task_identity()
    return get_all_nested_objects(Message(content=content, dst_node_id=1, message_type="train"))


# ----------------------------------------------------------------------------- round trips
def test_a_reply_comes_back_exactly_in_three_objects_instead_of_eleven():
    content = _reply_content()
    packed = W.pack(content)
    assert W.is_packed(packed) and not W.is_packed(content)
    assert len(_objects(content)) == 11 and len(_objects(packed)) == 3
    _same(W.unpack(packed), content)
    assert W.unpack(packed)[P.METRICS]["num-examples"] == 40.0 and W.unpack(packed)[P.LOCAL_METRICS]["num-examples"] == 40


def test_every_value_type_and_dtype_survives():
    arrays = ArrayRecord({"f8": Array(np.arange(6, dtype=np.float64).reshape(2, 3)), "i8": Array(np.array([-1, 2**40])),
                          "b": Array(np.array([True, False])), "u1": Array(np.zeros((0, 4), np.uint8)),
                          "scalar": Array(np.array(3.5, np.float32))})
    config = ConfigRecord({"s": "x|y", "b": b"\x00\xff", "t": True, "i": -3, "f": 1e-300, "ls": ["a", "b"], "li": [1, 2],
                           "1|odd": "a key with the form's separator"})
    metrics = MetricRecord({P.AUROC_REPLICATES: [0.5, 0.75], "n": [1, 2], "i": 3, "f": -0.0})
    content = RecordDict({"a": arrays, "c": config, "m": metrics, "empty": MetricRecord({}), "none": ArrayRecord({})})
    _same(W.unpack(W.pack(content)), content)


def test_arrays_the_inline_form_does_not_carry_travel_as_flower_arrays():
    odd = RecordDict({"a": ArrayRecord({"be": Array(np.arange(4, dtype=">f4")), "u2": Array(np.arange(3, dtype=np.uint16)),
                                        "nine": Array(np.zeros([1] * 9, np.float32))})})
    packed = W.pack(odd)
    assert W.WIRE_ARRAYS in packed
    _same(W.unpack(packed), odd)


def test_large_arrays_stay_flower_arrays_and_a_model_shared_by_messages_is_one_object():
    n = W.INLINE_MAX_BYTES // 4 + 1  # one model over the inline limit
    shared = P.to_record(_weights(0, n))
    one = W.pack(RecordDict({P.ARRAYS: shared, P.LOCAL_ARRAYS: P.to_record(_weights(1, n)), P.CONFIG: ConfigRecord({"a": 1})}))
    two = W.pack(RecordDict({P.ARRAYS: shared, P.LOCAL_ARRAYS: P.to_record(_weights(2, n)), P.CONFIG: ConfigRecord({"a": 1})}))
    assert W.WIRE_ARRAYS in one and "blob" not in one[W.WIRE]
    arr = lambda c: {k: a.object_id for k, a in c[W.WIRE_ARRAYS].items()}  # noqa: E731
    first = next(iter(shared.keys()))
    assert arr(one)[f"0|{first}"] == arr(two)[f"0|{first}"]  # the global model: the same object in both
    assert set(_objects(one)) & set(_objects(two)) >= {arr(one)[f"0|{first}"]}
    _same(W.unpack(one), W.unpack(W.pack(W.unpack(one))))
    assert np.array_equal(P.from_record(W.unpack(two)[P.LOCAL_ARRAYS])["fc.weight"], _weights(2, n)["fc.weight"])


# ------------------------------------------------------------------------------ hostile forms
def _tampered(change) -> RecordDict:
    """A packed reply with ``change(wire_record, manifest_dict)`` applied; the manifest is written back."""
    packed = W.pack(_reply_content(n=100))
    wire = packed[W.WIRE]
    original = wire["manifest"]
    doc = json.loads(original)
    out = change(wire, doc)
    if out is not None:
        return out
    if wire.get("manifest") == original:  # the change was to the manifest's contents: write them back
        wire["manifest"] = json.dumps(doc)
    return packed


def _set(key, value):
    def change(wire, doc):
        wire[key] = value
    return change


def _manifest_text(text):
    def change(wire, doc):
        wire["manifest"] = text
    return change


def _records(fn):
    def change(wire, doc):
        fn(doc["records"])
    return change


def _first_arrays(fn):
    def change(wire, doc):
        fn(next(r for r in doc["records"] if r["kind"] == "arrays")["arrays"][0])
    return change


def _with_extra_record(wire, doc):
    out = RecordDict({W.WIRE: wire, "extra": ConfigRecord({"x": SECRET})})
    wire["manifest"] = json.dumps(doc)
    return out


def _arrays_record_beside_inline(wire, doc):
    out = RecordDict({W.WIRE: wire, W.WIRE_ARRAYS: ArrayRecord({})})
    doc["inline"] = False
    wire["manifest"] = json.dumps(doc)
    return out


HOSTILE = {
    "version-2": _set("v", 2),
    "version-as-text": _set("v", "1"),
    "manifest-not-text": _set("manifest", b"{}"),
    "manifest-too-long": _manifest_text("{" + " " * (W.MAX_MANIFEST_CHARS + 1) + "}"),
    "manifest-not-json": _manifest_text(f"{{{SECRET}"),
    "manifest-nested-deep": _manifest_text("[" * 200_000 + "]" * 200_000),
    "manifest-fields": _manifest_text(json.dumps({"records": [], "inline": True, SECRET: 1})),
    "unknown-kind": _records(lambda rs: rs[0].update(kind=SECRET)),
    "repeated-name": _records(lambda rs: rs[1].update(name=rs[0]["name"])),
    "name-of-the-form": _records(lambda rs: rs[0].update(name=W.WIRE)),
    "extra-entry-field": _records(lambda rs: rs[0].update(extra=SECRET)),
    "too-many-records": _records(lambda rs: rs.extend({"name": f"r{i}", "kind": "config"} for i in range(W.MAX_RECORDS))),
    "object-dtype": _first_arrays(lambda a: a.__setitem__(1, "|O")),
    "text-dtype": _first_arrays(lambda a: a.__setitem__(1, "<U13")),
    "negative-dim": _first_arrays(lambda a: a.__setitem__(2, [-1])),
    "float-dim": _first_arrays(lambda a: a.__setitem__(2, [1.5])),
    "bool-dim": _first_arrays(lambda a: a.__setitem__(2, [True])),
    "nine-dims": _first_arrays(lambda a: a.__setitem__(2, [1] * 9)),
    "bomb-shape": _first_arrays(lambda a: a.__setitem__(2, [1 << 39, 1 << 39])),
    "key-not-text": _first_arrays(lambda a: a.__setitem__(0, 7)),
    "blob-short": lambda wire, doc: wire.__setitem__("blob", wire["blob"][:-1]),
    "blob-long": lambda wire, doc: wire.__setitem__("blob", wire["blob"] + b"\0"),
    "blob-as-text": lambda wire, doc: wire.__setitem__("blob", SECRET),
    "blob-missing": lambda wire, doc: wire.__delitem__("blob"),
    "value-of-no-record": _set(f"99|{SECRET}", SECRET),
    "value-without-index": _set(SECRET, SECRET),
    "value-in-an-array-record": _set(f"1|{SECRET}", 1.0),
    "text-in-a-metric-record": _set(f"2|{SECRET}", SECRET),
    "dtype-as-list": _first_arrays(lambda a: a.__setitem__(1, ["<f4"])),
    "zero-size-huge-dims": _first_arrays(lambda a: a.__setitem__(2, [0, 2**40 - 1, 2**40 - 1])),
    "index-in-other-digits": _set(f"\u00b2|{SECRET}", 1.0),
    "index-with-leading-zero": _set("02|num-examples", 999999.0),
    "name-with-a-lone-surrogate": _records(lambda rs: rs[0].update(name="site\ud800")),
    "blob-over-the-inline-limit": lambda wire, doc: wire.__setitem__("blob", b"\0" * (W.INLINE_MAX_BYTES + 1)),
    "record-beside-the-form": _with_extra_record,
    "arrays-record-and-inline": _arrays_record_beside_inline,
    "not-the-form's-record": lambda wire, doc: RecordDict({W.WIRE: MetricRecord({"v": 1})}),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_a_hostile_form_is_refused_with_a_reason_that_quotes_nothing(case):
    content = _tampered(HOSTILE[case])
    with pytest.raises(W.WireError) as err:
        W.unpack(content)
    reason = str(err.value)
    assert reason.startswith("compact form: ") and SECRET not in reason and "\n" not in reason and len(reason) < 120


def test_large_form_with_missing_or_extra_arrays_is_refused():
    n = W.INLINE_MAX_BYTES // 4 + 1
    packed = W.pack(RecordDict({P.ARRAYS: P.to_record(_weights(0, n))}))
    key = next(iter(packed[W.WIRE_ARRAYS].keys()))
    missing = RecordDict({W.WIRE: packed[W.WIRE], W.WIRE_ARRAYS: ArrayRecord({})})
    extra = RecordDict({W.WIRE: packed[W.WIRE], W.WIRE_ARRAYS: ArrayRecord({key: packed[W.WIRE_ARRAYS][key],
                                                                             f"0|{SECRET}": Array(np.zeros(1))})})
    for bad in (missing, extra, RecordDict({W.WIRE: packed[W.WIRE]})):
        with pytest.raises(W.WireError) as err:
            W.unpack(bad)
        assert SECRET not in str(err.value)


def test_the_coordinator_rejects_a_malformed_compact_reply_by_naming_the_form():
    task_identity()
    sent = Message(content=RecordDict({P.CONFIG: ConfigRecord({"a": 1})}), dst_node_id=7, message_type="train")
    stamp_message_id(sent, "m1")
    reference = _weights(0, 100)
    good = Message(content=W.pack(_reply_content(n=100)), reply_to=sent)
    plain = Message(content=_reply_content(n=100), reply_to=sent)
    got, want = (validate_train_reply(m, reference, max_examples=1e6, local_reference=reference) for m in (good, plain))
    assert not isinstance(got, Rejection) and not isinstance(want, Rejection)
    assert json.dumps(got.metrics) == json.dumps(want.metrics) and all(np.array_equal(got.arrays[k], want.arrays[k]) for k in reference)
    bad = Message(content=_tampered(HOSTILE["text-in-a-metric-record"]), reply_to=sent)
    res = validate_train_reply(bad, reference, max_examples=1e6, local_reference=reference)
    assert isinstance(res, Rejection) and res.reason.startswith("compact form") and SECRET not in res.reason


def test_a_site_answers_a_malformed_compact_message_with_bad_request(cohort):
    task_identity()
    from flwr.app import Context

    msg = Message(content=_tampered(HOSTILE["blob-short"]), dst_node_id=1, message_type="train")
    stamp_message_id(msg, "m2")
    ctx = Context(run_id=1, node_id=1, node_config={"site-config": str(cohort / "site-a" / "site.yaml")},
                  state=RecordDict(), run_config={})
    reply = SiteHandler().handle(msg, ctx)
    assert reply.has_error() and reply.error.code == P.ERR_BAD_REQUEST


# ------------------------------------------------------------------ a federation through it
class PushPullGrid(InProcessGrid):
    """The in-process grid with the Grid's ``push_messages`` / ``pull_messages``: the coordinator
    then takes its deployment path (messages in the compact form), and the real site handler reads
    and answers them in it."""

    def __init__(self, *a, **k) -> None:
        super().__init__(*a, **k)
        self.waiting: dict[str, Message] = {}
        self.forms: list[tuple[str, bool]] = []  # (message type, packed) as pushed
        self.answers: list[tuple[Message, RecordDict, bytes]] = []  # each reply with its content and bytes as sent

    def push_messages(self, messages):
        ids = []
        for i, msg in enumerate(messages):
            stamp_message_id(msg, f"pp-{len(self.sent)}-{i}")
            ids.append(msg.metadata.message_id)
            self.forms.append((msg.metadata.message_type, W.is_packed(msg.content)))
            for reply in self.send_and_receive([msg]):
                self.answers.append((reply, reply.content, bytes(reply.deflate())))
                self.waiting[msg.metadata.message_id] = reply
        return ids

    def pull_messages(self, message_ids):
        return [self.waiting.pop(i) for i in list(message_ids) if i in self.waiting]


def test_a_federation_in_the_compact_form_equals_the_plain_one_and_passes_the_privacy_audit(cohort, tmp_path):
    (tmp_path / "plain").mkdir()
    (tmp_path / "compact").mkdir()
    plain_cfg = load_run_config(write_run(tmp_path / "plain", cohort, "wire", rounds=1))  # one run name: one seed
    compact_cfg = load_run_config(write_run(tmp_path / "compact", cohort, "wire", rounds=1))
    plain = InProcessGrid(plain_cfg.sites)
    compact = PushPullGrid(compact_cfg.sites)
    a, b = Federation(plain_cfg, plain).run(), Federation(compact_cfg, compact).run()
    assert len(compact.forms) == 3 * len(SITES) and all(packed for _, packed in compact.forms)
    assert len(compact.received) == len(plain.received) == 3 * len(SITES)
    from dicomfl.common.model import ModelConfig, build_model, get_weights
    from dicomfl.server.checkpoint import read_npz

    names = {k: tuple(v.shape) for k, v in get_weights(build_model(ModelConfig(**MODEL))).items()}
    headers = set().union(*(_header_strings(cohort, s) for s in SITES))
    assert len(compact.answers) == 3 * len(SITES)
    for reply, sent_content, wire in compact.answers:
        assert W.is_packed(sent_content)  # the site answered in the form it was asked in
        assert not any(s.encode() in wire for s in headers)
        _same(W.unpack(sent_content), reply.content)  # what the coordinator read is what the site sent
        _audit_reply(reply, names, headers)
    key = lambda m: (m.metadata.message_type, m.content[P.SITE]["name"])  # noqa: E731 - replies come in any order
    for r1, r2 in zip(sorted(plain.received, key=key), sorted(compact.received, key=key)):
        _same(r1.content, r2.content, ignore=frozenset({"train-seconds"}))  # the same records, bit for bit, whichever form carried them
    g1, g2 = (read_npz(c.out_dir / "checkpoints" / "round-0001" / "global.npz") for c in (plain_cfg, compact_cfg))
    assert all(np.array_equal(g1[k], g2[k]) for k in g1)
    assert a["cross_site"]["matrix"] and a["cross_site"]["matrix"] == b["cross_site"]["matrix"]  # (its summaries sum in arrival order)
