"""The Flower ClientApp: a thin shell over :class:`~dicomfl.client.handler.SiteHandler`.

The SuperNode's node config names the site config (``site-config=/path/site.yaml``). What the
site answers, and what may cross the site boundary, is decided in :mod:`dicomfl.client.handler`
and :mod:`dicomfl.common.protocol`.
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from .handler import SiteHandler

app = ClientApp()
handler = SiteHandler()


@app.train()
def train(msg: Message, context: Context) -> Message:
    return handler.handle(msg, context)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return handler.handle(msg, context)
