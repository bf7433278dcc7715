"""SCAFFOLD on the coordinator (Karimireddy et al., ICML 2020): a Flower FedAvg subclass that keeps
the server control ``c`` and applies the server learning rate ``eta_g``.

Per round (:class:`~dicomfl.server.federation.Federation` drives it):

1. ``configure_train`` remembers the global model ``x``; the round loop adds ``c``
   (:attr:`Scaffold.control`, zeros at the start) to every train message as ``scaffold-control``;
2. the replies' arrays and control deltas are validated (:mod:`~.replies`) and screened
   (:func:`~.checks.screen_updates`, then :func:`~.checks.control_problems`: norm bound and the
   check that a delta is the site's update scaled by one positive number); a site whose delta
   fails loses its model update too, so ``x`` and ``c`` move on the same sites;
3. ``aggregate_train``: ``x <- x + eta_g * (weighted mean(y_i) - x)`` (the same weights as every
   other strategy here: validated ``num-examples`` after the share cap);
4. :meth:`Scaffold.aggregate_controls`: ``c <- c + sum(delta_c_i) / N`` (the paper's ``|S|/N *
   mean``, unweighted, so ``c`` stays the mean of the sites' controls), ``N`` the sites connected
   in the round.

``c`` is strategy state: checkpointed after every round and restored on resume
(:data:`~.strategies.STATEFUL_ATTRIBUTES`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import FedAvg

from dicomfl.common import protocol as P
from dicomfl.common.scaffold import server_control_update, server_model_update, zeros_like


class Scaffold(FedAvg):
    """FedAvg's sampling and weighted mean, SCAFFOLD's server step and control.

    Parameters
    ----------
    eta_g : float, optional
        The global (server) learning rate; 1 (the default) is FedAvg's step.
    **kwargs
        FedAvg's parameters.
    """

    def __init__(self, eta_g: float = 1.0, **kwargs) -> None:
        super().__init__(**kwargs)
        if not eta_g > 0:
            raise ValueError("server_lr (SCAFFOLD's eta_g) must be > 0")
        self.eta_g = float(eta_g)
        self.control: dict[str, np.ndarray] | None = None
        self.current_arrays: dict[str, np.ndarray] | None = None

    def server_control(self, reference: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``c`` (zeros shaped like ``reference`` before the first round)."""
        if self.control is None or set(self.control) != set(reference):
            self.control = zeros_like(reference)
        return self.control

    def configure_train(self, server_round: int, arrays: ArrayRecord, config, grid) -> Iterable[Message]:
        self.current_arrays = P.from_record(arrays)
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        arrays, metrics = super().aggregate_train(server_round, replies)
        if arrays is None or self.current_arrays is None or self.eta_g == 1.0:
            return arrays, metrics
        return P.to_record(server_model_update(self.current_arrays, P.from_record(arrays), self.eta_g)), metrics

    def aggregate_controls(self, deltas: Iterable[Mapping[str, np.ndarray]], n_sites: int,
                           reference: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``c <- c + sum(deltas) / n_sites``; returns the new ``c``."""
        self.control = server_control_update(self.server_control(reference), list(deltas), n_sites)
        return self.control
