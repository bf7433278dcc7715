"""The coordinator's strategy interface: Flower's ``Strategy`` plus the few things dicomfl's round
loop asks of it, and the wrapper every coordinator-side algorithm is written as.

A coordinator-side algorithm (SCAFFOLD, the local-only baseline, local GroupNorm) is a
:class:`StrategyWrapper` around the run's Flower strategy, in the shape of Flower's own DP wrappers
(``DifferentialPrivacyServerSideFixedClipping(strategy, ...)`` wraps ``aggregate_train``). The
round loop (:meth:`dicomfl.server.federation.Federation._round`) calls the outermost one, in this
order, and knows nothing of the methods inside:

1. ``configure_train(server_round, arrays, config, grid) -> messages`` (Flower's): a wrapper adds
   its content to the train messages (SCAFFOLD: the server control; the local baseline: each
   site's own local model). Use :func:`own_content` before adding anything per message: Flower's
   strategies give every message the same ``RecordDict``.
2. :meth:`StrategyWrapper.check_replies` ``(server_round, replies) -> {site: why}`` (dicomfl's):
   ``replies`` are the round's validated, non-declined replies by site
   (:class:`~dicomfl.server.replies.ValidTrain`); a wrapper names the ones it cannot use, with a
   one-line reason built from the protocol's own words (never a site's text). The outermost
   wrapper checks first, the inner ones see what it left. The loop then screens the updates
   (:func:`~dicomfl.server.checks.screen_updates`).
3. ``aggregate_train(server_round, replies) -> (arrays, metrics)`` (Flower's): ``replies`` are one
   :func:`~dicomfl.server.replies.aggregation_message` per screened site, in site order. A wrapper
   takes out what is its own before it hands them to the strategy it wraps (Flower's strategies
   accept exactly one ArrayRecord and one MetricRecord per reply) and may change the result.
4. :meth:`StrategyWrapper.state` / :meth:`StrategyWrapper.set_state`: the arrays the strategy
   keeps between rounds, saved in every checkpoint and put back on resume.

:attr:`StrategyWrapper.needs` says what the replies must carry (:class:`ReplyNeeds`), and
:meth:`StrategyWrapper.min_replies` the fewest usable replies with which the strategy aggregates.
Attributes a wrapper does not have are the wrapped strategy's (``eta``, ``server_learning_rate``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import Strategy

Arrays = dict[str, np.ndarray]
State = dict[str, dict[str, np.ndarray]]  # state name -> named arrays (one checkpoint file each)


@dataclass(frozen=True)
class ReplyNeeds:
    """What a strategy needs in the sites' train replies, beyond the model and its metrics.

    Attributes
    ----------
    control_delta : bool
        Every reply with arrays carries a SCAFFOLD control delta (``scaffold-delta``), and no
        reply of another run may.
    """

    control_delta: bool = False


def own_content(messages: Iterable[Message]) -> list[Message]:
    """``messages``, each with its own copy of its ``RecordDict`` (same records, same order), so
    that content added to one message is not added to all of them."""
    out = list(messages)
    for m in out:
        m.content = RecordDict(dict(m.content.items()))
    return out


class StrategyWrapper(Strategy):
    """A Flower strategy that wraps another one and passes everything through to it.

    Subclasses override what their algorithm changes (see the module's docstring for the order in
    which the round loop calls these).

    Parameters
    ----------
    strategy : flwr.serverapp.strategy.Strategy
        The wrapped strategy (a Flower strategy or another wrapper).
    """

    def __init__(self, strategy: Strategy) -> None:
        self.strategy = strategy

    def __getattr__(self, name: str) -> Any:
        if name == "strategy":  # not set yet (e.g. while copying): no recursion
            raise AttributeError(name)
        return getattr(self.strategy, name)

    @property
    def inner(self) -> "StrategyWrapper | None":
        """The wrapped strategy when it is a wrapper too, else None."""
        return self.strategy if isinstance(self.strategy, StrategyWrapper) else None

    # ----------------------------------------------------------- Flower's interface
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid) -> Iterable[Message]:
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        return self.strategy.aggregate_train(server_round, replies)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid) -> Iterable[Message]:
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.strategy.aggregate_evaluate(server_round, replies)

    def summary(self) -> None:
        self.strategy.summary()

    # ----------------------------------------------------------- dicomfl's additions
    @property
    def needs(self) -> ReplyNeeds:
        """What the replies must carry (the wrapped strategy's, unless a wrapper adds to it)."""
        return self.inner.needs if self.inner is not None else ReplyNeeds()

    def min_replies(self) -> int:
        """The fewest usable replies with which the strategy aggregates anything."""
        return self.inner.min_replies() if self.inner is not None else 1

    def own_problems(self, server_round: int, replies: Mapping[str, Any]) -> dict[str, str]:
        """This wrapper's own reasons to reject replies (none by default): site -> why."""
        return {}

    def check_replies(self, server_round: int, replies: Mapping[str, Any]) -> dict[str, str]:
        """Replies this strategy cannot use, and why: this wrapper's :meth:`own_problems`, then
        the wrapped strategy's on the replies left."""
        bad = dict(self.own_problems(server_round, replies))
        if self.inner is not None:
            bad.update(self.inner.check_replies(server_round, {s: v for s, v in replies.items() if s not in bad}))
        return bad

    def state(self) -> State:
        """The strategy's state between rounds, as named arrays (empty: it keeps none)."""
        return self.inner.state() if self.inner is not None else {}

    def set_state(self, saved: Mapping[str, Mapping[str, np.ndarray]]) -> None:
        """Put back what :meth:`state` returned (from a checkpoint, on resume)."""
        if self.inner is not None:
            self.inner.set_state(saved)
