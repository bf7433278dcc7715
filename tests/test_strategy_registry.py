"""The strategy registry (server/strategies/): one entry per strategy the run config names, each
built with its defaults; unknown or out-of-bounds parameters refused with one line naming the key;
every stateful strategy's state through a real checkpoint save and restore; the server learning
rate each strategy gets when run.server_lr is not written."""

from __future__ import annotations

import numpy as np
import pytest
import yaml
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict

from dicomfl.common import protocol as P
from dicomfl.common.config import STRATEGY_TABLE, ConfigError, RunConfig, load_run_config
from dicomfl.server.checkpoint import Checkpoints, State
from dicomfl.server.federation import strategy_for
from dicomfl.server.replies import ValidTrain, aggregation_message
from dicomfl.server.strategies import REGISTRY, STRATEGY_NAMES, Registered, entry, make_strategy
from dicomfl.server.strategies.base import StrategyWrapper

REF = {"w": np.zeros(3, np.float32), "b": np.zeros(2, np.float32)}


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    """``Message(...)`` reads the run/task/node ids a ServerApp process has set; set them here."""
    from flwr.supercore.task_identity import TaskIdentity

    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)


class _Grid:
    def __init__(self, n):
        self.n = n

    def get_node_ids(self):
        return list(range(1, self.n + 1))


def _run(strategy: str, **run) -> Registered:
    return strategy_for(RunConfig.model_validate({"run": {"strategy": strategy, "min_sites": 1, **run}}))


def _replies(values, *, control: bool = False) -> list[Message]:
    """One aggregation message per value (arrays full of it; with ``control``, a control delta of
    the form SCAFFOLD's check expects), as the round loop builds them."""
    out = []
    for i, v in enumerate(values):
        arrays = {k: np.full(a.shape, v, np.float32) for k, a in REF.items()}
        instruction = Message(RecordDict({P.CONFIG: ConfigRecord({"server-round": 1})}), dst_node_id=i + 1,
                              message_type=MessageType.TRAIN)
        reply = Message(content=RecordDict({P.ARRAYS: ArrayRecord({k: Array(a) for k, a in arrays.items()}),
                                            P.METRICS: MetricRecord({"num-examples": 10.0, "train-loss": 0.5})}),
                        reply_to=instruction)
        delta = {k: (-a / 0.3).astype(np.float32) for k, a in arrays.items()} if control else None
        out.append(aggregation_message(ValidTrain(node_id=i + 1, message=reply, arrays=arrays, num_examples=10,
                                                  metrics={"num-examples": 10.0, "train-loss": 0.5},
                                                  control_delta=delta)))
    return out


def _round(strategy, values, rnd=1, reference=REF):
    list(strategy.configure_train(rnd, P.to_record(reference), ConfigRecord({}), _Grid(len(values))))
    arrays, _ = strategy.aggregate_train(rnd, _replies(values, control=strategy.needs.control_delta))
    return P.from_record(arrays)


def test_one_entry_per_strategy_the_config_names_and_each_builds_with_its_defaults():
    assert set(REGISTRY) == set(STRATEGY_TABLE) == set(STRATEGY_NAMES)
    for name in STRATEGY_NAMES:
        s = _run(name)
        assert isinstance(s, StrategyWrapper) and s.entry is entry(name)
        assert s.fraction_evaluate == 0.0 and s.min_train_nodes == 1  # Flower's attributes, through the wrappers
        assert s.min_replies() >= 1 and s.state() == {}  # nothing kept before the first round
        assert make_strategy(name) is not None
    assert entry("FedAdam") is REGISTRY["fedadam"]
    assert _run("bulyan", strategy_params={"num_malicious_nodes": 1}).min_replies() == 7
    assert _run("scaffold").needs.control_delta and not _run("fedavg").needs.control_delta


@pytest.mark.parametrize("params, key", [({"bogus": 1}, "bogus"), ({"beta": 0.7}, "beta"),
                                         ({"num_malicious_nodes": -1}, "num_malicious_nodes")])
def test_a_bad_strategy_parameter_is_refused_with_one_line_naming_the_key(tmp_path, params, key):
    strategy = "krum" if key == "num_malicious_nodes" else "fedtrimmedavg"
    p = tmp_path / "run.yaml"
    p.write_text(yaml.safe_dump({"run": {"strategy": strategy, "strategy_params": params}}))
    with pytest.raises(ConfigError) as err:
        load_run_config(p, check_files=False)
    msg = str(err.value)
    assert "\n" not in msg and "run.strategy_params" in msg and key in msg and str(p) in msg
    with pytest.raises(ValueError, match=key):
        make_strategy(strategy, **params)
    with pytest.raises(ValueError, match="unknown strategy"):
        entry("feddyn")


def test_server_lr_defaults_are_the_ones_runs_had_before():
    assert RunConfig().run.server_lr is None
    for name in ("fedadam", "fedyogi", "fedadagrad"):
        assert _run(name).eta == pytest.approx(0.01)  # run.server_lr's old default, not Flower's own
        assert _run(name, server_lr=0.05).eta == pytest.approx(0.05)
    assert _run("fedavgm").server_learning_rate == 1.0 and _run("fedavgm", server_lr=0.1).server_learning_rate == 0.1
    assert _run("scaffold").eta_g == 1.0 and _run("scaffold", server_lr=0.5).eta_g == 0.5
    assert make_strategy("scaffold").eta_g == 1.0 and make_strategy("fedavgm").server_learning_rate == 1.0


@pytest.mark.parametrize("name", ["fedadam", "fedyogi", "fedadagrad", "fedavgm", "scaffold"])
def test_state_round_trips_through_a_checkpoint_and_the_next_round_is_the_same(tmp_path, name):
    kw = {"strategy_params": {"server_momentum": 0.9}} if name == "fedavgm" else {}
    first = _run(name, **kw)
    x1 = _round(first, [1.0, 2.0, 4.0])
    saved = first.state()
    assert saved and all(isinstance(v, dict) and v for v in saved.values())
    ck = Checkpoints(tmp_path)
    ck.save(State(round=1, global_weights=x1, strategy_state=saved))
    resumed = _run(name, **kw)
    resumed.set_state(ck.latest().strategy_state)
    back = resumed.state()
    assert set(back) == set(saved)
    for attr in saved:
        assert set(back[attr]) == set(saved[attr])
        for k in saved[attr]:
            assert np.array_equal(back[attr][k], saved[attr][k])
    # the resumed strategy takes round 2 exactly where the uninterrupted one does
    a, b = _round(first, [0.5, 1.5, 3.0], 2, x1), _round(resumed, [0.5, 1.5, 3.0], 2, x1)
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_scaffold_sends_its_control_and_aggregates_the_deltas():
    s = _run("scaffold")
    msgs = list(s.configure_train(1, P.to_record(REF), ConfigRecord({}), _Grid(4)))
    assert len(msgs) == 4 and all(P.CONTROL in m.content for m in msgs)
    assert all(not np.any(P.from_record(m.content[P.CONTROL])["w"]) for m in msgs)  # c = 0 at the start
    s.aggregate_train(1, _replies([1.0, 2.0], control=True))
    # c <- c + sum(delta) / N, N = 4 connected sites
    assert np.allclose(s.control["w"], (-1.0 / 0.3 - 2.0 / 0.3) / 4, atol=1e-5)
