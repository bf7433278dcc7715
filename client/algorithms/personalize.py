"""Personalization (``train.personalize``): fine-tune the final global model at the site
(:mod:`dicomfl.client.personal`); the personalized model leaves the site only under its
``privacy.share_local_model``."""

from __future__ import annotations

from dicomfl.common import protocol as P

from dicomfl.client.personal import personalize
from dicomfl.client.trainer import SiteTrainer
from .base import SiteAlgorithm, round_plan_of


class Personalize(SiteAlgorithm):
    name = "personalize"

    def train(self, site: SiteTrainer, request: P.PersonalizeRequest) -> P.PersonalizeReply:
        plan = round_plan_of(site, request)
        weights, metrics = personalize(site, request.arrays, plan, steps=request.steps, lr_scale=request.lr_scale,
                                       checks=request.checks, local_norm=plan.local_norm)
        shared = weights if site.cfg.privacy.share_local_model else None  # the site's opt-in, never the coordinator's
        return P.PersonalizeReply(site=site.name, metrics=metrics, arrays=shared)
