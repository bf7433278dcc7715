"""The strategy registry: one entry per strategy a run may name (``run.strategy``).

An entry (:class:`Entry`) says how the strategy is built, its server learning rate when
``run.server_lr`` is not written, the state it keeps across a resume (get/set functions: Flower's
attribute names live in the entry and nowhere else), the replies it needs and the fewest replies
with which it aggregates. Its parameters (``run.strategy_params``) and their bounds are pure data
in :data:`dicomfl.common.config.STRATEGY_TABLE`, checked when run.yaml is read; an entry exists for
every name there and for no other. Adding a strategy: one line in that table, one entry here, and
its own file when it is ours (:mod:`dicomfl.server.scaffold`).

All but ``scaffold`` come from ``flwr.serverapp.strategy`` (flwr 1.41); ``scaffold`` is ours
(:mod:`dicomfl.server.scaffold`; Flower has none). Every one is, or wraps, a FedAvg subclass: it
samples ``fraction_train`` of the nodes (at least ``min_train_nodes``), aggregates replies that
carry exactly one ArrayRecord and one MetricRecord with the same metric keys (build them with
:func:`dicomfl.server.replies.aggregation_message`), and weights by ``num-examples`` where it
averages.

====================  =====================================================  ============================
name                  aggregation                                            extra parameters
====================  =====================================================  ============================
``fedavg``            weighted mean                                          -
``fedprox``           weighted mean; clients add ``mu/2 ||w - w_g||^2``      ``proximal_mu``
``fedadam``           weighted mean -> server Adam step                      ``server_lr`` (eta, default
                                                                             0.01), eta_l,
                                                                             beta_1, beta_2, tau
``fedyogi``           weighted mean -> server Yogi step                      same as fedadam
``fedadagrad``        weighted mean -> server Adagrad step                   ``server_lr`` (eta, 0.01), eta_l,
                                                                             tau
``fedavgm``           weighted mean -> server SGD with momentum              ``server_lr`` (default 1),
                                                                             server_momentum
``fedmedian``         coordinate-wise median (unweighted)                    -
``fedtrimmedavg``     coordinate-wise trimmed mean (unweighted)              beta (fraction cut each end)
``krum``              the one update closest to its n-f-2 neighbours         num_malicious_nodes (f)
``multikrum``         weighted mean of the m best Krum scores                num_malicious_nodes,
                                                                             num_nodes_to_select (m)
``scaffold``          weighted mean -> x + eta_g (mean - x); server control  ``server_lr`` (eta_g, default
                      c += sum(delta_c_i) / N; sites correct each SGD step   1); sites need
                      by c - c_i (:mod:`dicomfl.server.scaffold`, a wrapper) ``train.optimizer: sgd``
``bulyan``            MultiKrum selection of n-2f, then mean of the          num_malicious_nodes (f);
                      n-4f values closest to the median, per coordinate      needs n >= 4f + 3
====================  =====================================================  ============================

With two sites: the median and trimmed mean are the plain (unweighted) mean, Krum picks one of
the two updates (whichever comes first on a tie, so an attacker's update can win), MultiKrum with
m = 2 is FedAvg, and Bulyan needs n >= 4f + 3 (3 with f = 0) so it skips every round (returns no
arrays: the global model does not change). None of them protects a round in which the attackers
are a majority: use the absolute norm bound and clipping in :mod:`dicomfl.server.checks`.

Not offered: ``QFedAvg`` (a fairness method that needs the client learning rate and a
``train_loss`` metric), the XGBoost strategies, and the DP wrappers
(``DifferentialPrivacy{Client,Server}Side{Fixed,Adaptive}Clipping``), which wrap one of these.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dicomfl.common.config import FEDERATED_STRATEGIES, strategy_params_problem

from .base import ReplyNeeds, State, StrategyWrapper

STRATEGY_NAMES: tuple[str, ...] = FEDERATED_STRATEGIES


@dataclass(frozen=True)
class Build:
    """What an entry's builder gets: the run's sampling, its resolved server learning rate and the
    strategy's own parameters (already checked against their bounds)."""

    common: dict[str, Any]  # Flower's sampling arguments (fraction_train, min_train_nodes, ...)
    server_lr: float | None  # run.server_lr, or the entry's default when it is not written
    params: dict[str, Any]  # run.strategy_params
    proximal_mu: float = 0.0
    max_control_norm: float = 1000.0  # run.max_control_norm (SCAFFOLD)
    max_control_ratio: float = 10.0  # run.max_update_norm_ratio, applied to control deltas (SCAFFOLD)


def _no_state(strategy) -> State:
    return {}


def _set_nothing(strategy, saved: Mapping[str, Mapping[str, np.ndarray]]) -> None:
    return None


