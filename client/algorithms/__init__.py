"""The site's algorithms and the registry that picks one for a message.

A route maps (message category, action, a test on the typed request) to an algorithm; the first
route that matches wins. Adding a method is one file here and one line in :data:`ROUTES`; the
handler (:mod:`dicomfl.client.handler`) knows no method by name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from dicomfl.common import protocol as P
from dicomfl.common.errors import BadRequest

from .base import SiteAlgorithm
from .baseline import LocalBaseline
from .fedstats import FederatedStatistics
from .local_norm import LocalNorm, wants_local_norm
from .personalize import Personalize
from .plain import Plain
from .scaffold import Scaffold, has_control


def _always(request) -> bool:
    return True


@dataclass(frozen=True)
class Route:
    category: str
    action: str
    algorithm: SiteAlgorithm
    when: Callable[[object], bool] = _always


ROUTES: tuple[Route, ...] = (
    Route(P.TRAIN, P.DEFAULT, LocalBaseline(Scaffold()), has_control),
    Route(P.TRAIN, P.DEFAULT, LocalBaseline(LocalNorm()), wants_local_norm),
    Route(P.TRAIN, P.DEFAULT, LocalBaseline(Plain())),
    Route(P.TRAIN, P.PERSONALIZE, Personalize()),
    Route(P.EVALUATE, P.DEFAULT, Plain()),
    Route(P.QUERY, P.FEDSTATS, FederatedStatistics()),
)


def select(category: str, action: str, request) -> SiteAlgorithm:
    """The algorithm that answers ``request`` (a message of ``category.action``)."""
    for r in ROUTES:
        if r.category == category and r.action == action and r.when(request):
            return r.algorithm
    raise BadRequest("message type: no site algorithm takes it")
