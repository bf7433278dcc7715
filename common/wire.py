"""The compact wire form of a message's content: three Flower objects where there were a dozen.

Flower (1.41) moves a message as a tree of objects: the Message, its RecordDict, each record,
each Array and each chunk of an Array. Every object is a request of its own at every hop: the
coordinator pushes each to the SuperLink, the SuperNode pulls each from it, the site's worker
pulls each from the SuperNode, and the reply goes back the same way. A train reply (the global
and local models, two metric records and the site's name) is 11 objects, its message 9, and a
round's overhead grows with the objects it moves (``benchmarks/round_bench.py``; the numbers are
in benchmarks/results/rounds-2026-11-23.md).

:func:`pack` puts a RecordDict into one ConfigRecord (``dicomfl-wire``):

* ``v``: the form's version (1);
* ``manifest``: JSON, the records in order: ``{"records": [{"name", "kind", "arrays"}], "inline"}``
  where ``kind`` is ``arrays``, ``metrics`` or ``config`` and, for inline arrays, ``arrays`` lists
  ``[key, dtype, shape]``;
* ``<i>|<key>``: the value of key ``key`` of record number ``i`` (metric and config records);
* ``blob``: every array's bytes, in the manifest's order, when they are at most
  :data:`INLINE_MAX_BYTES` in all (a packed message is then 3 objects: Message, RecordDict,
  ConfigRecord).

Larger arrays stay Flower Arrays, in one ArrayRecord (``dicomfl-wire-arrays``, keys ``<i>|<key>``):
Flower still chunks them, and the SuperLink still stores an Array that several messages share
(the global model sent to every site) once. Inline, a shared model is sent once per message:
that costs at most :data:`INLINE_MAX_BYTES` a message, against a few requests saved at each hop.

:func:`unpack` gives back exactly the RecordDict that was packed (values, dtypes, shapes, order),
or raises :class:`WireError` with a reason that names a record by its number and never quotes a
key or a value: a site's reply and a coordinator's message are both untrusted. The records it
gives back are then checked as they always were (``server/replies.py`` at the coordinator,
``client/handler.py`` at the site); this module only makes sure reading the form is bounded.

The in-process path (benchmark, tests) never packs: packing is the deployment transport's
(``server/gridpoll.py`` packs what the coordinator sends; the site's handler answers a packed
message with a packed reply).
"""

from __future__ import annotations

import json
import math
from typing import Any

WIRE = "dicomfl-wire"
WIRE_ARRAYS = "dicomfl-wire-arrays"
VERSION = 1
INLINE_MAX_BYTES = 1 << 20  # arrays up to 1 MiB in all travel inside the ConfigRecord
MAX_MANIFEST_CHARS = 1 << 20
MAX_RECORDS = 4096
MAX_ARRAYS = 10_000
MAX_NAME_CHARS = 1 << 16
MAX_DIMS = 8
DTYPES = frozenset({"<f4", "<f8", "<f2", "<i8", "<i4", "<i2", "|i1", "|u1", "|b1"})
KINDS = ("arrays", "metrics", "config")
_FIXED = frozenset({"v", "manifest", "blob"})


class WireError(ValueError):
    """A content that is not a well-formed compact form. The message names no key and no value."""


def is_packed(content: Any) -> bool:
    """Whether ``content`` (a RecordDict) is in the compact form."""
    try:
        return WIRE in content
    except Exception:  # noqa: BLE001 - not a mapping: not packed
        return False


def pack(content):
    """``content`` (a RecordDict) in the compact form (a new RecordDict; ``content`` is unchanged)."""
    import numpy as np
    from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

    records, scalars, arrays = [], {}, []
    for i, (name, rec) in enumerate(content.items()):
        if isinstance(rec, ArrayRecord):
            kind = "arrays"
            arrays.extend((i, k, a) for k, a in rec.items())
        elif isinstance(rec, MetricRecord):
            kind = "metrics"
        elif isinstance(rec, ConfigRecord):
            kind = "config"
        else:
            raise TypeError(f"record {i}: {type(rec).__name__} has no compact form")
        entry = {"name": name, "kind": kind}
        if kind != "arrays":
            scalars.update({f"{i}|{k}": v for k, v in rec.items()})
        records.append(entry)
    # Inline only what unpack reads inline (the form's dtypes and dimensions, 1 MiB in all), decided
    # from the Arrays' own dtype and shape: a large model is not decoded just to be measured.
    dtypes = [_dtype_str(a.dtype) for _, _, a in arrays]
    inline = (all(d in DTYPES for d in dtypes) and all(len(a.shape) <= MAX_DIMS for _, _, a in arrays)
              and sum(math.prod(a.shape) * np.dtype(d).itemsize for (_, _, a), d in zip(arrays, dtypes))
              <= INLINE_MAX_BYTES)
    # C order (np.asarray keeps a 0-d array 0-d; np.ascontiguousarray would make it 1-d)
    values = [np.asarray(a.numpy(), order="C") for _, _, a in arrays] if inline else [None] * len(arrays)
    for i, entry in enumerate(records):
        if entry["kind"] == "arrays":
            entry["arrays"] = [[k, v.dtype.str, list(v.shape)] if inline else k
                               for (j, k, _), v in zip(arrays, values) if j == i]
    wire = ConfigRecord({"v": VERSION, "manifest": json.dumps({"records": records, "inline": inline},
                                                               separators=(",", ":")), **scalars})
    out = RecordDict({WIRE: wire})
    if inline:
        wire["blob"] = b"".join(v.tobytes() for v in values)
    else:
        out[WIRE_ARRAYS] = ArrayRecord({f"{i}|{k}": a for i, k, a in arrays})
    return out


