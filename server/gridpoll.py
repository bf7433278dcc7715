"""Send a round's messages and collect the replies at the speed of the work.

Flower's ``HttpGrid.send_and_receive`` asks the SuperLink for replies every 3 s (fixed in flwr
1.41), so a round that is done in 1 s still takes 3. :func:`send_and_collect` pushes the messages
with the Grid's public ``push_messages`` and pulls with ``pull_messages`` every ``poll_interval``
seconds (the run config's ``run.poll_interval_s``, default 0.25), yielding each reply as it comes,
until every message has its reply or ``timeout`` seconds have passed. A grid without push/pull
(the in-process grid of the benchmark and the tests) is asked with its own ``send_and_receive``.

Each message goes out in dicomfl's compact form (:mod:`dicomfl.common.wire`, unless the run sets
``run.compact_messages: false``): 3 Flower objects instead of about 10, each of which is a request
at every hop. The sites answer in the same form; ``server/replies.py`` reads it where it checks
the reply.

A reply's head reaches the SuperLink before its objects (the SuperNode sends the head, then
pushes the objects), and Flower's grid (flwr 1.41, ``HttpGrid.pull_messages``) waits for an object
that is not there yet 1 s, then 2, 4, ... (``pull_objects``' defaults; no option): seconds added
to every round for objects that arrive milliseconds later. While a round is out,
:func:`send_and_collect` gives the grid's module a ``pull_objects`` whose back-off starts at
0.05 s and never exceeds the poll interval (Flower's own function, called with other keyword
defaults; this process only; :func:`.flower_adapter.quick_object_pulls`), and gives Flower's own
back when the round's replies are in. If Flower's module does not have that shape, nothing is
changed.

How long a reply's objects are waited for is the round's: every call's limit ends at the round's
timeout (Flower's own: up to 500 asks per object, or 2 h per reply). The grid pulls the replies
of one pull one after the other; each gets what is left of the round, so several sites that
stall do not add up. A reply whose objects are still uploading over a slow link is not given up
early, and a site that sends a reply's head and never its objects cannot hold the coordinator
past the round's timeout: Flower
returns an error reply of its own in place of that reply (``MESSAGE_UNAVAILABLE``, from the
SuperLink's node, not the site's). :func:`send_and_collect` hands the round that error as the
site's own (an error reply to the site's message, from the site's node), so the round names the
site that sent no objects. Only an error reply can be re-addressed so: the SuperLink accepts a
reply only from the node its message went to, so a reply from any other node is Flower's own.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator

from flwr.app import Message

from dicomfl.common.wire import is_packed, pack

from .flower_adapter import quick_object_pulls, restore_object_pulls

log = logging.getLogger("dicomfl.server")


MAX_BACKOFF_S = 5.0  # the longest wait between pulls after failed ones


def _as_the_sites(reply: Message, sent: Message | None) -> Message:
    """``reply``, or, if it is Flower's own error reply in place of a site's (from another node
    than the one ``sent`` went to), the same error as a reply from that site."""
    if sent is None or not reply.has_error() or reply.metadata.src_node_id == sent.metadata.dst_node_id:
        return reply
    log.warning("no usable reply from node %d (Flower error %s); counted as that site's error",
                sent.metadata.dst_node_id, reply.error.code)
    return Message(error=reply.error, reply_to=sent)


def send_and_collect(grid, messages: Iterable[Message], *, timeout: float | None,
                     poll_interval: float = 0.25, compact: bool = True) -> Iterator[Message]:
    """Push ``messages`` and yield their replies as they arrive, for at most ``timeout`` seconds
    (None: until every message has its reply, as Flower's ``send_and_receive``). A failed pull is
    retried, after a wait that doubles with each failure in a row (at most :data:`MAX_BACKOFF_S`).
    ``compact``: send each message's content in dicomfl's compact form (:mod:`dicomfl.common.wire`);
    the replies come back in it and are read where they are checked (``server/replies.py``)."""
    push = getattr(grid, "push_messages", None)
    pull = getattr(grid, "pull_messages", None)
    if not (callable(push) and callable(pull)):
        yield from grid.send_and_receive(list(messages), timeout=timeout)
        return
    base = max(0.01, float(poll_interval))
    messages = list(messages)
    for m in messages if compact else ():
        if m.has_content() and not is_packed(m.content):
            m.content = pack(m.content)
    sent = {mid: m for mid, m in zip(push(messages), messages) if mid}  # Flower marks one it could not push with None
    pending = set(sent)
    deadline = None if timeout is None else time.monotonic() + timeout
    # A reply's objects are waited for until the round's end, no longer; Flower's own afterwards.
    quick_object_pulls(grid, base, deadline)
    try:
        yield from _collect(pull, sent, pending, deadline, base)
    finally:
        restore_object_pulls(grid)


def _collect(pull, sent: dict, pending: set, deadline: float | None, base: float) -> Iterator[Message]:
    interval = base
    while pending:
        try:
            replies = list(pull(pending))
            interval = base
        except Exception as exc:  # noqa: BLE001 - a busy SuperLink (e.g. "database is locked") fails one pull
            interval = min(max(interval, base) * 2, max(MAX_BACKOFF_S, base))
            log.warning("pulling replies failed (%s); asking again in %.1f s", type(exc).__name__, interval)
            replies = []
        for reply in replies:
            pending.discard(reply.metadata.reply_to_message_id)
            yield _as_the_sites(reply, sent.get(reply.metadata.reply_to_message_id))
        if not pending:
            return
        now = time.monotonic()
        if deadline is not None and now >= deadline:
            return
        time.sleep(interval if deadline is None else min(interval, deadline - now))
