"""SCAFFOLD on the coordinator (Karimireddy et al., ICML 2020): a strategy wrapper that keeps the
server control ``c`` and applies the server learning rate ``eta_g``.

``Scaffold(FedAvg(...), eta_g)`` is built by the strategy registry (``scaffold`` in
:mod:`dicomfl.server.strategies`, which also says that its replies carry control deltas and how
``c`` is saved for a resume). Per round, through the interface of
:mod:`dicomfl.server.strategies.base`:

1. ``configure_train`` remembers the global model ``x`` and the number ``N`` of connected sites,
   and adds ``c`` (zeros at the start) to every train message as ``scaffold-control``;
2. ``check_replies``: a reply whose control delta fails :func:`~.checks.control_problems` (norm
   bound ``run.max_control_norm``, the median-ratio rule, and the check that the delta is the
   site's update scaled by one positive number) is rejected, so the site loses its model update
   too and ``x`` and ``c`` move on the same sites;
3. ``aggregate_train``: the replies (one per screened site, each with its control delta, see
   :func:`~.replies.aggregation_message`) go to FedAvg without the deltas; then
   ``x <- x + eta_g * (weighted mean(y_i) - x)`` (the same weights as every other strategy here:
   validated ``num-examples`` after the share cap) and, when that gave a model,
   :meth:`Scaffold.aggregate_controls`: ``c <- c + sum(delta_c_i) / N`` (the paper's ``|S|/N *
   mean``, unweighted, so ``c`` stays the mean of the sites' controls).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from copy import copy

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

from dicomfl.common import protocol as P
from dicomfl.common.scaffold import server_control_update, server_model_update, zeros_like

from .checks import control_problems
from .strategies.base import StrategyWrapper, own_content

log = logging.getLogger("dicomfl.server")


class Scaffold(StrategyWrapper):
    """SCAFFOLD's server step and control around a FedAvg-shaped strategy.

    Parameters
    ----------
    strategy : flwr.serverapp.strategy.Strategy
        The strategy that samples the sites and takes the weighted mean (FedAvg).
    eta_g : float, optional
        The global (server) learning rate; 1 (the default) is FedAvg's step.
    max_control_norm : float, optional
        The largest L2 norm of a site's control delta (``run.max_control_norm``).
    max_control_ratio : float, optional
        With three or more deltas, reject one above this many times their median norm (0: off).
    """

    def __init__(self, strategy, eta_g: float = 1.0, *, max_control_norm: float = 1000.0,
                 max_control_ratio: float = 0.0) -> None:
        super().__init__(strategy)
        if not eta_g > 0:
            raise ValueError("server_lr (SCAFFOLD's eta_g) must be > 0")
        self.eta_g = float(eta_g)
        self.max_control_norm = float(max_control_norm)
        self.max_control_ratio = float(max_control_ratio)
        self.control: dict[str, np.ndarray] | None = None
        self.current_arrays: dict[str, np.ndarray] | None = None
        self.n_nodes = 0

    def server_control(self, reference: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``c`` (zeros shaped like ``reference`` before the first round)."""
        if self.control is None or set(self.control) != set(reference):
            self.control = zeros_like(reference)
        return self.control

    def configure_train(self, server_round: int, arrays: ArrayRecord, config, grid) -> Iterable[Message]:
        self.n_nodes = len(list(grid.get_node_ids()))
        self.current_arrays = P.from_record(arrays)
        control = self.server_control(self.current_arrays)
        messages = own_content(self.strategy.configure_train(server_round, arrays, config, grid))
        for m in messages:
            m.content[P.CONTROL] = P.to_record(control)
        return messages

    def own_problems(self, server_round: int, replies: Mapping) -> dict[str, str]:
        """A bad control delta costs the site its whole update: ``x`` and ``c`` move together."""
        if not replies or self.current_arrays is None:
            return {}
        return control_problems({s: v.control_delta for s, v in replies.items()}, {s: v.arrays for s, v in replies.items()},
                                self.current_arrays, self.server_control(self.current_arrays),
                                max_norm=self.max_control_norm, max_ratio=self.max_control_ratio)

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        deltas, plain = [], []
        for m in replies:
            content = m.content
            if P.CONTROL_DELTA in content:
                deltas.append(P.from_record(content[P.CONTROL_DELTA]))
                content = RecordDict({k: v for k, v in content.items() if k != P.CONTROL_DELTA})
            plain.append(Message(content=content, metadata=copy(m.metadata)))
        arrays, metrics = self.strategy.aggregate_train(server_round, plain)
        if arrays is None:
            return arrays, metrics
        if self.current_arrays is not None and self.eta_g != 1.0:
            arrays = P.to_record(server_model_update(self.current_arrays, P.from_record(arrays), self.eta_g))
        if deltas and len(deltas) == len(replies) and self.current_arrays is not None:
            self.aggregate_controls(deltas, max(self.n_nodes, len(deltas)), self.current_arrays)
        else:  # only outside the round loop, whose validation asks every reply for its delta
            log.warning("round %d: %d of %d SCAFFOLD replies carry a control delta; the server control is unchanged",
                        server_round, len(deltas), len(replies))
        return arrays, metrics

    def aggregate_controls(self, deltas: Iterable[Mapping[str, np.ndarray]], n_sites: int,
                           reference: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``c <- c + sum(deltas) / n_sites``; returns the new ``c``."""
        self.control = server_control_update(self.server_control(reference), list(deltas), n_sites)
        return self.control
