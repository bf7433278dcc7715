"""Rebuild ``common/data/ps3_15_table_e1_1.tsv`` (DICOM PS3.15 Table E.1-1) from two independent
machine-readable transcriptions of the standard, and cross-check them.

A maintainer tool: it needs PyPI, and is not run by the tests. The shipped TSV is the product;
this script is how it was made and how to remake it for a new edition.

Sources (read as data, by parsing, never imported or executed):

* rows and Basic Profile actions: ``dicomanonymizer/dicom_anonymization_databases/dicomfields_<ED>.py``
  of the ``dicom-anonymizer`` wheel (KitwareMedical, BSD-3-Clause), which transcribes the table of
  the named edition (tag lists per action code);
* option columns: ``idiscore/_public_dicom.py`` of the ``idiscore`` wheel (a scrape of the standard's
  chapter E with every option column), restricted to the rows of the chosen edition.

The script refuses to write if the two sources disagree on any Basic Profile action of a shared row.

    python deployments/tools/build_e1_1_table.py --edition 2024b            # downloads both wheels
    python deployments/tools/build_e1_1_table.py --kitware-wheel W1 --idiscore-wheel W2
"""

from __future__ import annotations

import argparse
import ast
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from pydicom.datadict import dictionary_description

OUT = Path(__file__).resolve().parents[2] / "common" / "data" / "ps3_15_table_e1_1.tsv"

KITWARE_LISTS = {
    "D_TAGS": "D", "Z_TAGS": "Z", "X_TAGS": "X", "U_TAGS": "U", "Z_D_TAGS": "Z/D",
    "X_Z_TAGS": "X/Z", "X_D_TAGS": "X/D", "X_Z_D_TAGS": "X/Z/D", "X_Z_U_STAR_TAGS": "X/Z/U*",
}
IDISCORE_CODES = {
    "DUMMY": "D", "EMPTY": "Z", "REMOVE": "X", "KEEP": "K", "CLEAN": "C", "UID": "U",
    "EMPTY_OR_DUMMY": "Z/D", "REMOVE_OR_EMPTY": "X/Z", "REMOVE_OR_DUMMY": "X/D",
    "REMOVE_OR_EMPTY_OR_DUMMY": "X/Z/D", "REMOVE_OR_EMPTY_OR_UID": "X/Z/U*",
}
# idiscore rule-set name -> our option token (order = column order of the table).
IDISCORE_OPTIONS = {
    "retain_safe_private": "priv", "retain_uid": "uid", "retain_device_id": "dev",
    "retain_institution_id": "inst", "retain_patient_characteristics": "pat",
    "retain_full_dates": "full", "retain_modified_dates": "mod", "clean_descriptors": "desc",
    "clean_structured_content": "struct", "clean_graphics": "graph",
}
# Rows that are not single tags, in our notation (x = any hex digit).
WILDCARDS = {
    # Kitware (group, element, group mask, element mask) -> ours
    (0x5000, 0x0000, 0xFF00, 0x0000): "50xxxxxx",
    (0x6000, 0x3000, 0xFF00, 0xFFFF): "60xx3000",
    (0x6000, 0x4000, 0xFF00, 0xFFFF): "60xx4000",
}
IDISCORE_WILDCARDS = {"50xxxxxx": "50xxxxxx", "60xx3000": "60xx3000", "60xx4000": "60xx4000"}
PRIVATE_ROW = "oddxxxxx"
WILDCARD_NAMES = {
    "50xxxxxx": "Curve Data", "60xx3000": "Overlay Data", "60xx4000": "Overlay Comments",
    PRIVATE_ROW: "Private Attributes",
}


def _download(package: str, version: str | None, dest: Path) -> Path:
    spec = f"{package}=={version}" if version else package
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(dest), spec], check=True)
    return next(dest.glob("*.whl"))


def _member(wheel: Path, suffix: str) -> str:
    with zipfile.ZipFile(wheel) as zf:
        name = next(n for n in zf.namelist() if n.endswith(suffix))
        return zf.read(name).decode("utf-8")


def kitware_rows(source: str) -> tuple[dict[str, str], dict[str, str]]:
    """tag -> basic action, and tag -> attribute name from the source's comments."""
    actions: dict[str, str] = {}
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            code = KITWARE_LISTS.get(node.targets[0].id)
            if code is None:
                continue
            for elt in node.value.elts:
                t = tuple(ast.literal_eval(elt))
                tag = WILDCARDS[t] if len(t) == 4 else f"{t[0]:04x}{t[1]:04x}"
                if tag in actions:
                    raise SystemExit(f"kitware: {tag} listed twice")
                actions[tag] = code
    names = {}
    for m in re.finditer(r"\(\s*0x([0-9A-Fa-f]{4}),\s*0x([0-9A-Fa-f]{4})\s*,?\s*\),\s*#\s*([^\n]+)", source):
        names[(m.group(1) + m.group(2)).lower()] = m.group(3).strip()
    return actions, names


