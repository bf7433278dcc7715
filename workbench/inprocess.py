"""An in-process stand-in for Flower's ``Grid``: the same site handler and round loop, no network.

Used by the benchmark (a full grid of configurations fits in one process) and by the tests. Each
message goes to a site handler (default :class:`~dicomfl.client.handler.SiteHandler`, the one the
ClientApp wraps), as a SuperNode would hand it over. ``down`` marks sites as unreachable.

Flower's own processes set a task identity before any ``Message`` is built, and the SuperLink
stamps each message's id when it is pushed; outside them nobody does, so this grid does both
through :mod:`dicomfl.workbench.flower_adapter` (the workbench's one place that reaches into
Flower's internals).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from flwr.app import Context, Message, RecordDict

from .flower_adapter import stamp_message_id, task_identity

Handler = Callable[[Message, Context], Message]


class InProcessGrid:
    """A Grid whose nodes are site handlers in this process.

    Parameters
    ----------
    site_configs : list of Path
        One node per entry; its node config is ``site-config=<entry>`` (a site.yaml path, or a key
        the handler's resolver knows).
    handler : callable, optional
        ``(message, context) -> reply``; default: a :class:`SiteHandler` with ``resolver``.
    resolver : SiteResolver, optional
        How the default handler finds a site (e.g. :class:`~dicomfl.client.handler.InMemorySites`).
    """

    def __init__(self, site_configs: list[Path], handler: Handler | None = None, resolver=None) -> None:
        task_identity()
        if handler is None:
            from dicomfl.client.handler import SiteHandler

            handler = SiteHandler(resolver).handle
        self.app = handler
        self.nodes = {1000 + i: Context(run_id=1, node_id=1000 + i, node_config={"site-config": str(p)},
                                        state=RecordDict(), run_config={})
                      for i, p in enumerate(site_configs)}
        self.down: set[int] = set()
        self.sent: list[Message] = []
        self.received: list[Message] = []

    def trusted_names(self) -> dict[int, str]:
        """Node id -> site name, as this grid assigned them (the coordinator started these nodes,
        so the names are its own, not what the replies claim)."""
        from dicomfl.common.config import load_site_config

        sims = getattr(getattr(self.app, "__self__", None), "resolver", None)
        names = {}
        for node, ctx in self.nodes.items():
            key = str(ctx.node_config["site-config"])
            held = getattr(sims, "sites", {}).get(key)
            names[node] = held.name if held is not None else load_site_config(Path(key), check_files=False).site.name
        return names

    def get_node_ids(self):
        return [n for n in self.nodes if n not in self.down]

    def send_and_receive(self, messages, *, timeout: float | None = None):
        replies = []
        for i, msg in enumerate(messages):
            node = msg.metadata.dst_node_id
            if node in self.down or node not in self.nodes:
                continue
            stamp_message_id(msg, f"inproc-{len(self.sent)}-{i}")
            self.sent.append(msg)
            reply = self.app(msg, self.nodes[node])
            self.received.append(reply)
            replies.append(reply)
        return replies
