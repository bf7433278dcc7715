"""Labels CSV, joined to images in memory on a key taken from the original header.

The CSV has a column named after the site's ``label_key`` and a ``label`` column holding integer
class labels. Keys are kept only as HMACs under the site key, so the cache can re-join labels on a
later run without ever storing an accession number, UID or patient id. Problems name the CSV row,
never the key value.
"""

from __future__ import annotations

import csv
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pydicom.dataset import Dataset

from .errors import ConfigError

KEY_KEYWORDS = {
    "sop_instance_uid": "SOPInstanceUID",
    "study_instance_uid": "StudyInstanceUID",
    "accession_number": "AccessionNumber",
    "patient_id": "PatientID",
}


@dataclass
class Labels:
    by_key: dict[str, int] = field(default_factory=dict)  # HMAC of key -> label
    problems: list[str] = field(default_factory=list)
    rows: int = 0


def key_value(ds: Dataset, rel_path: str, label_key: str) -> str | None:
    """The join key of one image, from the original (not yet de-identified) header."""
    if label_key == "path":
        return rel_path
    try:
        v = ds.get(KEY_KEYWORDS[label_key])
    except Exception:  # noqa: BLE001 - unreadable key: the image is unlabelled
        return None
    s = str(v).strip() if v is not None else ""
    return s or None


def _parse_label(text: str) -> int | None:
    try:
        f = float(text)
    except ValueError:
        return None
    if f != f or f != int(f):
        return None
    return int(f)


def load_labels(path: Path, label_key: str, hasher: Callable[[str], str]) -> Labels:
    """Read the labels CSV. Structural problems raise ConfigError; bad rows are reported and skipped."""
    out = Labels()
    try:
        fh = open(path, newline="", encoding="utf-8-sig")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read labels file ({type(exc).__name__})") from None
    with fh:
        reader = csv.DictReader(fh)
        cols = [c.strip() for c in (reader.fieldnames or [])]
        reader.fieldnames = cols
        for needed in (label_key, "label"):
            if needed not in cols:
                raise ConfigError(f"{path}: labels file has no '{needed}' column (columns: {', '.join(cols) or 'none'})")
        first_row: dict[str, int] = {}
        conflicted: set[str] = set()
        for lineno, row in enumerate(reader, start=2):
            out.rows += 1
            raw_key = (row.get(label_key) or "").strip()
            raw_label = (row.get("label") or "").strip()
            if not raw_key:
                out.problems.append(f"{path.name} row {lineno}: empty '{label_key}'")
                continue
            label = _parse_label(raw_label)
            if label is None:
                out.problems.append(f"{path.name} row {lineno}: label is not an integer")
                continue
            h = hasher(raw_key.replace("\\", "/") if label_key == "path" else raw_key)
            if h in conflicted:
                out.problems.append(f"{path.name} row {lineno}: duplicate key (already conflicting); dropped")
                continue
            if h in out.by_key:
                if out.by_key[h] == label:
                    out.problems.append(f"{path.name} row {lineno}: duplicate of row {first_row[h]} with the same label; kept once")
                else:
                    out.problems.append(
                        f"{path.name} row {lineno}: same key as row {first_row[h]} with a different label; both dropped"
                    )
                    del out.by_key[h]
                    conflicted.add(h)
                continue
            out.by_key[h] = label
            first_row[h] = lineno
    return out