@dataclass(frozen=True)
class Entry:
    """One strategy: how it is built and what the round loop needs to know about it.

    Attributes
    ----------
    build : callable
        ``build(Build) -> flwr.serverapp.strategy.Strategy``.
    server_lr : float or None
        The server learning rate when ``run.server_lr`` is not written; None: it takes none.
    get_state, set_state : callable
        ``get_state(strategy) -> {name: {key: array}}``, what it keeps between rounds (saved as
        ``strategy-<name>.npz`` in every checkpoint); ``set_state(strategy, saved)`` puts it back.
    needs : ReplyNeeds
        What its train replies must carry.
    min_replies : callable
        ``min_replies(params) -> int``: the fewest usable replies with which it aggregates.
    """

    build: Callable[[Build], Any]
    server_lr: float | None = None
    get_state: Callable[[Any], State] = _no_state
    set_state: Callable[[Any, Mapping[str, Mapping[str, np.ndarray]]], None] = _set_nothing
    needs: ReplyNeeds = field(default_factory=ReplyNeeds)
    min_replies: Callable[[Mapping[str, Any]], int] = lambda params: 1


def _dict_state(*attrs: str) -> tuple[Callable, Callable]:
    """get/set for state kept as dicts of arrays in the strategy's attributes ``attrs``."""
    def get(strategy) -> State:
        return {a: v for a in attrs if isinstance(v := getattr(strategy, a, None), dict)}

    def put(strategy, saved) -> None:
        for a in attrs:
            if a in saved:
                setattr(strategy, a, dict(saved[a]))
    return get, put


def _list_state(attr: str) -> tuple[Callable, Callable]:
    """get/set for state kept as a list of arrays (saved under zero-padded index keys, in order)."""
    def get(strategy) -> State:
        v = getattr(strategy, attr, None)
        return {attr: {f"{i:06d}": a for i, a in enumerate(v)}} if isinstance(v, list) else {}

    def put(strategy, saved) -> None:
        if attr in saved:
            setattr(strategy, attr, [saved[attr][k] for k in sorted(saved[attr])])
    return get, put


def _flower(cls_name: str, *, lr_arg: str | None = None, params: bool = True, mu: bool = False) -> Callable[[Build], Any]:
    def build(b: Build):
        from flwr.serverapp import strategy as S

        kw = dict(b.common)
        if lr_arg is not None and b.server_lr is not None:
            kw[lr_arg] = float(b.server_lr)
        if mu:
            kw["proximal_mu"] = b.proximal_mu
        return getattr(S, cls_name)(**kw, **(b.params if params else {}))
    return build


def _scaffold(b: Build):
    from flwr.serverapp.strategy import FedAvg

    from dicomfl.server.scaffold import Scaffold

    return Scaffold(FedAvg(**b.common), eta_g=1.0 if b.server_lr is None else float(b.server_lr),
                    max_control_norm=b.max_control_norm, max_control_ratio=b.max_control_ratio)


def _bulyan_min(params: Mapping[str, Any]) -> int:
    return 4 * int(params.get("num_malicious_nodes", 0)) + 3  # below it Flower returns no arrays


# The server optimizers' eta when run.server_lr is not written (Flower's own defaults are FedAdam 0.1,
# FedYogi 0.01, FedAdagrad 0.1). FedAvgM's and SCAFFOLD's 1.0 is plain FedAvg's step: a
# FedAdam-sized 0.01 would slow them 100x.
_FEDOPT_LR = 0.01
_moments = _dict_state("m_t", "v_t")  # FedOpt's moments (dicts of arrays); current_arrays is reset in configure_train
_momentum = _list_state("momentum_vector")  # FedAvgM's momentum, in the ArrayRecord's key order

REGISTRY: dict[str, Entry] = {
    "fedavg": Entry(_flower("FedAvg", params=False)),
    "fedprox": Entry(_flower("FedProx", params=False, mu=True)),
    "fedadam": Entry(_flower("FedAdam", lr_arg="eta"), server_lr=_FEDOPT_LR, get_state=_moments[0], set_state=_moments[1]),
    "fedyogi": Entry(_flower("FedYogi", lr_arg="eta"), server_lr=_FEDOPT_LR, get_state=_moments[0], set_state=_moments[1]),
    "fedadagrad": Entry(_flower("FedAdagrad", lr_arg="eta"), server_lr=_FEDOPT_LR, get_state=_moments[0],
                        set_state=_moments[1]),
    "fedavgm": Entry(_flower("FedAvgM", lr_arg="server_learning_rate"), server_lr=1.0, get_state=_momentum[0],
                     set_state=_momentum[1]),
    "fedmedian": Entry(_flower("FedMedian", params=False)),
    "fedtrimmedavg": Entry(_flower("FedTrimmedAvg")),
    "krum": Entry(_flower("Krum")),
    "multikrum": Entry(_flower("MultiKrum")),
    "bulyan": Entry(_flower("Bulyan"), min_replies=_bulyan_min),
    "scaffold": Entry(_scaffold, server_lr=1.0, needs=ReplyNeeds(control_delta=True),
                      get_state=lambda s: {"control": s.control} if s.control is not None else {},
                      set_state=lambda s, saved: setattr(s, "control", dict(saved["control"])) if "control" in saved else None),
}


