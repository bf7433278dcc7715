"""Local normalization (``run.local_norm``, FedBN's idea): the site trains with its own GroupNorm
parameters and sends the global values for them (:mod:`dicomfl.client.personal`)."""

from __future__ import annotations

from dicomfl.common import protocol as P

from dicomfl.client.personal import keep_local_norms, with_local_norms
from dicomfl.client.trainer import SiteTrainer
from .base import SiteAlgorithm, round_plan_of, train_reply, validation_numbers


def wants_local_norm(request) -> bool:
    """A train request of a ``run.local_norm`` run."""
    return request.config.local_norm


class LocalNorm(SiteAlgorithm):
    name = "local_norm"

    def train(self, site: SiteTrainer, request: P.TrainRequest) -> P.TrainReply:
        plan = round_plan_of(site, request)
        global_weights = request.arrays
        val = validation_numbers(site, global_weights, plan.features)
        # round 1 starts from the global values: norms stored under this run name are from an earlier run
        start = with_local_norms(site, plan.run, global_weights) if plan.server_round > 1 else global_weights
        out = site.train(start, plan)
        if not out.declined:  # the trained GroupNorm values stay here; the global ones go back
            out.weights = keep_local_norms(site, plan.run, out.weights, global_weights)
        return train_reply(site, val, out)
