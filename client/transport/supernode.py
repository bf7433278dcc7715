"""``python -m dicomfl.client.transport.supernode --idle-s S [--wake PATH] -- <flower-supernode arguments>``:
Flower's SuperNode, with its idle wait capped at ``S`` seconds (``federation.idle_poll_s``), a
short back-off for message objects not yet at the SuperLink, and (``--wake``) a wake-up for the
site's warm worker each time a message has arrived.

Flower's SuperNode (flwr 1.41, ``flwr/supernode/start_client_internal.py``) asks the SuperLink
for a message and, when there is none, sleeps a fixed 3 s (``time.sleep(3)``) before asking
again; while a message is being handled it looks for the reply every 0.5 s. No flag, config key
or environment variable changes either. A round has a train phase and, with cross-site
evaluation, an evaluate phase; each waits up to 3 s for every site to notice its message, so a
small round costs several seconds of nothing.

The SuperNode takes a message's head from the SuperLink and then pulls its objects; an object
the coordinator has not finished pushing is asked for again after 1 s, then 2, 4, ... (Flower's
``pull_objects`` defaults). The coordinator pushes one site's message after another, so with
many sites the later objects are often not there yet at the first ask.

This shell runs Flower's own ``flower-supernode`` entry point unchanged, after giving that one
module (:func:`.flower_adapter.patch_supernode_waits`) a ``time`` whose ``sleep`` waits at most
``S`` seconds for its idle wait and at most :data:`LOCAL_WAIT_S` for its 0.5 s looks at its own
memory for the worker's reply (no request, so they can be short), and a ``pull_objects`` whose
back-off starts at 0.05 s and stops growing at ``S``, with no limit on the number of asks and at
most :data:`PULL_MAX_S` in all (the same function, other keyword defaults). Nothing else in
Flower sees either. The cost: an idle site asks the SuperLink for messages ``1/S`` times a second
instead of once every 3 s (a small unary request; at the default 0.25 s, 4 a second per site).
That load is on the SuperLink, and grows with the number of sites (see the README's round
overhead notes).

With ``--wake PATH`` the shell also has the loop call :func:`.wakeup.wake` each time it has
stored a message and pulled all of its objects (:func:`.flower_adapter.call_after_stored_message`):
one datagram goes to the worker's wake-up socket at ``PATH`` (never blocks, never raises), and
the worker asks for the task at once instead of at its next poll (:class:`.wakeup.Wakeup`).

The adapter checks that the module still has the shape it was written for (a module-level
``time``, the function that runs the loop, a ``pull_objects`` taking the back-off keywords). If
a later Flower changes it, the SuperNode runs with Flower's own waits and the site log says so;
nothing fails.
"""

from __future__ import annotations

import os
import sys
import time

from . import flower_adapter as flower
from .wakeup import wake


PULL_FIRST_BACKOFF_S = 0.05  # the first wait before asking the SuperLink again for an object not there yet
#: How long the SuperNode waits in all for a message's objects that are not at the SuperLink yet
#: (the coordinator pushes them there, next to it, in well under a minute; Flower's own limit is
#: 500 asks or 2 h, during which the SuperNode handles nothing else).
PULL_MAX_S = 600.0


#: The loop's waits shorter than a second (0.5 s in flwr 1.41) look at the SuperNode's own memory
#: (a reply from the worker, an object's content): no request to the SuperLink, so they can be short.
LOCAL_WAIT_S = 0.02


class _CappedClock:
    """``time`` for one module: the same functions, with a ``sleep`` of a second or more (the idle
    wait, after which the SuperNode asks the SuperLink again) at most ``cap`` seconds, and a shorter
    one (a look at its own memory) at most :data:`LOCAL_WAIT_S`."""

    def __init__(self, cap: float) -> None:
        self.cap = float(cap)

    def sleep(self, seconds: float) -> None:
        seconds = float(seconds)
        time.sleep(min(seconds, self.cap if seconds >= 1.0 else LOCAL_WAIT_S))

    def __getattr__(self, name: str):
        return getattr(time, name)


def cap_idle_wait(cap: float) -> bool:
    """Cap the SuperNode loop's waits at ``cap`` seconds, and start its object pulls' back-off at
    ``cap``; False (and nothing changed) if this Flower's SuperNode module does not have the
    expected shape."""
    # No limit on the number of asks (500 at this back-off would be about 2 min), PULL_MAX_S in all.
    return flower.patch_supernode_waits(_CappedClock(cap), {
        "initial_backoff": min(PULL_FIRST_BACKOFF_S, cap), "backoff_cap": cap, "max_tries_per_object": None,
        "max_time": PULL_MAX_S})


def wake_worker_on_message(path: str) -> bool:
    """After the loop has stored a message and its objects, wake the worker at ``path``; False (and
    nothing changed) if this Flower's SuperNode module does not have the expected function."""
    return flower.call_after_stored_message(lambda: wake(path), marker=path)


USAGE = "usage: python -m dicomfl.client.transport.supernode --idle-s SECONDS [--wake PATH] -- <flower-supernode arguments>"


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    wake_path = None
    if len(args) >= 5 and args[2] == "--wake" and args[4] == "--":
        wake_path = args[3]
        args = args[:2] + args[4:]
    if len(args) < 3 or args[0] != "--idle-s" or args[2] != "--" or (
            wake_path is not None and not (os.path.isabs(wake_path) and wake_path.strip() == wake_path)):
        print(USAGE, file=sys.stderr)
        return 2
    try:
        cap = float(args[1])
    except ValueError:
        cap = -1.0
    if not 0.05 <= cap <= 3.0:  # federation.idle_poll_s's own bounds
        print("dicomfl supernode: error: --idle-s must be a number of seconds in [0.05, 3]", file=sys.stderr)
        return 2
    if cap_idle_wait(cap):
        print(f"dicomfl supernode: idle wait capped at {cap:g} s, also between asks for a message's objects",
              file=sys.stderr, flush=True)
    else:
        print("dicomfl supernode: this Flower's SuperNode loop is not the one dicomfl knows; keeping its own "
              "3 s idle wait", file=sys.stderr, flush=True)
    if wake_path is not None:
        if wake_worker_on_message(wake_path):
            print("dicomfl supernode: wakes the worker when a message has arrived", file=sys.stderr, flush=True)
        else:
            print("dicomfl supernode: this Flower's SuperNode loop is not the one dicomfl knows; the worker "
                  "finds its tasks by asking", file=sys.stderr, flush=True)
    return flower.run_flower_supernode(args[3:])


if __name__ == "__main__":
    sys.exit(main())