def entry(name: str) -> Entry:
    """The registry entry of ``name`` (case-insensitive); ValueError naming the choices if unknown."""
    key = str(name).lower()
    if key not in REGISTRY:
        raise ValueError(f"unknown strategy {name!r}; choose one of {', '.join(STRATEGY_NAMES)}")
    return REGISTRY[key]


def min_replies(name: str, num_malicious_nodes: int = 0) -> int:
    """The fewest replies with which ``name`` aggregates anything.

    Parameters
    ----------
    name : str
        A name from :data:`STRATEGY_NAMES`.
    num_malicious_nodes : int, optional
        ``f`` for Krum, MultiKrum and Bulyan.

    Returns
    -------
    int
        4f + 3 for Bulyan (below it Flower returns no arrays); 1 for the others (Krum's
        guarantee needs n >= 2f + 3, but Flower's Krum runs with fewer).
    """
    return entry(name).min_replies({"num_malicious_nodes": num_malicious_nodes})


def make_strategy(name: str, *, fraction_train: float = 1.0, min_sites: int = 2, proximal_mu: float = 0.0,
                  server_lr: float | None = None, max_control_norm: float = 1000.0, max_control_ratio: float = 10.0,
                  **robust_params: Any):
    """Build a strategy by name, from its registry entry.

    Federated evaluation through the strategy is off (``fraction_evaluate=0``): the coordinator
    runs its own cross-site evaluation.

    Parameters
    ----------
    name : str
        One of :data:`STRATEGY_NAMES` (case-insensitive).
    fraction_train : float, optional
        Fraction of the connected nodes sampled each round.
    min_sites : int, optional
        ``min_train_nodes`` and ``min_available_nodes``: the round waits for this many nodes.
    proximal_mu : float, optional
        FedProx's proximal coefficient (sent to the clients in the config). Ignored elsewhere.
    server_lr : float or None, optional
        Server learning rate: ``eta`` of FedAdam/FedYogi/FedAdagrad, ``server_learning_rate``
        of FedAvgM, ``eta_g`` of SCAFFOLD; None: the entry's default (:attr:`Entry.server_lr`:
        0.01 for the server optimizers, 1.0 for FedAvgM and SCAFFOLD). Ignored by the others.
    max_control_norm, max_control_ratio : float, optional
        SCAFFOLD's bounds on the sites' control deltas (``run.max_control_norm``,
        ``run.max_update_norm_ratio``). Ignored by the others.
    **robust_params
        The strategy's own parameters, see :data:`dicomfl.common.config.STRATEGY_TABLE` (e.g.
        ``num_malicious_nodes`` for Krum, ``beta`` for FedTrimmedAvg).

    Returns
    -------
    flwr.serverapp.strategy.Strategy
        The strategy instance.

    Raises
    ------
    ValueError
        For an unknown name, a parameter the strategy does not take, or a value outside its
        bounds (one line naming the parameter).
    """
    e = entry(name)
    key = str(name).lower()
    why = strategy_params_problem(key, robust_params)
    if why is not None:
        raise ValueError(f"strategy {why}")
    if server_lr is not None and not server_lr > 0:
        raise ValueError("server_lr must be > 0")
    common = dict(fraction_train=fraction_train, fraction_evaluate=0.0, min_train_nodes=min_sites,
                  min_evaluate_nodes=0, min_available_nodes=min_sites)
    lr = e.server_lr if server_lr is None or e.server_lr is None else server_lr
    return e.build(Build(common=common, server_lr=lr, params=dict(robust_params), proximal_mu=proximal_mu,
                         max_control_norm=max_control_norm, max_control_ratio=max_control_ratio))


class Registered(StrategyWrapper):
    """A built strategy together with its registry entry: the outermost-but-one layer of every
    run's strategy, which answers :attr:`needs`, :meth:`min_replies` and the state from the entry.

    Parameters
    ----------
    strategy : flwr.serverapp.strategy.Strategy
        What :func:`make_strategy` built.
    entry : Entry
        Its registry entry.
    params : mapping
        The strategy's parameters (``run.strategy_params``).
    """

    def __init__(self, strategy, entry: Entry, params: Mapping[str, Any]) -> None:
        super().__init__(strategy)
        self.entry = entry
        self.params = dict(params)

    @property
    def needs(self) -> ReplyNeeds:
        return self.entry.needs

    def min_replies(self) -> int:
        return self.entry.min_replies(self.params)

    def state(self) -> State:
        return self.entry.get_state(self.strategy)

    def set_state(self, saved: Mapping[str, Mapping[str, np.ndarray]]) -> None:
        self.entry.set_state(self.strategy, saved)


def for_run(run) -> Registered:
    """The run's strategy (``run``: the run.yaml's ``run`` section), built from its registry entry."""
    built = make_strategy(run.strategy, fraction_train=run.fraction_train, min_sites=run.min_sites,
                          proximal_mu=run.proximal_mu, server_lr=run.server_lr, max_control_norm=run.max_control_norm,
                          max_control_ratio=run.max_update_norm_ratio, **run.strategy_params)
    return Registered(built, entry(run.strategy), run.strategy_params)
