"""The Flower strategies a run may use, by name, with their robust-aggregation parameters.

All but ``scaffold`` come from ``flwr.serverapp.strategy`` (flwr 1.41); ``scaffold`` is ours
(:mod:`dicomfl.server.scaffold`; Flower has none). Every one is a FedAvg subclass: it
samples ``fraction_train`` of the nodes (at least ``min_train_nodes``), aggregates replies that
carry exactly one ArrayRecord and one MetricRecord with the same metric keys (build them with
:func:`dicomfl.server.replies.aggregation_message`), and weights by ``num-examples`` where it
averages.

====================  =====================================================  ============================
name                  aggregation                                            extra parameters
====================  =====================================================  ============================
``fedavg``            weighted mean                                          -
``fedprox``           weighted mean; clients add ``mu/2 ||w - w_g||^2``      ``proximal_mu``
``fedadam``           weighted mean -> server Adam step                      ``server_lr`` (eta), eta_l,
                                                                             beta_1, beta_2, tau
``fedyogi``           weighted mean -> server Yogi step                      same as fedadam
``fedadagrad``        weighted mean -> server Adagrad step                   ``server_lr`` (eta), eta_l, tau
``fedavgm``           weighted mean -> server SGD with momentum              ``server_lr``, server_momentum
``fedmedian``         coordinate-wise median (unweighted)                    -
``fedtrimmedavg``     coordinate-wise trimmed mean (unweighted)              beta (fraction cut each end)
``krum``              the one update closest to its n-f-2 neighbours         num_malicious_nodes (f)
``multikrum``         weighted mean of the m best Krum scores                num_malicious_nodes,
                                                                             num_nodes_to_select (m)
``scaffold``          weighted mean -> x + eta_g (mean - x); server control  ``server_lr`` (eta_g, default
                      c += sum(delta_c_i) / N; sites correct each SGD step   1); sites need
                      by c - c_i (:mod:`dicomfl.server.scaffold`, ours)      ``train.optimizer: sgd``
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

from typing import Any

from dicomfl.common.config import FEDERATED_STRATEGIES, STRATEGY_PARAMS

STRATEGY_NAMES: tuple[str, ...] = FEDERATED_STRATEGIES

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
    return 4 * num_malicious_nodes + 3 if name == "bulyan" else 1


def make_strategy(name: str, *, fraction_train: float = 1.0, min_sites: int = 2, proximal_mu: float = 0.0,
                  server_lr: float | None = None, **robust_params: Any):
    """Build a Flower strategy by name.

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
        of FedAvgM, ``eta_g`` of SCAFFOLD (default 1); None keeps Flower's default for that strategy (FedAdam 0.1, FedYogi 0.01,
        FedAdagrad 0.1, FedAvgM 1.0: note that FedAvgM's 1.0 is plain FedAvg's step, and a
        FedAdam-sized 0.01 would slow it 100x). Ignored by the others.
    **robust_params
        The strategy's own parameters, see :data:`STRATEGY_PARAMS` (e.g. ``num_malicious_nodes``
        for Krum, ``beta`` for FedTrimmedAvg).

    Returns
    -------
    flwr.serverapp.strategy.Strategy
        The strategy instance.

    Raises
    ------
    ValueError
        For an unknown name, a parameter the strategy does not take, or a value it cannot use
        (e.g. ``beta`` outside [0, 0.5), a negative ``num_malicious_nodes``).
    """
    from flwr.serverapp import strategy as S

    key = str(name).lower()
    if key not in STRATEGY_PARAMS:
        raise ValueError(f"unknown strategy {name!r}; choose one of {', '.join(STRATEGY_NAMES)}")
    extra = set(robust_params) - STRATEGY_PARAMS[key]
    if extra:
        takes = sorted(STRATEGY_PARAMS[key]) or "none"
        raise ValueError(f"strategy {key} does not take {sorted(extra)}; it takes {takes}")
    f = robust_params.get("num_malicious_nodes", 0)
    if not isinstance(f, int) or f < 0:
        raise ValueError("num_malicious_nodes must be an int >= 0")
    if "num_nodes_to_select" in robust_params and (not isinstance(robust_params["num_nodes_to_select"], int)
                                                   or robust_params["num_nodes_to_select"] < 1):
        raise ValueError("num_nodes_to_select must be an int >= 1")
    if "beta" in robust_params and not 0.0 <= float(robust_params["beta"]) < 0.5:
        raise ValueError("beta must be in [0, 0.5)")
    common = dict(fraction_train=fraction_train, fraction_evaluate=0.0, min_train_nodes=min_sites,
                  min_evaluate_nodes=0, min_available_nodes=min_sites)
    if key == "fedavg":
        return S.FedAvg(**common)
    if key == "fedprox":
        return S.FedProx(proximal_mu=proximal_mu, **common)
    if server_lr is not None and not server_lr > 0:
        raise ValueError("server_lr must be > 0")
    lr = {} if server_lr is None else {"eta": float(server_lr)}
    if key == "fedadam":
        return S.FedAdam(**common, **lr, **robust_params)
    if key == "fedyogi":
        return S.FedYogi(**common, **lr, **robust_params)
    if key == "fedadagrad":
        return S.FedAdagrad(**common, **lr, **robust_params)
    if key == "fedavgm":
        slr = {} if server_lr is None else {"server_learning_rate": float(server_lr)}
        return S.FedAvgM(**common, **slr, **robust_params)
    if key == "scaffold":
        from .scaffold import Scaffold

        return Scaffold(eta_g=1.0 if server_lr is None else float(server_lr), **common)
    if key == "fedmedian":
        return S.FedMedian(**common)
    if key == "fedtrimmedavg":
        return S.FedTrimmedAvg(**common, **robust_params)
    if key == "krum":
        return S.Krum(**common, **robust_params)
    if key == "multikrum":
        return S.MultiKrum(**common, **robust_params)
    return S.Bulyan(**common, **robust_params)


#: Strategy attributes that carry state between rounds and must be checkpointed for a resume:
#: the server optimizers' moments (dicts of arrays) and FedAvgM's momentum (a list of arrays, in
#: the ArrayRecord's key order). ``current_arrays`` need not be saved: FedOpt resets it in every
#: ``configure_train``, and FedAvgM sets it there when it is None (a fresh strategy on resume).
STATEFUL_ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "fedadam": ("m_t", "v_t"),
    "fedyogi": ("m_t", "v_t"),
    "fedadagrad": ("m_t", "v_t"),
    "fedavgm": ("momentum_vector",),
    "scaffold": ("control",),
}
