"""The Flower ClientApp: a thin shell that hands each message to the site's handler.

Started by a site daemon (``dicomfl site start``), whose node config names the site's warm worker
(``worker-socket=...``), it is a forwarder (:mod:`dicomfl.client.transport.forwarder`): the message goes to
the worker process that holds torch, the site's data and the trainers, and the worker's reply comes
back. This module then imports neither torch nor the data path, so each per-message process Flower
starts costs only Flower's own start-up.

Without ``worker-socket`` in the node config (a SuperNode started by hand, or a test calling the
app in process) the message is handled here, by a :class:`~dicomfl.client.handler.SiteHandler`
(imported on first use). What the site answers, and what may cross the site boundary, is decided
in :mod:`dicomfl.client.handler` and :mod:`dicomfl.common.protocol` either way.
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from dicomfl.common import protocol as P

from .transport import forwarder

app = ClientApp()
_in_process = None


def handle(msg: Message, context: Context) -> Message:
    """The site's reply: from the warm worker when the node config names one, else made here."""
    if forwarder.WORKER_SOCKET in context.node_config:
        return forwarder.forward(msg, context)
    return _local_handler().handle(msg, context)


def _local_handler():
    global _in_process
    if _in_process is None:
        from .handler import SiteHandler

        _in_process = SiteHandler()
    return _in_process


@app.train()
def train(msg: Message, context: Context) -> Message:
    return handle(msg, context)


@app.train(P.PERSONALIZE)
def personalize(msg: Message, context: Context) -> Message:
    """``train.personalize``: fine-tune the final global model (:mod:`dicomfl.client.personal`)."""
    return handle(msg, context)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return handle(msg, context)


@app.query(P.FEDSTATS)
def fedstats(msg: Message, context: Context) -> Message:
    """``query.fedstats``: the site's feature statistics before round 1 (:mod:`dicomfl.client.fedstats`)."""
    return handle(msg, context)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """A plain ``query``: how a coordinator of the previous release asks for the feature
    statistics (accepted for one release)."""
    return handle(msg, context)
