"""What every site algorithm shares: the interface (in the spirit of MONAI's ``ClientAlgo``), and
the few steps each train method takes the same way.

An algorithm answers one kind of typed request (:mod:`dicomfl.common.protocol.messages`) with its
typed reply; the handler (:mod:`dicomfl.client.handler`) picks it from the registry
(:mod:`dicomfl.client.algorithms`) and calls the method named by the message's category
(``train``, ``evaluate`` or ``query``). An algorithm holds no state of its own between messages:
what a site keeps across rounds (SCAFFOLD's control, its own GroupNorm values, its privacy ledger)
lives in its state directory.
"""

from __future__ import annotations

import math

from dicomfl.common import protocol as P
from dicomfl.common.errors import BadRequest
from dicomfl.common.splits import VAL

from dicomfl.client.fedstats import transform_from
from dicomfl.client.trainer import Outcome, RoundPlan, SiteTrainer


class SiteAlgorithm:
    """One method at a site. A subclass overrides the categories it answers; the others refuse."""

    name = "base"

    def train(self, site: SiteTrainer, request):
        raise BadRequest(f"{self.name}: does not train")

    def evaluate(self, site: SiteTrainer, request):
        raise BadRequest(f"{self.name}: does not evaluate")

    def query(self, site: SiteTrainer, request):
        raise BadRequest(f"{self.name}: does not answer queries")


def round_plan_of(site: SiteTrainer, request) -> RoundPlan:
    """The trainer's plan of a train/personalize/query request, with the run's feature transform."""
    features = transform_from(getattr(request, "standardization", None), site.model_cfg)
    return RoundPlan(**request.config.fields(), features=features)


def validation_numbers(site: SiteTrainer, weights: dict, features) -> dict[str, float]:
    """A model's numbers on the site's validation split, as a train reply carries them (``val-*``)."""
    val = site.evaluate(weights, split=VAL, features=features)
    return {P.val_key(k): val.get(k, math.nan) for k in P.VAL_REPORTED}


def train_reply(site: SiteTrainer, val: dict, out: Outcome, control_delta: dict | None = None) -> P.TrainReply:
    """The reply of a trained (or declined: no update, the numbers say why) round."""
    return P.TrainReply(site=site.name, metrics={**val, **out.metrics},
                        arrays=None if out.declined else out.weights, control_delta=control_delta)
