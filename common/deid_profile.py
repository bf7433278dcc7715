"""PS3.15 Table E.1-1 as data, resolved once into a tag-indexed action table.

``python -m dicomfl.common.deid_profile`` prints the row counts per action.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

TABLE_FILE = "ps3_15_table_e1_1.tsv"
# The edition the shipped TSV transcribes, and that edition's row count (the TSV's first comment
# line names both; a test holds them together). Rebuilt by deployments/tools/build_e1_1_table.py.
TABLE_EDITION = "2024b"
TABLE_ROWS = 621
TABLE_SOURCE = (
    f"DICOM PS3.15 Table E.1-1, edition {TABLE_EDITION}: rows and Basic Profile actions from "
    "dicom-anonymizer's dicomfields_2024b, option columns from idiscore's scrape of the standard"
)

# Option columns (token in the TSV -> option name used in config and the method code sequence).
OPTION_TOKENS = {
    "priv": "retain_safe_private",
    "uid": "retain_uids",
    "dev": "retain_device_identity",
    "inst": "retain_institution_identity",
    "pat": "retain_patient_characteristics",
    "full": "retain_longitudinal_full_dates",
    "mod": "retain_longitudinal_modified_dates",
    "desc": "clean_descriptors",
    "struct": "clean_structured_content",
    "graph": "clean_graphics",
}

# Resolved actions used by the de-identifier.
KEEP, REMOVE, EMPTY, DUMMY, REMAP_UID, SHIFT_DATE = "K", "X", "Z", "D", "U", "S"


@dataclass(frozen=True)
class ProfileRow:
    tag: str  # 8 hex digits, 'x' for wildcards
    basic: str  # the Basic profile action code as printed in the table
    options: dict[str, str]  # option name -> code
    name: str


@lru_cache(maxsize=1)
def load_rows() -> tuple[ProfileRow, ...]:
    text = resources.files("dicomfl.common").joinpath("data", TABLE_FILE).read_text()
    rows = []
    header_seen = False
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        if not header_seen:
            header_seen = True
            continue
        tag, basic, opts, name = line.split("\t")
        options = {}
        for tok in opts.split():
            k, v = tok.split("=")
            options[OPTION_TOKENS[k]] = v
        rows.append(ProfileRow(tag=tag.lower(), basic=basic, options=options, name=name))
    return tuple(rows)


def table_header() -> str:
    """The TSV's leading comment lines (they name the edition, the row count and the sources)."""
    text = resources.files("dicomfl.common").joinpath("data", TABLE_FILE).read_text()
    return "\n".join(line for line in text.splitlines()[:20] if line.startswith("#"))


def table_digest() -> str:
    data = resources.files("dicomfl.common").joinpath("data", TABLE_FILE).read_bytes()
    return hashlib.sha256(data).hexdigest()[:16]


def resolve_action(row: ProfileRow, enabled: frozenset[str]) -> str:
    """The single action dicomfl applies for a row, given the enabled options.

    * Options override the Basic profile where the table gives them a code: ``K`` keeps;
      ``C`` under Retain Longitudinal Modified Dates shifts dates (a time of day is kept: the shift is
      whole days); every other ``C`` (clean) removes, since automatic cleaning of free text cannot be
      shown safe.
    * Where the table lets the implementation choose (X/Z, X/D, X/Z/D, X/Z/U*), dicomfl removes:
      the de-identified dataset never leaves memory, so IOD Type 1/2 conformance is not needed.
      ``Z/D`` becomes ``Z``.
    """
    for opt, code in row.options.items():
        if opt in enabled:
            if code == "K":
                return KEEP
            if code == "C":
                return SHIFT_DATE if opt == "retain_longitudinal_modified_dates" else REMOVE
            if code == "X":
                return REMOVE
    basic = row.basic
    if "X" in basic.split("/"):
        return REMOVE
    if basic in ("Z", "Z/D"):
        return EMPTY
    if basic == "D":
        return DUMMY
    if basic == "U":
        return REMAP_UID
    return REMOVE  # unknown code: the safe side


@lru_cache(maxsize=16)
def action_table(enabled: frozenset[str]) -> dict[int, str]:
    """Exact tags -> action. Wildcard rows (curves 50xx, overlays 60xx, private odd groups) are rules
    in the de-identifier itself, applied by group, never per row."""
    table: dict[int, str] = {}
    for row in load_rows():
        if "x" in row.tag:
            continue
        table[int(row.tag, 16)] = resolve_action(row, enabled)
    return table


def main() -> None:
    rows = load_rows()
    print(TABLE_SOURCE)
    print(f"rows: {len(rows)} (edition {TABLE_EDITION}: {TABLE_ROWS})")
    for code, n in sorted(Counter(r.basic for r in rows).items()):
        print(f"  {code:8s} {n}")


if __name__ == "__main__":
    main()
