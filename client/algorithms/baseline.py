"""The local-only baseline, a decorator on any train algorithm: when the coordinator sends the
site's local model (``local-arrays``) and the site's ``privacy.share_local_model`` allows it, the
site also trains that model on its own data only and sends it back (its learning curve too).
The opt-in is the site's, never the coordinator's."""

from __future__ import annotations

from dataclasses import replace

from dicomfl.common import protocol as P

from dicomfl.client.trainer import SiteTrainer
from .base import SiteAlgorithm, round_plan_of, validation_numbers


class LocalBaseline(SiteAlgorithm):
    """``inner``'s train reply, plus the local-only model's when the message carries one."""

    def __init__(self, inner: SiteAlgorithm) -> None:
        self.inner = inner
        self.name = inner.name

    def train(self, site: SiteTrainer, request: P.TrainRequest) -> P.TrainReply:
        reply = self.inner.train(site, request)
        if request.local_record is None or not site.cfg.privacy.share_local_model:
            return reply
        plan = round_plan_of(site, request)
        local_plan = replace(plan, kind="local", proximal_mu=0.0)  # its own stream in the privacy account
        local_weights = P.weights_of({P.LOCAL_ARRAYS: request.local_record}, P.LOCAL_ARRAYS)
        # the incoming local model on validation data, as for the global model (its learning curve)
        lval = validation_numbers(site, local_weights, plan.features)
        lo = site.train(local_weights, local_plan)
        return replace(reply, local_arrays=lo.weights, local_metrics={**lval, **lo.metrics})
