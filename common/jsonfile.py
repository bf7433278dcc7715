"""JSON files that someone else may have written (a run folder, a state file), read with bounds.

:func:`read_json` reads at most ``max_bytes``, parses, and refuses a document nested deeper than
``max_depth`` (an array of 200,000 arrays would otherwise end in a ``RecursionError`` traceback
here or in whatever walks it next). Every refusal is one :class:`UnreadableJson` line naming the
file and saying why, never quoting the content.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .errors import DicomflError, printable

#: The largest JSON file read (run folders' metrics and state files are kilobytes).
MAX_JSON_BYTES = 64 << 20
#: The deepest nesting accepted (the files dicomfl writes nest at most a handful of levels).
MAX_JSON_DEPTH = 64


class UnreadableJson(DicomflError, ValueError):
    """A JSON file that cannot be used: missing, too large, not JSON, or nested too deeply.
    Also a ``ValueError``, so code that treated a bad file as "none" keeps doing so."""


def depth(doc: Any) -> int:
    """The nesting depth of a parsed JSON document (a scalar is 0, ``[]`` is 1), without recursion."""
    deepest, stack = 0, [(doc, 0)]
    while stack:
        node, d = stack.pop()
        if isinstance(node, dict):
            node = node.values()
        elif not isinstance(node, list):
            continue
        d += 1
        deepest = max(deepest, d)
        stack.extend((child, d) for child in node if isinstance(child, (dict, list)))
    return deepest


def read_json(path: Path, *, max_bytes: int = MAX_JSON_BYTES, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """The parsed content of the JSON file at ``path``.

    Raises
    ------
    UnreadableJson
        One line naming the file: it cannot be read, is larger than ``max_bytes``, is not JSON
        (the exception's type only), or nests deeper than ``max_depth``.
    """
    where = printable(str(path))
    try:
        with open(path, "rb") as fh:
            raw = fh.read(max_bytes + 1)
    except OSError as exc:
        raise UnreadableJson(f"{where}: cannot read ({type(exc).__name__})") from None
    if len(raw) > max_bytes:
        raise UnreadableJson(f"{where}: cannot read (larger than {max_bytes:,} bytes)")
    try:
        doc = json.loads(raw)
    except RecursionError:
        raise UnreadableJson(f"{where}: cannot read (nested deeper than {max_depth} levels)") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        raise UnreadableJson(f"{where}: cannot read ({type(exc).__name__})") from None
    if depth(doc) > max_depth:
        raise UnreadableJson(f"{where}: cannot read (nested deeper than {max_depth} levels)")
    return doc


__all__ = ["MAX_JSON_BYTES", "MAX_JSON_DEPTH", "UnreadableJson", "depth", "read_json"]
