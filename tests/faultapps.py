"""Test-side ClientApps that misbehave on purpose (fault injection lives here, not in dicomfl).

``tests.faultapps:app`` is dicomfl's ClientApp behind a Flower mod. On a site daemon started with
``DICOMFL_TESTS_FAULT=nan-weights`` in its environment (and this repository on PYTHONPATH), the
mod replaces the weights of every train reply with NaN; on every other site it changes nothing.
"""

from __future__ import annotations

import os

import numpy as np
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from dicomfl.client import app as dicomfl_app
from dicomfl.common import protocol as P

FAULT_ENV = "DICOMFL_TESTS_FAULT"
FAULTY_CLIENTAPP = "tests.faultapps:app"


def nan_weights(msg: Message, context: Context, call_next) -> Message:
    reply = call_next(msg, context)
    if os.environ.get(FAULT_ENV) == "nan-weights" and reply.has_content() and P.ARRAYS in reply.content:
        weights = P.from_record(reply.content[P.ARRAYS])
        reply.content[P.ARRAYS] = P.to_record({k: np.full_like(v, np.nan) for k, v in weights.items()})
    return reply


app = ClientApp(mods=[nan_weights])
app.train()(dicomfl_app.train)
app.evaluate()(dicomfl_app.evaluate)
