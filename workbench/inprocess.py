"""An in-process stand-in for Flower's ``Grid``: the same site handler and round loop, no network.

Used by the benchmark (a full grid of configurations fits in one process) and by the tests. Each
message goes to a site handler (default :class:`~dicomfl.client.handler.SiteHandler`, the one the
ClientApp wraps), as a SuperNode would hand it over. ``down`` marks sites as unreachable.

Flower adapter (the one place this project reaches into Flower's internals): Flower's own
processes set :class:`flwr.supercore.task_identity.TaskIdentity` before any ``Message`` is built
(its constructor reads the run and node ids from there), and the SuperLink stamps each message's
id into ``Metadata.__dict__["_message_id"]`` when it is pushed. Outside those processes nobody does
either, so :func:`_as_flower_would` does both, the way Flower's legacy ``start_grid`` and its
``HttpGrid`` do. ``tests/test_layers.py`` fails when Flower stops needing this.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from flwr.app import Context, Message, RecordDict

Handler = Callable[[Message, Context], Message]


def _task_identity() -> None:
    """Give this process a task identity if Flower has not (Message() needs one)."""
    from flwr.supercore.task_identity import TaskIdentity

    for attr in ("run_id", "node_id", "task_id"):
        if getattr(TaskIdentity, f"_{attr}") is None:
            setattr(TaskIdentity, attr, 1)


def _as_flower_would(msg: Message, fallback_id: str) -> None:
    """Stamp a message id where the SuperLink would on push (Flower uses the object id; any unique id does)."""
    msg.metadata.__dict__["_message_id"] = msg.metadata.message_id or fallback_id


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
        _task_identity()
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
            _as_flower_would(msg, f"inproc-{len(self.sent)}-{i}")
            self.sent.append(msg)
            reply = self.app(msg, self.nodes[node])
            self.received.append(reply)
            replies.append(reply)
        return replies
