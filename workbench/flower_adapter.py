"""The in-process grid's one place that reaches into Flower's internals.

The benchmark and the tests run rounds without Flower's processes
(:class:`~dicomfl.workbench.inprocess.InProcessGrid`), so they must do two things those processes
do. ``tests/test_layers.py`` fails when a Flower internal is imported anywhere else in the
workbench, and when Flower stops needing either (a ``Message`` can be built in a bare process, or
ids are kept elsewhere): then drop or move this module.

Written against flwr 1.41 (``pyproject.toml`` allows ``>=1.41,<1.43``); unchanged in flwr 1.42.
"""

from __future__ import annotations


def task_identity() -> None:
    """Give this process a task identity if Flower has not (``Message()`` needs one).

    Why: Flower's own processes set ``flwr.supercore.task_identity.TaskIdentity`` before any
    ``Message`` is built (its constructor reads the run and node ids from there); outside them
    nobody does, as Flower's legacy ``start_grid`` does for its own. Relies on (flwr 1.41):
    ``TaskIdentity``'s class attributes ``run_id``/``node_id``/``task_id``, set through their
    setters and kept in ``_run_id``/``_node_id``/``_task_id`` (None until set)."""
    from flwr.supercore.task_identity import TaskIdentity

    for attr in ("run_id", "node_id", "task_id"):
        if getattr(TaskIdentity, f"_{attr}") is None:
            setattr(TaskIdentity, attr, 1)


def stamp_message_id(msg, fallback_id: str) -> None:
    """Stamp a message id where the SuperLink would on push (Flower uses the object id; any unique
    id does). Why: a reply is matched to its message by that id, and only the SuperLink sets it
    (``HttpGrid`` reads it back the same way). Relies on (flwr 1.41): ``Metadata`` keeping it in
    ``__dict__["_message_id"]`` behind a read-only ``message_id`` property."""
    msg.metadata.__dict__["_message_id"] = msg.metadata.message_id or fallback_id
