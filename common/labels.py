"""Labels CSV, joined to images in memory on a key taken from the original header.

The CSV has a key column and a label column holding integer class labels 0..n_classes-1. The key
column is found by ``site.label_key`` (``accession_number``) or by the matching DICOM keyword
(``AccessionNumber``), case-insensitively, unless ``site.labels_key_column`` names it; the label
column is ``label`` unless ``site.labels_value_column`` names it.

Keys are kept only as HMACs under the site key, so the cache can re-join labels on a later run
without ever storing an accession number, UID or patient id.

Nothing read from the CSV -- no key, no label, no header cell (a file without a header row has
data in its first row) -- ever goes into a message: problems name the file, the row number
(the header is row 1) and the column as configured.

* A row whose label is not an integer, an empty key, duplicate and conflicting keys: reported
  by row and skipped (ingestion goes on).
* A label that is an integer outside 0..n_classes-1 (``7``, ``-1``, ``99999999999999999999``,
  ``1e400``): the labels file and the site's config disagree about the task, so ingestion
  stops (:class:`~dicomfl.common.errors.ConfigError`, one line naming the file and the rows);
  such a label never reaches training.
* Not UTF-8 text, a field over 128 KiB or a row the CSV parser cannot read: ``ConfigError``
  naming the file and the row.
* Two header cells that name the key column, or two that name the label column (``label`` and
  ``Label``; ``accession_number`` and ``AccessionNumber``): ``ConfigError`` naming the file, the
  column and the column numbers (which one holds the labels is not guessed).
* A header row split by ``;`` or tabs (a spreadsheet's export in some locales): ``ConfigError``
  saying so, instead of a missing column.
"""

from __future__ import annotations

import csv
import io
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pydicom.dataset import Dataset

from .errors import ConfigError, printable

KEY_KEYWORDS = {
    "sop_instance_uid": "SOPInstanceUID",
    "study_instance_uid": "StudyInstanceUID",
    "accession_number": "AccessionNumber",
    "patient_id": "PatientID",
}

#: The csv module's default field size limit (128 KiB); a longer field stops with a clear line.
MAX_FIELD = 131072
#: A labels file larger than this is refused before it is read.
MAX_LABELS_BYTES = 1 << 30
_INT = re.compile(r"[+-]?[0-9]+")


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


def _parse_label(text: str) -> int | float | None:
    """An integer label; ``inf`` for an infinite one (out of every range); None if not an integer."""
    if _INT.fullmatch(text):
        return int(text) if len(text) <= 30 else math.inf
    try:
        f = float(text)
    except ValueError:
        return None
    if math.isinf(f):
        return math.inf
    if f != f or f != int(f):
        return None
    return int(f)


def _matching(cols: list[str], candidates: list[str]) -> list[int]:
    """The columns whose header cell is one of ``candidates``, compared case-insensitively."""
    folded = {c.casefold() for c in candidates}
    return [i for i, c in enumerate(cols) if c.casefold() in folded]


def _other_delimiter(cols: list[str]) -> str | None:
    """The delimiter a header row seems to use instead of a comma: ``;`` or a tab (a cell of
    the comma-split row holds it), or None."""
    for delim, name in ((";", "';'"), ("\t", "tab")):
        if any(delim in c for c in cols):
            return name
    return None


def _find_column(cols: list[str], candidates: list[str]) -> int | None:
    for exact in (True, False):
        for cand in candidates:
            hits = [i for i, c in enumerate(cols) if (c == cand if exact else c.casefold() == cand.casefold())]
            if hits:
                return hits[0]
    return None


def _read_text(path: Path) -> str:
    try:
        size = path.stat().st_size
        if size > MAX_LABELS_BYTES:
            raise ConfigError(f"{printable(str(path))}: labels file is over {MAX_LABELS_BYTES >> 20} MiB")
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{printable(str(path))}: cannot read labels file ({type(exc).__name__})") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ConfigError(f"{printable(str(path))}: line {line}: labels file is not UTF-8 text "
                          "(save it as UTF-8 CSV)") from None


