"""Untrusted parties, site side: every string from the coordinator is treated as hostile, and the
site's privacy budget holds whatever the coordinator asks (across runs, restarts, and the local
baseline). Real site handler, real Opacus accounting, the generated cohort."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import yaml
from flwr.app import ConfigRecord, Context, Message, RecordDict

from dicomfl.client.handler import SiteHandler
from dicomfl.client.privacy import Ledger, epsilon, site_spend
from dicomfl.common import protocol as P
from dicomfl.common.config import ModelConfig, load_site_config
from dicomfl.common.errors import ConfigError
from dicomfl.common.model import build_model, get_weights
from dicomfl.workbench.flower_adapter import task_identity

MC = ModelConfig(image_size=32, width=8, depth=2, meta_hidden=32, head_hidden=32)


def _site(cohort, tmp_path, **privacy):
    src = cohort / "site-a" / "site.yaml"
    raw = yaml.safe_load(src.read_text())
    for k in ("dicom_dir", "labels", "secret_file"):
        raw["site"][k] = str((src.parent / raw["site"][k]).resolve())
    raw["site"]["state_dir"] = str(tmp_path / "state")
    raw["privacy"] = {"delta": 1e-5, "max_grad_norm": 1.0, **privacy}
    raw["train"]["batch_size"] = 16
    p = tmp_path / "site.yaml"
    p.write_text(yaml.safe_dump(raw))
    return p


def _train_msg(run="r1", rnd=1, rounds=3, local=False, dp=False, **extra) -> Message:
    task_identity()
    g = P.to_record(get_weights(build_model(MC)))
    cfg = {"run": run, "server-round": rnd, "num-rounds": rounds, "local-epochs": 1, "local-steps": 0, "dp": dp,
           "target-epsilon": 0.0, "delta": 1e-5, "seed": 0, "model": MC.model_dump_json(), **extra}
    content = RecordDict({P.ARRAYS: g, P.CONFIG: ConfigRecord(cfg)})
    if local:
        content[P.LOCAL_ARRAYS] = P.to_record(get_weights(build_model(MC)))
    msg = Message(content=content, dst_node_id=1, message_type="train")
    msg.metadata.__dict__["_message_id"] = f"m-{run}-{rnd}"
    return msg


def _ctx(site_yaml) -> Context:
    return Context(run_id=1, node_id=1, node_config={"site-config": str(site_yaml)}, state=RecordDict(), run_config={})


@pytest.fixture(scope="module")
def handler():
    return SiteHandler()


# ----------------------------------------------------------------------------- hostile strings
@pytest.mark.parametrize("run", ["../../../escaped", "/tmp/dicomfl-absolute", "a/b", "..", ".hidden", "x" * 65,
                                 "r1\n", "r\x1b[2J", ""])
def test_a_hostile_run_name_is_refused_and_never_becomes_a_path(cohort, tmp_path, handler, run):
    site = _site(cohort, tmp_path, dp=True, target_epsilon=3.0, noise_multiplier=2.0)
    reply = handler.handle(_train_msg(run=run), _ctx(site))
    assert reply.has_error() and reply.error.code == P.ERR_BAD_REQUEST
    assert P.ERROR_REASON_RE.fullmatch(reply.error.reason)  # a code and a reference, nothing echoed
    assert not (tmp_path / "escaped.json").exists() and not list(tmp_path.parent.glob("escaped*"))
    privacy = tmp_path / "state" / "privacy"
    assert not privacy.exists() or [p.name for p in privacy.iterdir() if p.name != ".lock"] == []


@pytest.mark.parametrize("key,value", [("server-round", -1), ("server-round", 1.5), ("num-rounds", 10**12),
                                       ("local-epochs", 0), ("delta", 2.0), ("proximal-mu", float("nan")),
                                       ("target-epsilon", float("inf")), ("dp", "yes"), ("model", "{not json"),
                                       ("model", json.dumps({"width": 10**9}))])
def test_out_of_bounds_numbers_from_the_coordinator_are_refused(cohort, tmp_path, handler, key, value):
    site = _site(cohort, tmp_path)
    reply = handler.handle(_train_msg(**{key: value}), _ctx(site))
    assert reply.has_error() and reply.error.code == P.ERR_BAD_REQUEST, key


# ---------------------------------------------------------------------------- the budget holds
def test_a_new_run_name_opens_no_new_budget(cohort, tmp_path, handler):
    """Four runs each asking for a full budget spent ~4x the site's budget before; now the site's
    total, all runs composed, stays within it."""
    site = _site(cohort, tmp_path, dp=True, target_epsilon=2.0, noise_multiplier=2.0)  # ~1.8 per round here
    spent_runs, declined = [], []
    for run in ("run-1", "run-2", "run-3", "run-4"):
        for rnd in range(1, 40):
            reply = handler.handle(_train_msg(run=run, rnd=rnd, rounds=40), _ctx(site))
            assert not reply.has_error(), reply.error.reason
            if reply.content[P.METRICS]["declined"] == 1.0:
                declined.append(run)
                break
        spent_runs.append(run)
    cfg = load_site_config(site)
    total = site_spend(cfg.site.state_dir, "rdp", 1e-5)
    assert total["epsilon_total"] <= 2.0 + 1e-9
    assert set(declined) == {"run-1", "run-2", "run-3", "run-4"}  # each stopped at the site's budget
    assert total["runs"]["run-1"]["rounds_trained"] >= 1
    assert sum(r["rounds_trained"] for r in total["runs"].values()) == total["runs"]["run-1"]["rounds_trained"]
    # The total is the composition of every history in the ledger, checked with Opacus directly.
    from opacus.accountants import RDPAccountant

    led = json.loads(Ledger.file_for(cfg.site.state_dir).read_text())
    acc = RDPAccountant()
    acc.history = [tuple(h) for r in led["runs"].values() for h in r["history"]]
    assert acc.get_epsilon(1e-5) == pytest.approx(total["epsilon_total"]) and acc.get_epsilon(1e-5) <= 2.0


def test_the_local_baseline_is_charged_to_the_same_budget(cohort, tmp_path, handler):
    site = _site(cohort, tmp_path, dp=True, target_epsilon=2.0, noise_multiplier=3.0, share_local_model=True)
    rounds = 0
    for rnd in range(1, 40):
        reply = handler.handle(_train_msg(run="g", rnd=rnd, rounds=40, local=True), _ctx(site))
        assert not reply.has_error()
        if reply.content[P.METRICS]["declined"] == 1.0 and P.LOCAL_ARRAYS not in reply.content:
            break
        rounds += 1
    total = site_spend(load_site_config(site).site.state_dir, "rdp", 1e-5)
    assert set(total["runs"]) == {"g", "g.local"}
    assert total["epsilon_total"] <= 2.0 + 1e-9
    assert total["runs"]["g"]["epsilon"] > 0 and total["runs"]["g.local"]["epsilon"] > 0
    # Both models were trained on the same data: together they spent the budget that one run alone
    # would have spent over about twice as many rounds.
    assert total["epsilon_total"] > max(total["runs"]["g"]["epsilon"], total["runs"]["g.local"]["epsilon"])


def test_a_site_shares_its_local_model_only_if_it_says_so(cohort, tmp_path, handler):
    site = _site(cohort, tmp_path)  # share_local_model defaults to false
    reply = handler.handle(_train_msg(local=True), _ctx(site))
    assert not reply.has_error() and P.ARRAYS in reply.content
    assert P.LOCAL_ARRAYS not in reply.content and P.LOCAL_METRICS not in reply.content


def test_privacy_status_shows_the_spend_by_run(cohort, tmp_path, handler):
    site = _site(cohort, tmp_path, dp=True, target_epsilon=3.0, noise_multiplier=2.0)
    for run in ("alpha", "beta"):
        handler.handle(_train_msg(run=run), _ctx(site))
    r = subprocess.run([sys.executable, "-m", "dicomfl.workbench.cli", "privacy", "status", str(site), "--json"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)
    assert set(s["runs"]) == {"alpha", "beta"} and s["budget"] == 3.0
    hist = [h for run in json.loads(Ledger.file_for(tmp_path / "state").read_text())["runs"].values() for h in run["history"]]
    assert s["epsilon_total"] == pytest.approx(epsilon(hist, 1e-5, "rdp"))
    assert s["epsilon_total"] > max(v["epsilon"] for v in s["runs"].values())
    from typer.testing import CliRunner

    from dicomfl.workbench.cli import app

    table = CliRunner().invoke(app, ["privacy", "status", str(site)])
    assert table.exit_code == 0 and "alpha" in table.output and "total epsilon" in table.output


# ------------------------------------------------------------------------------ the site's key
def test_a_secret_key_others_can_read_is_refused(cohort, tmp_path):
    site = _site(cohort, tmp_path)
    key = tmp_path / "open.key"
    key.write_bytes(np.random.default_rng(0).bytes(32).hex().encode())
    key.chmod(0o644)
    raw = yaml.safe_load(site.read_text())
    raw["site"]["secret_file"] = str(key)
    site.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match="readable by group or others"):
        load_site_config(site)
    key.chmod(0o600)
    assert load_site_config(site).secret_key


WEAK_KEYS = {
    "16 a": b"a" * 16,
    "32 NUL": b"\x00" * 32,
    "a repeated pattern": b"0123456789abcdef" * 4,
    "hex of a repeated byte": b"aa" * 32,
    "hex of 16 bytes": bytes(range(16)).hex().encode(),
    "little variety": b"a" * 40 + b"b",
    "empty": b"\n",
}


@pytest.mark.parametrize("name", sorted(WEAK_KEYS))
def test_a_weak_key_is_refused_naming_the_file_not_the_key(cohort, tmp_path, name):
    site = _site(cohort, tmp_path)
    key = tmp_path / "weak.key"
    key.write_bytes(WEAK_KEYS[name])
    key.chmod(0o600)
    raw = yaml.safe_load(site.read_text())
    raw["site"]["secret_file"] = str(key)
    site.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match="site secret key is too weak") as err:
        load_site_config(site)
    msg = str(err.value)
    assert str(key) in msg and "\n" not in msg
    assert WEAK_KEYS[name].strip().decode("latin-1") not in msg or not WEAK_KEYS[name].strip()
    r = subprocess.run([sys.executable, "-m", "dicomfl.workbench.cli", "ingest", str(site)], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and "too weak" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("make", ["urandom hex", "urandom raw", "base64", "xxd wrapped", "synth"])
def test_keys_made_as_documented_are_accepted(cohort, tmp_path, make):
    import base64
    import hashlib

    b = os.urandom(32)
    key = tmp_path / "good.key"
    key.write_bytes({"urandom hex": b.hex().encode() + b"\n", "urandom raw": b, "base64": base64.b64encode(b) + b"\n",
                     "xxd wrapped": b.hex()[:60].encode() + b"\n" + b.hex()[60:].encode() + b"\n",
                     "synth": hashlib.sha256(b"dicomfl-synth-key/0/site-a/" + b.hex().encode()).hexdigest().encode()}[make])
    key.chmod(0o600)
    site = _site(cohort, tmp_path)
    raw = yaml.safe_load(site.read_text())
    raw["site"]["secret_file"] = str(key)
    site.write_text(yaml.safe_dump(raw))
    assert load_site_config(site).secret_key == key.read_bytes().strip()


# ----------------------------------------------------------------------------- hostile weights
def _with_arrays(record) -> Message:
    msg = _train_msg()
    msg.content[P.ARRAYS] = record
    return msg


def _flat(key: str, n: int, value: float = 0.0):
    from flwr.app import Array, ArrayRecord

    return ArrayRecord({key: Array(np.full(n, value, dtype=np.float32))})


def _hostile_records():
    w = get_weights(build_model(MC))
    key, n = P.layout_key(w), sum(v.size for v in w.values())
    first = next(iter(w))
    return {
        "size-disagrees": _flat(key, n + 1),
        "malformed-key": _flat(P.FLAT_PREFIX + "conv=3x;;", 3),
        "negative-dims": _flat(P.FLAT_PREFIX + "w=-1", 1),
        "huge-dims": _flat(P.FLAT_PREFIX + "w=999999999x999999999", 4),
        "duplicate-names": _flat(P.FLAT_PREFIX + "w=2;w=2", 4),
        "too-long": _flat(P.FLAT_PREFIX + "w=1;" * (P.MAX_LAYOUT_CHARS // 4), 1),
        "another-model": _flat(key.replace(f"{first}=", "other.weight=", 1), n),
        "nan-weights": _flat(key, n, float("nan")),
        "absurd-weights": _flat(key, n, 3e38),
        "int-weights": P.to_record({k: np.ones(v.shape, np.int32) for k, v in w.items()}),
        "complex-weights": P.to_record({k: v.astype(np.complex64) for k, v in w.items()}),
    }


@pytest.mark.parametrize("case", sorted(_hostile_records()))
def test_hostile_weights_from_the_coordinator_are_refused(cohort, tmp_path, handler, case):
    """The global model arrives as one flat array whose key names its layout: a key or size that
    disagrees with the site's own model, or non-finite weights, is refused with a code (nothing is
    allocated from the key's numbers, nothing is trained, nothing echoed)."""
    site = _site(cohort, tmp_path)
    reply = handler.handle(_with_arrays(_hostile_records()[case]), _ctx(site))
    assert reply.has_error() and reply.error.code in (P.ERR_BAD_REQUEST, P.ERR_BAD_MODEL), case
    assert P.ERROR_REASON_RE.fullmatch(reply.error.reason)


