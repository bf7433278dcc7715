"""SCAFFOLD's site algorithm: local steps on the corrected gradient and the change of the site's
control variate (the control's checks and storage: :mod:`dicomfl.client.scaffold`)."""

from __future__ import annotations

from dicomfl.common import protocol as P
from dicomfl.common.errors import BadRequest

from dicomfl.client.scaffold import ScaffoldRound
from dicomfl.client.trainer import SiteTrainer
from .base import SiteAlgorithm, round_plan_of, train_reply, validation_numbers


def has_control(request) -> bool:
    """A train request of a SCAFFOLD round: it carries the server control."""
    return getattr(request, "control", None) is not None


class Scaffold(SiteAlgorithm):
    """Check the server control (and the optimizer) before any work, then train and send ``delta_c_i``."""

    name = "scaffold"

    def train(self, site: SiteTrainer, request: P.TrainRequest) -> P.TrainReply:
        plan = round_plan_of(site, request)
        scaffold = ScaffoldRound.open(site, request.control)
        if plan.local_norm:
            raise BadRequest(f"config {P.LOCAL_NORM}: not in a SCAFFOLD round")
        val = validation_numbers(site, request.arrays, plan.features)
        out, delta_c = scaffold.train(request.arrays, plan)
        return train_reply(site, val, out, control_delta=delta_c)