def load_labels(path: Path, label_key: str, hasher: Callable[[str], str], *, key_column: str | None = None,
                value_column: str | None = None, n_classes: int = 2) -> Labels:
    """Read the labels CSV.

    Parameters
    ----------
    path : Path
        The CSV file.
    label_key : str
        ``site.label_key``: what the key column holds.
    hasher : callable
        ``hasher(key) -> HMAC``; keys are kept only as its output.
    key_column, value_column : str, optional
        ``site.labels_key_column`` / ``site.labels_value_column``.
    n_classes : int
        Labels must be 0..n_classes-1.

    Raises
    ------
    ConfigError
        The file cannot be read or parsed, a column is missing, or a label is an integer outside
        0..n_classes-1 (one line naming the file and the rows; no cell value).
    """
    out = Labels()
    where = printable(str(path))
    name = printable(path.name)
    reader = csv.reader(io.StringIO(_read_text(path), newline=""))
    row_no = 0  # rows read so far; the header is row 1
    try:
        header = next(reader, None)
        row_no = 1
        cols = [c.strip() for c in (header or [])]
        key_names = [key_column] if key_column else [label_key] + ([KEY_KEYWORDS[label_key]] if label_key in KEY_KEYWORDS else [])
        value_names = [value_column] if value_column else ["label"]
        ki, vi = _find_column(cols, key_names), _find_column(cols, value_names)
        if ki is None or vi is None:
            delim = _other_delimiter(cols)
            if delim is not None:
                raise ConfigError(f"{where}: labels file looks {delim}-separated; use ',' between columns "
                                  "(save it as comma-separated CSV)")
        for names in (key_names, value_names):
            dup = _matching(cols, names)
            if len(dup) > 1:  # which one holds the labels? refused rather than guessed
                what = " or ".join(f"'{printable(n)}'" for n in names)
                raise ConfigError(f"{where}: labels file has more than one {what} column in its first row "
                                  f"(columns {', '.join(str(i + 1) for i in dup)}); keep one")
        if ki is None:
            what = " or ".join(f"'{printable(n)}'" for n in key_names)
            raise ConfigError(f"{where}: labels file has no {what} column in its first row "
                              "(site.labels_key_column names it)")
        if vi is None:
            raise ConfigError(f"{where}: labels file has no '{printable(value_names[0])}' column in its first row "
                              "(site.labels_value_column names it)")
        key_desc = printable(cols[ki])
        first_row: dict[str, int] = {}
        conflicted: set[str] = set()
        out_of_range: list[int] = []
        for row in reader:
            row_no += 1
            if not row:
                continue  # a blank line
            out.rows += 1
            raw_key = row[ki].strip() if ki < len(row) else ""
            raw_label = row[vi].strip() if vi < len(row) else ""
            if not raw_key:
                out.problems.append(f"{name} row {row_no}: empty '{key_desc}'")
                continue
            label = _parse_label(raw_label)
            if label is None:
                out.problems.append(f"{name} row {row_no}: label is not an integer")
                continue
            if not 0 <= label < n_classes:
                out_of_range.append(row_no)
                continue
            label = int(label)
            h = hasher(raw_key.replace("\\", "/") if label_key == "path" else raw_key)
            if h in conflicted:
                out.problems.append(f"{name} row {row_no}: duplicate key (already conflicting); dropped")
                continue
            if h in out.by_key:
                if out.by_key[h] == label:
                    out.problems.append(f"{name} row {row_no}: duplicate of row {first_row[h]} with the same label; kept once")
                else:
                    out.problems.append(
                        f"{name} row {row_no}: same key as row {first_row[h]} with a different label; both dropped"
                    )
                    del out.by_key[h]
                    conflicted.add(h)
                continue
            out.by_key[h] = label
            first_row[h] = row_no
    except csv.Error:
        raise ConfigError(f"{where}: row {row_no + 1}: not a readable CSV row (a field over "
                          f"{MAX_FIELD // 1024} KiB, or a quote that is never closed)") from None
    if out_of_range:
        more = f" (and {len(out_of_range) - 1} more rows: {', '.join(map(str, out_of_range[1:6]))}" \
               f"{', ...' if len(out_of_range) > 6 else ''})" if len(out_of_range) > 1 else ""
        raise ConfigError(f"{where}: row {out_of_range[0]}: label outside 0..{n_classes - 1} "
                          f"(site.n_classes is {n_classes}){more}")
    return out
