"""Plain local training (FedAvg, FedProx: the proximal term is the coordinator's ``proximal-mu``)
and the site's evaluation of every model it is sent."""

from __future__ import annotations

from dicomfl.common import protocol as P

from dicomfl.client.fedstats import transform_from
from dicomfl.client.personal import stored_personal_model
from dicomfl.client.trainer import SiteTrainer

from .base import SiteAlgorithm, round_plan_of, train_reply, validation_numbers


class Plain(SiteAlgorithm):
    """Evaluate the incoming global model on validation data, then train it."""

    name = "plain"

    def train(self, site: SiteTrainer, request: P.TrainRequest) -> P.TrainReply:
        plan = round_plan_of(site, request)
        val = validation_numbers(site, request.arrays, plan.features)
        return train_reply(site, val, site.train(request.arrays, plan))

    def evaluate(self, site: SiteTrainer, request: P.EvaluateRequest) -> P.EvaluateReply:
        """Every model in the message, on this site's test split (threshold from its validation
        split); with ``personal`` also the site's own personalized model, if it has one for the run."""
        features = transform_from(request.standardization, site.model_cfg)
        # replicate AUROCs: as many as the coordinator asks, at most what the site allows (default none)
        reps = min(request.replicates, site.cfg.privacy.eval_replicates)
        metrics = {mid: site.evaluate(w, features=features, replicates=reps) for mid, w in request.models.items()}
        if request.personal:  # under a fixed id: the coordinator names it by the authenticated site
            stored = stored_personal_model(site, request.run)
            if stored is not None:
                metrics[P.OWN_PERSONAL] = site.evaluate(stored, features=features, replicates=reps)
        return P.EvaluateReply(site=site.name, metrics=metrics)
