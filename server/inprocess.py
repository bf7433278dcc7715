"""An in-process stand-in for Flower's ``Grid``: the same ClientApp and round loop, no network.

Used by the benchmark (a full grid of configurations fits on 2 CPU cores) and by unit tests.
Each message goes to the real ClientApp object (``dicomfl.client.app.app``), as a SuperNode would
hand it over. ``down`` marks sites as unreachable.
"""

from __future__ import annotations

from pathlib import Path

from flwr.app import Context, Message, RecordDict


class InProcessGrid:
    def __init__(self, site_configs: list[Path], client_app=None) -> None:
        from flwr.supercore.task_identity import TaskIdentity

        for attr in ("run_id", "node_id", "task_id"):  # what a real ServerApp process has set
            if getattr(TaskIdentity, f"_{attr}") is None:
                setattr(TaskIdentity, attr, 1)
        if client_app is None:
            from dicomfl.client.app import app as client_app
        self.app = client_app
        self.nodes = {1000 + i: Context(run_id=1, node_id=1000 + i, node_config={"site-config": str(p)},
                                        state=RecordDict(), run_config={})
                      for i, p in enumerate(site_configs)}
        self.down: set[int] = set()
        self.sent: list[Message] = []
        self.received: list[Message] = []

    def get_node_ids(self):
        return [n for n in self.nodes if n not in self.down]

    def send_and_receive(self, messages, *, timeout: float | None = None):
        replies = []
        for i, msg in enumerate(messages):
            node = msg.metadata.dst_node_id
            if node in self.down or node not in self.nodes:
                continue
            msg.metadata.__dict__["_message_id"] = msg.metadata.message_id or f"inproc-{len(self.sent)}-{i}"
            self.sent.append(msg)
            reply = self.app(msg, self.nodes[node])
            self.received.append(reply)
            replies.append(reply)
        return replies
