"""The coordinator's one place that reaches into Flower's internals.

Everything the coordinator needs of Flower beyond its public API (``flwr.app``,
``flwr.serverapp``, the names ``flwr.common`` exports) is here: the grid module's ``pull_objects``
that a round replaces while it is out (:mod:`.gridpoll`), and the SuperLink's public error text
that ``flwr supernode register`` prints (:mod:`.flwrcli`). ``tests/test_layers.py`` fails when a
Flower internal is imported anywhere else on the coordinator's side; ``tests/test_flower_adapter.py``
fails when the installed Flower no longer has what a function here relies on.

Written against flwr 1.41 (``pyproject.toml`` allows ``>=1.41,<1.43``); each piece is unchanged
in flwr 1.42.
"""

from __future__ import annotations

import sys
import time

from dicomfl.common.flowerpatch import module_function_taking

#: The keywords of Flower's ``pull_objects`` (``flwr.supercore.inflatable.inflatable_utils``)
#: that :func:`quick_object_pulls` sets: its back-off and its limits.
PULL_KEYWORDS = ("initial_backoff", "backoff_cap", "max_time", "max_tries_per_object")
FIRST_OBJECT_BACKOFF_S = 0.05  # the first wait before asking again for a reply's object not there yet


# ------------------------------------------------------------- the grid's pulls of reply objects
class _QuickPulls:
    """Flower's ``pull_objects`` with a short back-off, no limit on the number of asks, and, while
    a round is out, an overall limit that ends at the round's ``deadline`` (``time.monotonic()``)
    however many replies the grid pulls one after the other."""

    _dicomfl_wrapper = True  # common.flowerpatch.original() finds Flower's function under it

    def __init__(self, func, cap: float) -> None:
        self.func, self.cap, self.deadline = func, cap, None

    def __call__(self, *args, **kwargs):
        kwargs.setdefault("initial_backoff", min(FIRST_OBJECT_BACKOFF_S, self.cap))
        kwargs.setdefault("backoff_cap", self.cap)
        kwargs.setdefault("max_tries_per_object", None)
        if self.deadline is not None:
            kwargs.setdefault("max_time", max(0.1, self.deadline - time.monotonic()))
        return self.func(*args, **kwargs)


def quick_object_pulls(grid, cap: float, deadline: float | None = None) -> _QuickPulls | None:
    """Make ``grid``'s module pull objects not yet at the SuperLink again after 0.05 s, doubling up
    to ``cap`` s (instead of 1 s up to 10 s), with no limit on the number of asks and, if
    ``deadline`` is given, none after it (else Flower's 2 h). Returns what was installed (None:
    the module does not have the expected shape; nothing was changed). Undo with
    :func:`restore_object_pulls`.

    Why: a reply's head reaches the SuperLink before its objects, and Flower's grid (flwr 1.41,
    ``HttpGrid.pull_messages`` in ``flwr/superlink/grid/http_grid.py``) waits for an object that
    is not there yet with ``pull_objects``' defaults (1 s, then 2, 4, ...; no option), which adds
    seconds to a round for objects that arrive milliseconds later. Replacing the grid module's own
    ``pull_objects`` name changes it for that grid only; Flower's function, for every other user,
    stays. Relies on (flwr 1.41): the grid's module imports ``pull_objects`` by name and looks it
    up on each pull, and the function takes :data:`PULL_KEYWORDS`.
    """
    module = sys.modules.get(type(grid).__module__)
    pull = module_function_taking(module, "pull_objects", PULL_KEYWORDS)
    if pull is None:
        return None
    quick = _QuickPulls(pull, max(float(cap), 0.01))
    quick.deadline = deadline
    module.pull_objects = quick
    return quick


def restore_object_pulls(grid) -> None:
    """Give ``grid``'s module back Flower's own ``pull_objects``."""
    module = sys.modules.get(type(grid).__module__)
    pull = getattr(module, "pull_objects", None)
    if isinstance(pull, _QuickPulls):
        module.pull_objects = pull.func


# --------------------------------------------------------------- the SuperLink's error text
def public_key_in_use_message() -> str:
    """The SuperLink's public message for a SuperNode key that is registered already (the text
    ``flwr supernode register`` prints; its JSON output has no error code). Relies on (flwr 1.41):
    ``ApiErrorCode.PUBLIC_KEY_ALREADY_IN_USE`` in Flower's error catalog."""
    from flwr.supercore.error.base import ApiErrorCode
    from flwr.supercore.error.catalog import API_ERROR_MAP

    return API_ERROR_MAP[ApiErrorCode.PUBLIC_KEY_ALREADY_IN_USE].public_message
