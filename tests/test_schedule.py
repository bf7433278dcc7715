"""The learning-rate schedule: the coordinator sends each round's factor, the site checks it and
scales its own learning rate by it (never above train.lr). That the factors reach the sites in a
real run is checked in test_federation.py (the FedProx run uses the cosine schedule)."""

from __future__ import annotations

import pytest
from flwr.app import ConfigRecord

from dicomfl.client.handler import round_plan
from dicomfl.common.errors import BadRequest
from dicomfl.server.federation import lr_scale


def test_cosine_goes_from_one_to_the_floor():
    got = [lr_scale("cosine", r, 5, 0.1) for r in range(1, 6)]
    assert got[0] == 1.0 and got[-1] == pytest.approx(0.1) and all(a > b for a, b in zip(got, got[1:]))
    assert lr_scale("constant", 3, 5, 0.1) == 1.0 and lr_scale("cosine", 0, 5, 0.1) == 1.0


@pytest.mark.parametrize("bad", [2.0, 0.0, -1.0, float("nan"), "1", True])
def test_a_site_refuses_a_factor_that_would_raise_or_zero_its_learning_rate(bad):
    with pytest.raises(BadRequest):
        round_plan(ConfigRecord({"run": "r", "lr-scale": bad}))
    assert round_plan(ConfigRecord({"run": "r", "lr-scale": 0.5})).lr_scale == 0.5
