"""The probe both Flower adapters share before they change one of Flower's module attributes.

The site's adapter (:mod:`dicomfl.client.transport.flower_adapter`) and the coordinator's
(:mod:`dicomfl.server.flower_adapter`) each give one Flower module a ``pull_objects`` that is
Flower's own function called with other keyword defaults (a shorter back-off for objects not yet
at the SuperLink). Before either does, it checks that the function is there and takes the
keywords it means to set; if not (another Flower), it changes nothing and says so. This module
holds that check and nothing of Flower itself: no Flower import, no Flower name, so it holds
whatever Flower version is installed. Which module and which keywords is the adapters' business.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable


def takes_keywords(func: object, names: Iterable[str]) -> bool:
    """Whether ``func`` is callable and its signature has a parameter for each of ``names``
    (False for anything whose signature cannot be read)."""
    if not callable(func):
        return False
    try:
        params = inspect.signature(func).parameters
    except (TypeError, ValueError):
        return False
    return set(names) <= set(params)


def original(func: object) -> object:
    """The function under a wrapper that an adapter installed earlier (a ``functools.partial`` or
    an adapter's own wrapper, both of which keep it as ``.func``); ``func`` itself otherwise."""
    inner = getattr(func, "func", None)
    return inner if callable(inner) and getattr(func, "_dicomfl_wrapper", False) else func


def module_function_taking(module: object, name: str, keywords: Iterable[str]) -> Callable | None:
    """``module.<name>`` (unwrapped, see :func:`original`) if it takes ``keywords``; None if the
    module has no such function or it takes other parameters (nothing is changed either way)."""
    func = original(getattr(module, name, None))
    return func if takes_keywords(func, keywords) else None