def _dtype_str(name: str) -> str | None:
    """A Flower Array's dtype (numpy's name) as numpy's byte-order string, or None."""
    import numpy as np

    try:
        return np.dtype(name).str
    except TypeError:
        return None


def _manifest(wire) -> tuple[list[dict], bool]:
    text = wire.get("manifest")
    if not isinstance(text, str) or len(text) > MAX_MANIFEST_CHARS:
        raise WireError("compact form: the manifest is missing or too long")
    try:
        doc = json.loads(text)
    except (ValueError, RecursionError):
        raise WireError("compact form: the manifest is not JSON") from None
    if not isinstance(doc, dict) or set(doc) != {"records", "inline"} or not isinstance(doc["inline"], bool):
        raise WireError("compact form: the manifest does not have the form's fields")
    records = doc["records"]
    if not isinstance(records, list) or len(records) > MAX_RECORDS:
        raise WireError("compact form: the manifest's record list is not a list or too long")
    names = set()
    for i, entry in enumerate(records):
        if not isinstance(entry, dict) or entry.get("kind") not in KINDS or not _text(entry.get("name")):
            raise WireError(f"compact form: record {i} has no valid name or kind")
        if set(entry) != ({"name", "kind", "arrays"} if entry["kind"] == "arrays" else {"name", "kind"}):
            raise WireError(f"compact form: record {i} has fields other than the form's")
        if entry["name"] in names or entry["name"] in (WIRE, WIRE_ARRAYS):
            raise WireError(f"compact form: record {i}'s name is repeated or the form's own")
        names.add(entry["name"])
        if entry["kind"] == "arrays" and not isinstance(entry["arrays"], list):
            raise WireError(f"compact form: record {i}'s array list is not a list")
    if sum(len(e["arrays"]) for e in records if e["kind"] == "arrays") > MAX_ARRAYS:
        raise WireError("compact form: too many arrays")
    return records, doc["inline"]


def _text(s: Any) -> bool:
    """A non-empty, bounded string that UTF-8 (and so Flower's protobuf) can carry (JSON can carry a
    lone surrogate; protobuf cannot)."""
    if not isinstance(s, str) or not 0 < len(s) <= MAX_NAME_CHARS:
        return False
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _key(i: int, key: Any) -> str:
    if not _text(key):
        raise WireError(f"compact form: record {i} has a key that is not a short string")
    return key


def _index(text: str) -> int | None:
    """A record number written the one way pack writes it (ASCII digits, no leading zero), or None."""
    if not (text.isascii() and text.isdecimal() and len(text) <= 6 and text == str(int(text))):
        return None
    return int(text)


