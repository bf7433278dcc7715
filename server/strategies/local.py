"""Two coordinator-side parts of the run that are not aggregation rules, as strategy wrappers
(the interface is :mod:`dicomfl.server.strategies.base`):

* :class:`LocalBaseline` (``cross_site.local_baseline``): each site's local-only baseline model
  rides along in its own train message, so the baseline trains alongside the federation with the
  same budget. The round loop keeps what the sites send back for it (their ``local-arrays``).
* :class:`LocalNorm` (``run.local_norm``): each site keeps its own GroupNorm affine parameters, so
  a reply must leave them at the global model's values, and the aggregate keeps the global values
  exactly (the weighted mean of equal values is that value only up to rounding).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord

from dicomfl.common import protocol as P

from .base import Arrays, StrategyWrapper, own_content


class LocalBaseline(StrategyWrapper):
    """Adds each site's local-only baseline model (``local-arrays``) to its train message.

    Parameters
    ----------
    strategy : flwr.serverapp.strategy.Strategy
        The wrapped strategy.
    local_model : callable
        ``local_model(node_id)``: the baseline model to send that node (its site's latest, or the
        initial model before the site's first reply).
    """

    def __init__(self, strategy, local_model: Callable[[int], Mapping[str, np.ndarray]]) -> None:
        super().__init__(strategy)
        self.local_model = local_model

    def configure_train(self, server_round: int, arrays: ArrayRecord, config, grid) -> Iterable[Message]:
        messages = own_content(self.strategy.configure_train(server_round, arrays, config, grid))
        for m in messages:
            m.content[P.LOCAL_ARRAYS] = P.to_record(self.local_model(m.metadata.dst_node_id))
        return messages


class LocalNorm(StrategyWrapper):
    """``run.local_norm``: the GroupNorm parameters stay at the global model's values.

    Parameters
    ----------
    strategy : flwr.serverapp.strategy.Strategy
        The wrapped strategy.
    norm_names : iterable of str
        The model's GroupNorm parameter names (:func:`dicomfl.common.model.norm_parameter_names`).
    """

    def __init__(self, strategy, norm_names: Iterable[str]) -> None:
        super().__init__(strategy)
        self.norm_names = frozenset(norm_names)
        self.current_arrays: Arrays | None = None

    def configure_train(self, server_round: int, arrays: ArrayRecord, config, grid) -> Iterable[Message]:
        self.current_arrays = P.from_record(arrays)
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def own_problems(self, server_round: int, replies: Mapping) -> dict[str, str]:
        ref = self.current_arrays
        if ref is None:
            return {}
        return {s: "sent its own GroupNorm parameters (run.local_norm keeps them at the site)"
                for s, v in sorted(replies.items()) if any(not np.array_equal(v.arrays[k], ref[k]) for k in self.norm_names)}

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        arrays, metrics = self.strategy.aggregate_train(server_round, replies)
        if arrays is None or self.current_arrays is None or not self.norm_names:
            return arrays, metrics
        new = P.from_record(arrays)
        for k in self.norm_names:  # the weighted mean of equal values, exactly
            new[k] = np.array(self.current_arrays[k], copy=True)
        return P.to_record(new), metrics