def test_weights_travel_as_one_flat_array_and_come_back_whole():
    w = get_weights(build_model(MC))
    rec = P.to_record(w)
    assert list(rec.keys()) == [P.layout_key(w)] and len(w) > 10  # one Array instead of one per tensor
    back = P.from_record(rec)
    assert list(back) == list(w) and all(np.array_equal(back[k], w[k]) and back[k].shape == w[k].shape for k in w)
    assert P.parse_layout(P.layout_key({"s": np.float32(1.0).reshape(())})) == [("s", ())]  # a scalar
    mixed = {"a": np.zeros(2, np.float32), "b": np.zeros(2, np.int64)}
    assert list(P.to_record(mixed).keys()) == ["a", "b"]  # mixed dtypes keep one array per name


def test_the_trainer_cache_is_bounded(cohort, tmp_path):
    """200 model descriptions from a coordinator: the site keeps at most a few trainers."""
    from dicomfl.client.handler import SiteResolver

    site = _site(cohort, tmp_path)
    resolver = SiteResolver()
    node = {"site-config": str(site)}
    for i in range(200):
        resolver(node, ModelConfig(image_size=32, width=4, depth=1, meta_hidden=8, head_hidden=4 + i))
        assert len(resolver._trainers) <= SiteResolver.max_trainers
    last = ModelConfig(image_size=32, width=4, depth=1, meta_hidden=8, head_hidden=203)
    assert resolver(node, last) is resolver(node, last)  # a kept trainer is reused


HUGE_MODEL = """
import json, sys
from tests.test_site_trust import _ctx, _train_msg
from dicomfl.client.handler import SiteHandler
from dicomfl.common.config import ModelConfig
msg = _train_msg(model=ModelConfig(image_size=32, width=256, depth=6).model_dump_json())
reply = SiteHandler().handle(msg, _ctx(sys.argv[1]))
peak = [int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:")][0]
print(json.dumps({"code": reply.error.code if reply.has_error() else None, "peak_kb": peak}))
"""


def test_a_huge_model_description_is_refused_before_it_is_allocated(cohort, tmp_path):
    """A width-256, depth-6 model (about 1.25 billion parameters, 5 GB to build) is refused from its
    description: the site process stays far below what building it would take."""
    from pathlib import Path

    site = _site(cohort, tmp_path)
    r = subprocess.run([sys.executable, "-c", HUGE_MODEL, str(site)], capture_output=True, text=True, timeout=300,
                       cwd=Path(__file__).resolve().parent.parent)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["code"] == P.ERR_BAD_MODEL
    assert out["peak_kb"] < 1_500_000, out  # building it would take over 5,000,000 kB
