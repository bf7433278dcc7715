"""Federated feature statistics (``query.fedstats``): the site's counts, sums and sums of squares
over its training split, exact or released under DP (:mod:`dicomfl.client.fedstats`)."""

from __future__ import annotations

from dicomfl.common import protocol as P
from dicomfl.common.fedstats import released

from dicomfl.client.fedstats import site_statistics
from dicomfl.client.trainer import RoundPlan, SiteTrainer
from .base import SiteAlgorithm


class FederatedStatistics(SiteAlgorithm):
    name = "fedstats"

    def query(self, site: SiteTrainer, request: P.QueryRequest) -> P.QueryReply:
        stats = site_statistics(site, RoundPlan(**request.config.fields()))
        return P.QueryReply(site=site.name, stats=stats, features=released(site.model_cfg.drop_features))