def _inline_arrays(records: list[dict], blob: Any) -> dict[int, dict]:
    """The inline arrays, by record number, read from ``blob`` with every size checked first."""
    import numpy as np
    from flwr.app import Array

    if not isinstance(blob, bytes):
        raise WireError("compact form: inline arrays without their bytes")
    if len(blob) > INLINE_MAX_BYTES:  # pack inlines no more; larger arrays are Flower Arrays
        raise WireError("compact form: more inline bytes than the form carries")
    plan, total = [], 0
    for i, entry in enumerate(records):
        if entry["kind"] != "arrays":
            continue
        seen = set()
        for item in entry["arrays"]:
            if not (isinstance(item, list) and len(item) == 3):
                raise WireError(f"compact form: record {i} lists an array without key, dtype and shape")
            key, dtype, shape = _key(i, item[0]), item[1], item[2]
            if key in seen:
                raise WireError(f"compact form: record {i} lists an array twice")
            seen.add(key)
            if not isinstance(dtype, str) or dtype not in DTYPES:
                raise WireError(f"compact form: record {i} has an array of a dtype the form does not carry")
            if (not isinstance(shape, list) or len(shape) > MAX_DIMS
                    or not all(type(d) is int and 0 <= d < (1 << 40) for d in shape)):
                raise WireError(f"compact form: record {i} has an array with an invalid shape")
            n = math.prod(shape) * np.dtype(dtype).itemsize
            if total + n > len(blob):  # checked before anything is allocated
                raise WireError("compact form: the arrays are larger than their bytes")
            plan.append((i, key, dtype, shape, total, n))
            total += n
    if total != len(blob):
        raise WireError("compact form: the arrays' bytes are longer than the arrays")
    out: dict[int, dict] = {}
    view = memoryview(blob)
    for i, key, dtype, shape, at, n in plan:
        try:  # e.g. a zero-size array whose other dimensions numpy cannot index
            a = np.frombuffer(view[at:at + n], dtype=np.dtype(dtype)).reshape(shape)
            out.setdefault(i, {})[key] = Array(np.array(a))  # a copy: the record owns its bytes
        except (ValueError, TypeError, MemoryError):
            raise WireError(f"compact form: record {i} has an array numpy cannot build") from None
    return out


def _flower_arrays(records: list[dict], content) -> dict[int, dict]:
    from flwr.app import ArrayRecord

    rec = content.get(WIRE_ARRAYS)
    if not isinstance(rec, ArrayRecord):
        raise WireError("compact form: the arrays' record is missing or not an ArrayRecord")
    out: dict[int, dict] = {}
    wanted = set()
    for i, entry in enumerate(records):
        if entry["kind"] != "arrays":
            continue
        for key in entry["arrays"]:
            full = f"{i}|{_key(i, key)}"
            if full in wanted:
                raise WireError(f"compact form: record {i} lists an array twice")
            wanted.add(full)
            if full not in rec:
                raise WireError(f"compact form: record {i} lists an array the arrays' record does not hold")
            out.setdefault(i, {})[key] = rec[full]
    if len(wanted) != len(rec):
        raise WireError("compact form: the arrays' record holds arrays the manifest does not list")
    return out


def unpack(content):
    """The RecordDict that ``content`` (compact form) was packed from; :class:`WireError` if it is
    not well formed (and for nothing else: any other failure of reading it becomes one too)."""
    try:
        return _unpack(content)
    except WireError:
        raise
    except Exception:  # noqa: BLE001 - a backstop: no value of the form is quoted
        raise WireError("compact form: not readable") from None


def _unpack(content):
    from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

    wire = content.get(WIRE) if is_packed(content) else None
    if not isinstance(wire, ConfigRecord):
        raise WireError("compact form: its record is missing or not a ConfigRecord")
    if type(wire.get("v")) is not int or wire["v"] != VERSION:
        raise WireError("compact form: a version this site or coordinator does not read")
    records, inline = _manifest(wire)
    expected = {WIRE} if inline else {WIRE, WIRE_ARRAYS}
    if set(content.keys()) != expected:
        raise WireError("compact form: records beside the form's own")
    if inline and "blob" not in wire and any(e["kind"] == "arrays" for e in records):
        raise WireError("compact form: inline arrays without their bytes")
    if not inline and "blob" in wire:
        raise WireError("compact form: both inline bytes and an arrays' record")
    arrays = (_inline_arrays(records, wire.get("blob", b"")) if inline else _flower_arrays(records, content))
    scalars: dict[int, dict] = {}
    for full, value in wire.items():
        if full in _FIXED:
            continue
        idx, sep, key = full.partition("|")
        i = _index(idx) if sep else None
        if i is None or i >= len(records):
            raise WireError("compact form: a value that belongs to no record")
        if records[i]["kind"] == "arrays":
            raise WireError(f"compact form: record {i} is an array record with scalar values")
        scalars.setdefault(i, {})[_key(i, key)] = value
    out = RecordDict()
    for i, entry in enumerate(records):
        try:
            if entry["kind"] == "arrays":
                rec = ArrayRecord(arrays.get(i, {}))
            elif entry["kind"] == "metrics":
                rec = MetricRecord(scalars.get(i, {}))
            else:
                rec = ConfigRecord(scalars.get(i, {}))
        except Exception:  # noqa: BLE001 - Flower's own type checks: the value is not quoted
            raise WireError(f"compact form: record {i} holds values its kind does not allow") from None
        out[entry["name"]] = rec
    return out