def idiscore_sets(source: str) -> dict[str, dict[str, str]]:
    """rule-set name -> {tag -> code}."""
    sets: dict[str, dict[str, str]] = {}
    for node in ast.parse(source).body:
        if not (isinstance(node, ast.Assign) and isinstance(node.value, ast.Call)):
            continue
        kw = {k.arg: k.value for k in node.value.keywords}
        if "rules" not in kw:
            continue
        rules: dict[str, str] = {}
        for elt in kw["rules"].elts:
            ident, code = elt.elts
            if ident.func.id == "PrivateTags":
                tag = PRIVATE_ROW
            else:
                tag = ident.args[0].value.lower()
                tag = IDISCORE_WILDCARDS.get(tag, tag)
            rules[tag] = IDISCORE_CODES[code.attr]
        sets[node.targets[0].id] = rules
    return sets


def build(edition: str, kitware_src: str, idiscore_src: str) -> tuple[list[str], list[str]]:
    basic, names = kitware_rows(kitware_src)
    listed = len(basic)
    basic[PRIVATE_ROW] = "X"  # the table's "Private Attributes" row; Kitware handles it in code
    sets = idiscore_sets(idiscore_src)
    ib = sets["basic_profile"]
    shared = set(basic) & set(ib)
    disagree = sorted(t for t in shared if basic[t] != ib[t])
    if disagree:
        raise SystemExit("sources disagree on Basic Profile actions: " + ", ".join(disagree))
    report = [
        f"Kitware {edition}: {listed} listed rows + the Private Attributes row; idiscore scrape: {len(ib)} rows; "
        f"{len(shared)} shared, Basic Profile actions identical on all of them",
        f"rows only in the idiscore scrape (later edition, not shipped): {sorted(set(ib) - set(basic))}",
        f"rows only in Kitware {edition} (no option columns known): {sorted(set(basic) - set(ib))}",
    ]
    lines = []
    for tag in sorted(basic, key=lambda t: (t == PRIVATE_ROW, t)):
        opts = []
        for setname, token in IDISCORE_OPTIONS.items():
            code = sets[setname].get(tag)
            if code:
                opts.append(f"{token}={code}")
        name = WILDCARD_NAMES.get(tag) or names.get(tag)
        if not name:
            try:
                name = dictionary_description(int(tag, 16))
            except (KeyError, ValueError):
                name = "(unnamed)"
        lines.append(f"{tag.upper() if 'x' not in tag else tag}\t{basic[tag]}\t{' '.join(opts)}\t{name}")
    return lines, report


HEADER = """\
# DICOM PS3.15 Annex E, Table E.1-1 "Application Level Confidentiality Profile Attributes", edition {edition}.
# {rows} rows (the table's own count for {edition}, including the Private Attributes row).
# Built by deployments/tools/build_e1_1_table.py from two independent transcriptions of the standard:
#   rows and Basic Profile actions: dicom-anonymizer {kv} (KitwareMedical, BSD-3-Clause),
#     dicomanonymizer/dicom_anonymization_databases/dicomfields_{edition}.py;
#   option columns: idiscore {iv}, idiscore/_public_dicom.py (a scrape of the standard's chapter E,
#     2024-09-19), restricted to the rows of {edition}.
# The two agree on the Basic Profile action of every shared row. A row's option field lists only the
# options that give it a code; an option not listed leaves the Basic Profile action in force.
# Columns: tag (GGGGEEEE; x = any hex digit; oddxxxxx = private groups) | Basic Profile action | options | name
# Option tokens: priv=Retain Safe Private, uid=Retain UIDs, dev=Retain Device Identity,
#   inst=Retain Institution Identity, pat=Retain Patient Characteristics, full=Retain Longitudinal Full Dates,
#   mod=Retain Longitudinal Modified Dates, desc=Clean Descriptors, struct=Clean Structured Content,
#   graph=Clean Graphics. Values are the table's own codes (K keep, C clean, X remove, ...).
tag\tbasic\toptions\tname
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--edition", default="2024b")
    ap.add_argument("--kitware-wheel", type=Path)
    ap.add_argument("--idiscore-wheel", type=Path)
    ap.add_argument("--kitware-version", default="2.1.0")
    ap.add_argument("--idiscore-version", default="1.2.0")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        kw = args.kitware_wheel or _download("dicom-anonymizer", args.kitware_version, Path(tmp, "k"))
        idc = args.idiscore_wheel or _download("idiscore", args.idiscore_version, Path(tmp, "i"))
        kitware_src = _member(kw, f"dicom_anonymization_databases/dicomfields_{args.edition}.py")
        idiscore_src = _member(idc, "idiscore/_public_dicom.py")
    lines, report = build(args.edition, kitware_src, idiscore_src)
    header = HEADER.format(edition=args.edition, rows=len(lines), kv=args.kitware_version, iv=args.idiscore_version)
    args.out.write_text(header + "\n".join(lines) + "\n")
    print("\n".join(report))
    print(f"wrote {len(lines)} rows to {args.out}")


if __name__ == "__main__":
    main()
